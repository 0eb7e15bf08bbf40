"""Rules as data: which FX targets spell which canonical op, and their argument names.

``canonical(node)`` turns any spelling (``torch.matmul``, ``@``, ``Tensor.bmm``, a ``call_method``
of ``"softmax"``, ``torch.ops.aten.bmm.default``...) into a ``Call(name, args)`` with arguments
bound to canonical names, so the matcher never looks at raw targets. Torch-level graphs (dynamo)
and aten-level graphs (``torch.export``, AOT autograd) share one vocabulary: an aten overload is
looked up by its overload packet, and aten's ``view(bmm(view(expand(a)), view(expand(b))))``
decomposition of a batched ``matmul`` reads as that ``matmul``.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten

# canonical name -> parameter names, in positional order (the tensor the op applies to is first)
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "matmul": ("a", "b"),
    "baddbmm": ("bias", "a", "b", "beta", "alpha"),
    "softmax": ("input", "dim", "dtype"),
    "softmax_f": ("input", "dim", "_stacklevel", "dtype"),  # F.softmax has _stacklevel third
    "softmax_aten": ("input", "dim", "half_to_float"),     # aten._softmax
    "safe_softmax": ("input", "dim", "dtype"),              # aten._safe_softmax: all -inf rows -> 0
    "dropout": ("input", "p", "training", "inplace"),
    "dropout_t": ("input", "p", "train"),  # torch.dropout / aten.dropout
    "mul": ("input", "other"),
    "div": ("input", "other"),
    "add": ("input", "other", "alpha"),
    "sub": ("input", "other", "alpha"),
    "rsub": ("input", "other", "alpha"),   # other - alpha * input (aten.rsub, Tensor.__rsub__)
    "masked_fill": ("input", "mask", "value"),
    "where": ("condition", "input", "other"),
    "transpose": ("input", "dim0", "dim1"),
    "permute": ("input", "dims"),
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    # the fused kernels SDPA dispatches to (make_fx / AOT graphs): they return (output, logsumexp, ..)
    "sdpa_cpu": ("query", "key", "value", "dropout_p", "is_causal"),            # attn_mask, scale: kwargs
    "sdpa_efficient": ("query", "key", "value", "attn_mask", "compute_log_sumexp", "dropout_p", "is_causal"),
    "sdpa_flash": ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask"),
    "expand": ("input", "sizes"),
    "expand_as": ("input", "other"),
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
    "compare_eq": ("input", "other"),
    "any": ("input", "dim", "keepdim"),
    "all": ("input", "dim", "keepdim"),
    "arange": ("start", "end", "step"),
    "ones": ("sizes",),
    "new_ones": ("input", "sizes"),
    "full": ("sizes", "fill_value"),
    "new_full": ("input", "sizes", "fill_value"),
    "full_like": ("input", "fill_value"),
    "scalar_tensor": ("value",),
    "zeros": ("sizes",),
    "zeros_like": ("input",),
    "ones_like": ("input",),
    "tril": ("input", "diagonal"),
    "triu": ("input", "diagonal"),
    "not": ("input",),
    "meta": ("input",),   # reads only the dtype / shape / device of its input
}

_FUNCTIONS: dict[Any, str] = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul", torch.baddbmm: "baddbmm",
    torch.softmax: "softmax", torch.special.softmax: "softmax", F.softmax: "softmax_f",
    F.dropout: "dropout", torch.dropout: "dropout_t",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    # augmented assignment on a fresh tensor: dynamo rebinds the name to the result
    operator.imul: "mul", operator.itruediv: "div", operator.iadd: "add", operator.isub: "sub",
    torch.masked_fill: "masked_fill", torch.where: "where",
    torch.transpose: "transpose", torch.swapaxes: "transpose", torch.swapdims: "transpose",
    torch.permute: "permute",
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze", torch.repeat_interleave: "repeat_interleave",
    torch.clone: "contiguous",
    operator.getitem: "getitem",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and",
    operator.le: "compare_le", torch.le: "compare_le", operator.lt: "compare_lt", torch.lt: "compare_lt",
    operator.ge: "compare_ge", torch.ge: "compare_ge", operator.gt: "compare_gt", torch.gt: "compare_gt",
    operator.eq: "compare_eq", torch.eq: "compare_eq", torch.any: "any", torch.all: "all",
    torch.arange: "arange", torch.ones: "ones", torch.full: "full", torch.full_like: "full_like",
    torch.scalar_tensor: "scalar_tensor", torch.zeros: "zeros", torch.zeros_like: "zeros_like", torch.ones_like: "ones_like",
    torch.tril: "tril", torch.triu: "triu",
    operator.invert: "not", torch.logical_not: "not", torch.bitwise_not: "not",
}

_METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul", "baddbmm": "baddbmm",
    "softmax": "softmax",
    "mul": "mul", "__mul__": "mul", "__rmul__": "mul", "div": "div", "__truediv__": "div",
    "add": "add", "__add__": "add", "__radd__": "add", "sub": "sub", "__sub__": "sub", "__rsub__": "rsub",
    "masked_fill": "masked_fill",
    "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
    "permute": "permute", "expand": "expand", "expand_as": "expand_as", "reshape": "reshape", "view": "reshape",
    "unsqueeze": "unsqueeze", "repeat_interleave": "repeat_interleave",
    "to": "cast", "type": "cast", "type_as": "cast", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast", "bool": "cast", "contiguous": "contiguous", "clone": "contiguous",
    "__and__": "and", "logical_and": "and", "bitwise_and": "and",
    "le": "compare_le", "lt": "compare_lt", "ge": "compare_ge", "gt": "compare_gt",
    "__le__": "compare_le", "__lt__": "compare_lt", "__ge__": "compare_ge", "__gt__": "compare_gt",
    "eq": "compare_eq", "__eq__": "compare_eq", "any": "any", "all": "all",
    "new_ones": "new_ones", "new_full": "new_full", "logical_not": "not", "__invert__": "not",
    "bitwise_not": "not", "tril": "tril", "triu": "triu",
    "size": "meta", "dim": "meta", "stride": "meta", "numel": "meta", "get_device": "meta",
}

# aten overload packets (every overload of the packet spells the same canonical op)
_ATEN: dict[Any, str] = {
    aten.matmul: "matmul", aten.bmm: "matmul", aten.mm: "matmul", aten.baddbmm: "baddbmm",
    aten.softmax: "softmax", aten._softmax: "softmax_aten", aten._safe_softmax: "safe_softmax",
    aten.dropout: "dropout_t",
    aten.mul: "mul", aten.div: "div", aten.add: "add", aten.sub: "sub", aten.rsub: "rsub",
    aten.masked_fill: "masked_fill", aten.where: "where",
    aten.transpose: "transpose", aten.permute: "permute", aten.expand: "expand", aten.expand_as: "expand_as",
    aten.view: "reshape", aten.reshape: "reshape", aten._unsafe_view: "reshape",
    aten.unsqueeze: "unsqueeze", aten.repeat_interleave: "repeat_interleave",
    aten._to_copy: "cast", aten.to: "cast", aten.type_as: "cast",
    aten.clone: "contiguous", aten.contiguous: "contiguous", aten.alias: "contiguous",
    aten.scaled_dot_product_attention: "sdpa",
    aten._scaled_dot_product_flash_attention_for_cpu: "sdpa_cpu",
    aten._scaled_dot_product_efficient_attention: "sdpa_efficient",
    aten._scaled_dot_product_flash_attention: "sdpa_flash",
    aten.logical_and: "and", aten.bitwise_and: "and", aten.__and__: "and",
    aten.le: "compare_le", aten.lt: "compare_lt", aten.ge: "compare_ge", aten.gt: "compare_gt",
    aten.eq: "compare_eq", aten.any: "any", aten.all: "all",
    aten.arange: "arange", aten.ones: "ones", aten.full: "full", aten.full_like: "full_like",
    aten.new_ones: "new_ones", aten.new_full: "new_full", aten.scalar_tensor: "scalar_tensor",
    aten.zeros: "zeros", aten.zeros_like: "zeros_like", aten.ones_like: "ones_like", aten.tril: "tril", aten.triu: "triu",
    aten.logical_not: "not", aten.bitwise_not: "not",
    aten._assert_tensor_metadata: "meta", aten.sym_size: "meta", aten.sym_stride: "meta",
    aten.sym_numel: "meta",
}

# ops whose trailing positional arguments are varargs (x.permute(0, 2, 1, 3), x.view(2, 3, -1))
_VARARGS = {"permute": "dims", "expand": "sizes", "reshape": "shape", "new_ones": "sizes", "ones": "sizes",
            "zeros": "sizes"}

# keyword spellings of canonical argument names, per op (torch.baddbmm(bias, batch1=q, batch2=kT))
_KWARGS = {
    "matmul": {"input": "a", "self": "a", "other": "b", "mat2": "b"},
    "baddbmm": {"input": "bias", "self": "bias", "batch1": "a", "batch2": "b"},
    "sdpa_efficient": {"attn_bias": "attn_mask"},
}

# canonical names that are the same op under two signatures
_ALIASES = {"softmax_f": "softmax", "softmax_aten": "softmax", "dropout_t": "dropout",
            "sdpa_cpu": "sdpa", "sdpa_efficient": "sdpa", "sdpa_flash": "sdpa"}

@dataclass(frozen=True)
class Call:
    """A node seen through the table: canonical ``name`` and arguments bound by name."""

    name: str
    args: dict
    node: Node

    def get(self, key: str, default: Any = None) -> Any:
        return self.args.get(key, default)


def _name_of(node: Node) -> Optional[str]:
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _ATEN.get(target.overloadpacket)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _ATEN.get(target)
    return _FUNCTIONS.get(target)


def canonical(node: Any) -> Optional[Call]:
    """The canonical form of ``node``, or None when the table does not know its target."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        if (node.target is builtins.getattr and len(node.args) == 2 and node.args[1] == "mT") \
                or node.target is aten.mT.default:
            return Call("transpose", {"input": node.args[0], "dim0": -2, "dim1": -1}, node)
        if (node.target is builtins.getattr and len(node.args) == 2 and node.args[1] == "T") \
                or node.target is aten.numpy_T.default:
            # x.T reverses ALL dims (the last two only at rank 2)
            val = example(node.args[0])
            if val is None:
                return None
            return Call("permute", {"input": node.args[0], "dims": tuple(reversed(range(val.dim())))}, node)
        if node.target is builtins.getattr and len(node.args) == 2 and node.args[1] in ("shape", "dtype", "device"):
            return Call("meta", {"input": node.args[0]}, node)
        if node.target in (torch.einsum, getattr(torch.functional, "einsum", None)) or node.target is aten.einsum.default:
            return _einsum(node)
    name = _name_of(node)
    if name is None:
        return None
    if name == "reshape":
        folded = _decomposed_matmul(node)
        if folded is not None:
            return folded
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
    aliases = _KWARGS.get(name, {})
    for key, value in node.kwargs.items():
        key = aliases.get(key, key)
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


# -- aten's decomposition of a batched matmul ------------------------------------------------
def _merged_source(node: Any) -> Optional[Node]:
    """``x`` when ``node`` is ``view(expand(x))`` (or ``view(x)``, a clone in between) merging x's leading dims into one
    batch dim with the last two dims unchanged and no real broadcast; else None."""
    call = _simple(node, "reshape")
    if call is None:
        return None
    src = call.get("input")
    copy = _simple(src, "contiguous")   # view(clone(expand(x))) when x is not contiguous
    if copy is not None:
        src = copy.get("input")
    inner = _simple(src, "expand")
    if inner is not None:
        a, b = example(inner.get("input")), example(src)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            return None  # a real broadcast: not a plain merge
        src = inner.get("input")
    sv, ov = example(src), example(node)
    if sv is None or ov is None or sv.dim() < 3 or ov.dim() != 3:
        return None
    if tuple(sv.shape[-2:]) != tuple(ov.shape[-2:]) or sv.numel() != ov.numel():
        return None
    return src


def _simple(node: Any, name: str) -> Optional[Call]:
    if not isinstance(node, Node):
        return None
    n = _name_of(node)
    if n != name:
        return None
    args = list(node.args)
    bound = {"input": args[0] if args else node.kwargs.get("self", node.kwargs.get("input"))}
    return Call(name, bound, node)


def _decomposed_matmul(node: Node) -> Optional[Call]:
    """``view(bmm(view(expand(a)), view(expand(b))), a.shape[:-1] + b.shape[-1:])`` -> matmul(a, b)."""
    bmm = node.args[0] if node.args else None
    if not isinstance(bmm, Node) or _name_of(bmm) != "matmul" or len(bmm.users) != 1:
        return None
    if not isinstance(bmm.target, torch._ops.OpOverload) or bmm.target.overloadpacket is not aten.bmm:
        return None
    a, b = (_merged_source(x) for x in bmm.args[:2])
    av, bv, out = example(a), example(b), example(node)
    if av is None or bv is None or out is None or av.dim() != bv.dim() or out.dim() != av.dim():
        return None
    if tuple(out.shape) != tuple(av.shape[:-1]) + (bv.shape[-1],) or tuple(av.shape[:-2]) != tuple(bv.shape[:-2]):
        return None
    return Call("matmul", {"a": a, "b": b}, node)


def example(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor recorded for ``node`` (``meta['example_value']`` or ``meta['val']``), if any."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


_CONSTANT_MAKERS = ("scalar_tensor", "full", "new_full", "full_like")


def constant_number(value: Any) -> Optional[float]:
    """``value`` as a Python float if it is a literal number or a tensor filled with one literal
    (``torch.tensor(c)``, ``torch.full([], c)``, ``scalar_tensor(c)``, ``x.new_full(.., c)``,
    ``full_like(x, c)``, possibly cast), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, Node):
        return None
    if value.op == "call_function" and value.target in (torch.tensor, torch.as_tensor):
        if value.args and isinstance(value.args[0], (int, float)) and not isinstance(value.args[0], bool):
            return float(value.args[0])
        return None
    call = canonical(value)
    if call is None:
        return None
    if call.name == "cast":
        return constant_number(call.get("input"))
    if call.name == "scalar_tensor":
        return constant_number(call.get("value"))
    if call.name in _CONSTANT_MAKERS:
        return constant_number(call.get("fill_value"))
    return None


def reads_only_metadata(user: Node, source: Node) -> bool:
    """True when ``user`` reads only the dtype / shape / device of ``source`` (``x.type_as(source)``,
    ``m.expand_as(source)``, ``source.size()``, ``aten._assert_tensor_metadata``...), so it is not
    an escape of ``source``'s values."""
    call = canonical(user)
    if call is None:
        if user.op == "call_function" and user.target in (torch.Tensor.size, torch.Tensor.dim):
            return True
        return False
    if call.name == "meta":
        return True
    if call.name == "cast":
        # x.type_as(source) / x.to(source): source only gives a dtype (and device)
        others = [a for a in list(user.args[1:]) + list(user.kwargs.values()) if a is source]
        return bool(others) and user.args[0] is not source
    if call.name == "expand_as":
        return call.get("other") is source and call.get("input") is not source
    if call.name in ("full_like", "zeros_like", "ones_like", "new_ones", "new_full"):
        return True
    return False
