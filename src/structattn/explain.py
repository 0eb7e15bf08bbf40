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
    not need inductor), pass ``compiler`` explicitly to exercise another one.
    """
    opts = dict(options or {})
    opts.setdefault("compiler", "eager")
    Config.from_options(copy.deepcopy(opts))  # validate before compiling
    report = Report(options=dict(opts))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_backend.structattn_backend, options=opts, dynamic=dynamic)
    _backend._COLLECTING.append(report)
    try:
        with torch.no_grad():
            report.output = compiled(*args, **kwargs)
    finally:
        _backend._COLLECTING.pop()
        torch._dynamo.reset()
    set_last(report)
    return report
