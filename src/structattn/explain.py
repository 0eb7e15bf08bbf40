"""``structattn.explain``: compile, run once, and return what was rewritten."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from . import backend as _backend
from .config import Config
from .report import Report, set_last


def explain(model: Any, *args: Any, options: Optional[dict] = None, dynamic: Optional[bool] = None, **kwargs: Any) -> Report:
    """Compile ``model`` with the structattn backend, run it once on ``args``/``kwargs`` (under
    ``torch.no_grad``), and return the Report of every graph compiled during that call.

    ``options`` are the backend options; ``compiler`` defaults to ``"eager"`` here (the report does
    not need inductor), pass ``compiler`` explicitly to exercise another one. Layer names are the
    ``model.named_modules()`` names; a glob of ``options['layers']`` that matches no module of the
    model nor any layer seen in the run gives one warning, after the run.
    """
    opts = Config.checked_dict(options)
    opts.setdefault("compiler", "eager")
    Config.from_options(copy.deepcopy(opts))  # validate before compiling
    report = Report(options=dict(opts))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_backend.structattn_backend, options=opts, dynamic=dynamic)
    try:
        with _backend.collecting(report, root=model) as session, torch.no_grad():
            report.output = compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    _backend.finish_collecting(session, opts, stacklevel=2)
    set_last(report)
    return report
