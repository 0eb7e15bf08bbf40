"""Rules as data: which FX targets spell which canonical op, and their argument names.

``canonical(node)`` turns any spelling (``torch.matmul``, ``@``, ``Tensor.bmm``, a ``call_method``
of ``"softmax"``...) into a ``Call(name, args)`` with arguments bound to canonical names, so the
matcher never looks at raw targets.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

# canonical name -> parameter names, in positional order (the tensor the op applies to is first)
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "matmul": ("a", "b"),
    "softmax": ("input", "dim", "dtype"),
    "softmax_f": ("input", "dim", "_stacklevel", "dtype"),  # F.softmax has _stacklevel third
    "dropout": ("input", "p", "training", "inplace"),
    "dropout_t": ("input", "p", "train"),  # torch.dropout
    "mul": ("input", "other"),
    "div": ("input", "other"),
    "add": ("input", "other"),
    "masked_fill": ("input", "mask", "value"),
    "where": ("condition", "input", "other"),
    "transpose": ("input", "dim0", "dim1"),
    "permute": ("input", "dims"),
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    "expand": ("input", "sizes"),
    "reshape": ("input", "shape"),
    "unsqueeze": ("input", "dim"),
    "repeat_interleave": ("input", "repeats", "dim"),
    "cast": ("input",),
    "contiguous": ("input",),
    "getitem": ("input", "index"),
    "and": ("input", "other"),
    "compare_le": ("input", "other"),
    "compare_lt": ("input", "other"),
    "compare_ge": ("input", "other"),
    "compare_gt": ("input", "other"),
    "arange": ("start", "end", "step"),
    "ones": ("sizes",),
    "new_ones": ("input", "sizes"),
    "not": ("input",),
}

_FUNCTIONS: dict[Any, str] = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    torch.softmax: "softmax", torch.special.softmax: "softmax", F.softmax: "softmax_f",
    F.dropout: "dropout", torch.dropout: "dropout_t",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add",
    # augmented assignment on a fresh tensor: dynamo rebinds the name to the result
    operator.imul: "mul", operator.itruediv: "div", operator.iadd: "add",
    torch.masked_fill: "masked_fill", torch.where: "where",
    torch.transpose: "transpose", torch.swapaxes: "transpose", torch.swapdims: "transpose",
    torch.permute: "permute",
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze", torch.repeat_interleave: "repeat_interleave",
    operator.getitem: "getitem",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and",
    operator.le: "compare_le", torch.le: "compare_le", operator.lt: "compare_lt", torch.lt: "compare_lt",
    operator.ge: "compare_ge", torch.ge: "compare_ge", operator.gt: "compare_gt", torch.gt: "compare_gt",
    torch.arange: "arange", torch.ones: "ones",
    operator.invert: "not", torch.logical_not: "not", torch.bitwise_not: "not",
}

_METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul",
    "softmax": "softmax",
    "mul": "mul", "__mul__": "mul", "div": "div", "__truediv__": "div", "add": "add", "__add__": "add",
    "masked_fill": "masked_fill",
    "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
    "permute": "permute", "expand": "expand", "reshape": "reshape", "view": "reshape",
    "unsqueeze": "unsqueeze", "repeat_interleave": "repeat_interleave",
    "to": "cast", "type": "cast", "type_as": "cast", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast", "contiguous": "contiguous",
    "__and__": "and", "logical_and": "and", "bitwise_and": "and",
    "le": "compare_le", "lt": "compare_lt", "ge": "compare_ge", "gt": "compare_gt",
    "__le__": "compare_le", "__lt__": "compare_lt", "__ge__": "compare_ge", "__gt__": "compare_gt",
    "new_ones": "new_ones", "logical_not": "not", "__invert__": "not", "bitwise_not": "not",
}

# ops whose trailing positional arguments are varargs (x.permute(0, 2, 1, 3), x.view(2, 3, -1))
_VARARGS = {"permute": "dims", "expand": "sizes", "reshape": "shape", "new_ones": "sizes", "ones": "sizes"}

# canonical names that are the same op under two signatures
_ALIASES = {"softmax_f": "softmax", "dropout_t": "dropout"}


@dataclass(frozen=True)
class Call:
    """A node seen through the table: canonical ``name`` and arguments bound by name."""

    name: str
    args: dict
    node: Node

    def get(self, key: str, default: Any = None) -> Any:
        return self.args.get(key, default)


def canonical(node: Any) -> Optional[Call]:
    """The canonical form of ``node``, or None when the table does not know its target."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        if node.target is builtins.getattr and len(node.args) == 2 and node.args[1] in ("mT", "T"):
            return Call("transpose", {"input": node.args[0], "dim0": -2, "dim1": -1}, node)
        name = _FUNCTIONS.get(node.target)
        if name is None and node.target in (torch.einsum, getattr(torch.functional, "einsum", None)):
            return _einsum(node)
    elif node.op == "call_method":
        name = _METHODS.get(node.target)
    else:
        return None
    if name is None:
        return None
    sig = _SIGNATURES[name]
    args = list(node.args)
    bound: dict[str, Any] = {}
    vararg = _VARARGS.get(name)
    if vararg is not None and len(args) > 1:
        rest = args[1:]
        bound[vararg] = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else tuple(rest)
        args = args[:1]
    for key, value in zip(sig, args):
        bound[key] = value
    for key, value in node.kwargs.items():
        if key == "self":
            key = "input"
        if key == "size" and vararg:
            key = vararg
        bound[key] = value
    return Call(_ALIASES.get(name, name), bound, node)


def _einsum(node: Node) -> Optional[Call]:
    args = list(node.args)
    if not args or not isinstance(args[0], str):
        return None
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    return Call("einsum", {"equation": args[0].replace(" ", ""), "operands": tuple(operands)}, node)


def example(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor dynamo recorded for ``node`` (``meta['example_value']``), if any."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def constant_number(value: Any) -> Optional[float]:
    """``value`` as a Python float if it is a literal number (or ``torch.tensor(literal)``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Node) and value.op == "call_function" and value.target in (torch.tensor, torch.scalar_tensor):
        if value.args and isinstance(value.args[0], (int, float)) and not isinstance(value.args[0], bool):
            return float(value.args[0])
    return None
