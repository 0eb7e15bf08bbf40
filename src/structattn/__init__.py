"""structattn: a torch.compile backend that swaps softmax attention for structured approximations.

    compiled = torch.compile(model, backend="structattn", options={"method": "monarch"})
    report = structattn.explain(model, *args, options={...})
"""
from . import functional, methods
from .lowering import register_all as _register_all

_register_all()

__all__ = ["functional", "methods"]
__version__ = "0.1.0"
