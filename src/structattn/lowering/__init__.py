"""torch.library ops for every registered method: schema, fake impl, autograd, device dispatch."""
from .ops import op_for, register_all, run_method, check_inputs

__all__ = ["op_for", "register_all", "run_method", "check_inputs"]
