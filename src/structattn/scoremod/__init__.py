"""Score modifications (soft-capping, biases, masks beyond key padding) as one small expression
language: ``expr`` (parse, the tree), ``evaluate`` (torch), ``triton_gen`` (generated kernels)."""
from .expr import ScoreModError, parse, tensors, unparse, variables

__all__ = ["ScoreModError", "parse", "tensors", "unparse", "variables"]
