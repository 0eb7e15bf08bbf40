"""One ``torch.library`` op per registered method, generated from the method's ``Params``.

``structattn::<name>_attention(q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, dead_rows,
score_mod, score_tensors, window_left, window_right, *params)`` is an opaque op to dynamo and inductor (inductor calls it as an extern kernel), with a fake impl for
symbolic shapes and an autograd formula that calls ``structattn::<name>_attention_backward``. The
op body dispatches at run time (``run_method``): sequences shorter than ``min_seq_len`` go exact;
CUDA tensors go to the method's Triton module (``Method.kernel_module``) when it has one and its
run-time ``supports`` accepts the inputs (``impl="auto"``); everything else runs the method's
plain-torch ``forward``. Exact sites without score modifications always run SDPA (whatever
``impl``); exact sites with some use exact's Triton kernel like any method. The exact fallback of
a short sequence (``min_seq_len``) never raises for ``impl="triton"``: it dispatches as "auto". A method with ``takes_tensors`` (see ``methods.base``) has one more
argument, ``Tensor[] tensors`` (its per-site constants, e.g. fitted weights), handed to its
``forward`` / kernel as trailing positional arguments; they get no gradient. The op contract
is in docs/architecture.md.

We use ``Library.define`` + a CompositeExplicitAutograd impl rather than ``triton_op``: the body
branches on device and on ``min_seq_len`` at run time, which a traced ``triton_op`` cannot do on
the CPU, and the kernels are launched from the impl like any extern kernel.
"""
from __future__ import annotations

import importlib
import typing
from typing import Any, Callable, Optional, Union

import torch

from ..methods import REGISTRY, Method, get_method
from ..methods.base import NO_MODS, ScoreMods, empty_result, takes_mods
from ..methods.common import interpreting
from ..scoremod.expr import MAX_TENSORS, parse, tensors as tensors_read
from .dead_rows import apply_dead_rows, parse_program

NAMESPACE = "structattn"
IMPLS = ("auto", "triton", "torch")

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_DEFINED: dict[str, Any] = {}

_COMMON_ARGS = (
    "Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, bool is_causal, "
    "int min_seq_len, str impl, str dead_rows, str score_mod, Tensor[] score_tensors, int window_left, "
    "int window_right"
)


def _schema_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _schema_type(inner[0]) + "?"
    return {int: "int", float: "float", bool: "bool", str: "str"}[hint]


def _param_schema(method: Method) -> str:
    hints = typing.get_type_hints(method.Params)
    schema = "".join(f", {_schema_type(hints[f.name])} {f.name}" for f in method.param_fields())
    return schema + (", Tensor[] tensors" if method.takes_tensors else "")


def _unpack(method: Method, pvalues: tuple) -> tuple[Any, tuple]:
    """The op's trailing arguments as (params, constant tensors)."""
    if method.takes_tensors:
        return method.Params(*pvalues[:-1]), tuple(pvalues[-1])
    return method.Params(*pvalues), ()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], what: str) -> None:
    """Raise ValueError naming ``what`` when q/k/v/mask do not have SDPA's layout."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{what}: q, k, v must be 4-D [batch, heads, seq, head_dim]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"{what}: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(f"{what}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    hq, hk = q.shape[1], k.shape[1]
    if hk != v.shape[1] or (hq % hk if hk else hq):
        raise ValueError(
            f"{what}: key/value heads must be equal and divide query heads; got q {q.shape[1]}, "
            f"k {k.shape[1]}, v {v.shape[1]}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{what}: k and v sequence lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{what}: q and k head_dim differ: {q.shape[3]} vs {k.shape[3]}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"{what}: attn_mask must be bool (True = keep) or float (additive); got {attn_mask.dtype}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), target)
        except RuntimeError:
            raise ValueError(
                f"{what}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"[B, H, Nq, Nk] = {list(target)}"
            ) from None


def check_mods(mods: ScoreMods, what: str) -> None:
    """Raise ValueError naming ``what`` when the score modifications are malformed: an expression
    outside the language (``scoremod.expr``), more than MAX_TENSORS tensors or a read of a tensor
    that was not given, a window bound below -1."""
    if len(mods.tensors) > MAX_TENSORS:
        raise ValueError(f"{what}: {len(mods.tensors)} score_tensors; at most {MAX_TENSORS} are allowed")
    if mods.text:
        try:
            read = tensors_read(parse(mods.text))
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if read and max(read) >= len(mods.tensors):
            raise ValueError(f"{what}: score_mod {mods.text!r} reads t{max(read)} but only {len(mods.tensors)} "
                             f"score_tensors were given")
    elif mods.tensors:
        raise ValueError(f"{what}: {len(mods.tensors)} score_tensors given without a score_mod expression")
    for side in ("window_left", "window_right"):
        value = getattr(mods, side)
        if value < -1:
            raise ValueError(f"{what}: {side} must be -1 (unbounded) or >= 0; got {value}")


def run_method(method: Method, q, k, v, attn_mask, scale: float, is_causal: bool, min_seq_len: int,
               impl: str, params: Any, dead_rows: str = "", mods: Optional[ScoreMods] = None,
               tensors: tuple = ()) -> torch.Tensor:
    """Run ``method`` on concrete tensors, choosing exact / Triton / plain torch as documented,
    then give fully masked query rows eager's answer when ``dead_rows`` says how (see dead_rows.py).
    ``tensors``: the site's constant tensors (methods with ``takes_tensors``)."""
    mods = NO_MODS if mods is None else mods
    if k.shape[-2] < min_seq_len:
        method, params, tensors = get_method("exact"), get_method("exact").Params(), ()
        impl = "auto" if impl == "triton" else impl   # the fallback is not the kernel that was asked for
    kernel = _pick_kernel(method, q, k, v, attn_mask, is_causal, impl, params, mods)
    if kernel is not None:
        if mods.empty:
            out = kernel(q, k, v, attn_mask, scale, is_causal, params, *tensors)
        else:
            out = kernel(q, k, v, attn_mask, scale, is_causal, params, *tensors, mods=mods)
    else:
        out = method.run(q, k, v, attn_mask, scale, is_causal, params, mods, *tensors)
    return apply_dead_rows(out, q, k, v, attn_mask, scale, is_causal, dead_rows, mods)


def _pick_kernel(method, q, k, v, attn_mask, is_causal, impl, params, mods=NO_MODS):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "torch" or (method.name == "exact" and mods.empty):   # SDPA has its own kernels everywhere
        return None
    if impl == "auto" and not q.is_cuda:
        return None
    return get_kernel(method, q, k, v, attn_mask, is_causal, params, strict=impl == "triton", mods=mods)


def get_kernel(method: Method | str, q, k, v, attn_mask, is_causal: bool, params: Any, *,
               strict: bool, mods: Optional[ScoreMods] = None) -> Optional[Callable]:
    """The ``forward`` of ``method``'s Triton module for these inputs: None (``strict=False``) or a
    ValueError saying why (``strict=True``, ``impl="triton"``) when the method has no Triton module,
    triton does not import, the tensors are on the CPU without TRITON_INTERPRET=1, the module takes
    no score modifications and ``mods`` holds some, or the module's run-time ``supports(q, k, v,
    attn_mask, is_causal, params[, mods])`` refuses the inputs."""
    method = get_method(method) if isinstance(method, str) else method
    mods = NO_MODS if mods is None else mods

    def fail(reason: str):
        if strict:
            raise ValueError(f"impl='triton' for method {method.name!r}: {reason}")
        return None

    if method.kernel_module is None:
        return fail("no Triton kernel exists for this method")
    if not q.is_cuda and not interpreting():
        return fail("tensors are on the CPU; set TRITON_INTERPRET=1 to run the kernels there, or use impl='torch'")
    try:
        module = importlib.import_module(method.kernel_module)
    except ImportError as exc:  # triton missing or too old
        return fail(f"triton could not be imported ({exc})")
    if mods.empty:
        reason = module.supports(q, k, v, attn_mask, is_causal, params)
    elif not (takes_mods(module.forward) and takes_mods(module.supports)):
        reason = f"the kernel takes no score modifications ({mods.describe()})"
    else:
        reason = module.supports(q, k, v, attn_mask, is_causal, params, mods=mods)
    if reason is not None:
        return fail(reason)
    return module.forward


def _define(method: Method) -> Any:
    name = f"{method.name}_attention"
    pschema = _param_schema(method)
    _LIB.define(f"{name}({_COMMON_ARGS}{pschema}) -> Tensor")
    # score_grads: bit i set = return the gradient of score_tensors[i] (the others get zeros)
    _LIB.define(f"{name}_backward(Tensor grad_out, int score_grads, {_COMMON_ARGS}{pschema}) "
                f"-> (Tensor, Tensor, Tensor, Tensor[])")
    qualname = f"{NAMESPACE}::{name}"
    what = qualname

    def forward_impl(q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, dead_rows, score_mod, score_tensors,
                     window_left, window_right, *pvalues):
        check_inputs(q, k, v, attn_mask, what)
        mods = ScoreMods(score_mod, tuple(score_tensors), window_left, window_right)
        check_mods(mods, what)
        empty = empty_result(q, k, v)   # an empty dimension: SDPA's result, whatever the method
        if empty is not None:
            return empty
        params, tensors = _unpack(method, pvalues)
        out = run_method(method, q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, params, dead_rows, mods,
                         tensors)
        # the fake impl promises a contiguous [B, H, Nq, Dv] tensor (inductor checks strides)
        return out.to(q.dtype).contiguous()

    def forward_fake(q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, dead_rows, score_mod, score_tensors,
                     window_left, window_right, *pvalues):
        check_inputs(q, k, v, attn_mask, what)
        check_mods(ScoreMods(score_mod, tuple(score_tensors), window_left, window_right), what)
        parse_program(dead_rows)
        return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    def backward_impl(grad, score_grads, q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, dead_rows,
                      score_mod, score_tensors, window_left, window_right, *pvalues):
        wanted = [bool(score_grads >> i & 1) and t.is_floating_point() for i, t in enumerate(score_tensors)]
        if empty_result(q, k, v) is not None:  # the output is empty or constant zeros
            return tuple(t.new_zeros(t.shape) for t in (q, k, v)) + ([t.new_zeros(t.shape) for t in score_tensors],)
        params, consts = _unpack(method, pvalues)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            tensors = [t.detach().requires_grad_(True) if w else t for t, w in zip(score_tensors, wanted)]
            mods = ScoreMods(score_mod, tuple(tensors), window_left, window_right)
            # The backward differentiates the plain-torch formulation (exactly what the CPU path
            # computes; on CUDA the same math as the kernel, recomputed by torch).
            out = run_method(method, *leaves, attn_mask, scale, is_causal, min_seq_len, "torch", params, dead_rows,
                             mods, consts)
            inputs = leaves + [t for t, w in zip(tensors, wanted) if w]
            grads = list(torch.autograd.grad(out, inputs, grad.to(out.dtype), allow_unused=True))
        gq, gk, gv = (t.new_zeros(t.shape) if g is None else g.to(t.dtype).contiguous()
                      for g, t in zip(grads[:3], (q, k, v)))
        rest = iter(grads[3:])
        gt = []
        for t, w in zip(score_tensors, wanted):
            g = next(rest) if w else None
            gt.append(t.new_zeros(t.shape) if g is None else g.to(t.dtype).contiguous())
        return gq, gk, gv, gt

    def backward_fake(grad, score_grads, q, k, v, attn_mask, scale, is_causal, min_seq_len, impl, dead_rows,
                      score_mod, score_tensors, window_left, window_right, *pvalues):
        return tuple(t.new_empty(t.shape) for t in (q, k, v)) + ([t.new_empty(t.shape) for t in score_tensors],)

    _LIB.impl(name, forward_impl, "CompositeExplicitAutograd")
    _LIB.impl(f"{name}_backward", backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, forward_fake, lib=_LIB)
    torch.library.register_fake(f"{qualname}_backward", backward_fake, lib=_LIB)

    backward_op = getattr(getattr(torch.ops, NAMESPACE), f"{name}_backward").default

    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask = inputs[:4]
        score_tensors = inputs[10]
        if ctx.needs_input_grad[3]:
            raise NotImplementedError(
                f"{qualname}: no gradient for attn_mask (a mask that requires grad, e.g. a learned "
                f"bias); keep this layer exact with options['layers'] = {{'<layer>': 'exact'}}"
            )
        ctx.score_grads = sum(1 << i for i, t in enumerate(score_tensors) if t.requires_grad)
        ctx.n_tensors = len(score_tensors)
        ctx.save_for_backward(q, k, v, attn_mask, *score_tensors)
        ctx.rest = inputs[4:10], inputs[11:]

    def backward(ctx, grad):
        q, k, v, attn_mask, *score_tensors = ctx.saved_tensors
        before, after = ctx.rest
        gq, gk, gv, gt = backward_op(grad, ctx.score_grads, q, k, v, attn_mask, *before, score_tensors, *after)
        tensor_grads = [g if ctx.score_grads >> i & 1 else None for i, g in enumerate(gt)]
        # no gradient for the parameters, nor for a method's constant tensors (a list input gets a list)
        rest = tuple([None] * len(r) if isinstance(r, (list, tuple)) else None for r in after)
        return (gq, gk, gv, None) + (None,) * 6 + (tensor_grads,) + rest

    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def op_for(method: Method | str) -> Any:
    """The ``OpOverload`` of ``structattn::<method>_attention``, defining it on first use."""
    method = get_method(method) if isinstance(method, str) else method
    if method.name not in _DEFINED:
        _DEFINED[method.name] = _define(method)
    return _DEFINED[method.name]


def register_all() -> None:
    """Define the ops of every registered method (called once when structattn is imported)."""
    for method in REGISTRY.values():
        op_for(method)


def op_args(method: Method, params: Any, tensors: Any = ()) -> tuple:
    """The op's trailing arguments in schema order: the parameters, then (methods with
    ``takes_tensors`` only) the list of constant tensors (or FX nodes)."""
    args = tuple(getattr(params, f.name) for f in method.param_fields())
    return args + ((list(tensors),) if method.takes_tensors else ())


def mod_args(mods: Optional[ScoreMods]) -> tuple:
    """The op's ``score_mod, score_tensors, window_left, window_right`` arguments for ``mods``."""
    mods = NO_MODS if mods is None else mods
    return mods.text, list(mods.tensors), int(mods.window_left), int(mods.window_right)
