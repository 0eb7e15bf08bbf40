"""structattn: a torch.compile backend that swaps softmax attention for structured approximations.

    compiled = torch.compile(model, backend="structattn", options={"method": "monarch"})
    report = structattn.explain(model, *args, options={...})
    print(report)
"""
from . import functional, hf, methods
from .backend import register
from .calibrate import calibrate
from .config import Config
from .explain import explain
from .lowering import register_all as _register_all
from .methods.linear.fit import fit_linear
from .report import Report, Site, last_report

_register_all()

__all__ = ["Config", "Report", "Site", "calibrate", "explain", "fit_linear", "functional", "hf", "last_report", "methods",
           "register"]
__version__ = "0.1.0"
