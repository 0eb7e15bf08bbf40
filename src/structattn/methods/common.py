"""What the methods share: size arithmetic, SDPA mask semantics, softmax with SDPA's handling of
non-finite logits, block helpers, and two helpers of the float64 reference implementations.

Mask semantics (every method, every path; see docs/architecture.md): an ``attn_mask`` follows
``F.scaled_dot_product_attention``: a bool tensor (True = keep, False a hard mask) or an additive
float tensor, broadcastable to ``[B, H, Nq, Nk]``. Float values are biases added to the scores as
they are (a row whose keys all carry -1e4 or ``finfo.min`` is an ordinary softmax row); only
``MASKED`` (-inf) is a hard mask. ``is_causal`` is SDPA's top-left aligned causal mask (query i
sees keys j <= i). A query row with no finite logit gets output 0.

Softmax rows (``softmax_and_lse``): a row whose logits are all -inf gets probabilities 0,
log-sum-exp -inf and zero gradients (torch 2.13 SDPA's fully masked row); NaN and +inf are not
special (a NaN logit, or a +inf one through ``inf - inf``, makes its row NaN, as in SDPA); finite
logits are used as they are, however negative.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Union

import sympy
import torch
import torch.nn.functional as F

#: an int size, or a sympy expression of symbolic sizes (dynamic shapes)
Dim = Union[int, sympy.Expr]

#: the one hard mask value: a logit or bias of -inf gets weight exactly 0
MASKED = float("-inf")
#: no method uses this (a finite bias is a bias). Two heuristics that must recognise padding
#: written as a finite fill (``finfo.min``, -1e9, -1e4) treat additive values at or below it as
#: masked: the dead-row repair (lowering/dead_rows.py) and calibrate's padded query rows.
FILL_MASKED_AT = -1e4


# --------------------------------------------------------------------------------------------
# sizes (ints or sympy expressions)
# --------------------------------------------------------------------------------------------
def is_symbolic(*xs) -> bool:
    """True when any of ``xs`` is a sympy expression."""
    return any(isinstance(x, sympy.Basic) for x in xs)


def ceil_div(a: Dim, b: Dim) -> Dim:
    """ceil(a / b) for ints or sympy expressions."""
    if is_symbolic(a, b):
        return sympy.ceiling(sympy.sympify(a) / b)
    return -(-a // b)


def ceil_sqrt(n: Dim) -> Dim:
    """ceil(sqrt(n)) for ints or sympy expressions."""
    if is_symbolic(n):
        return sympy.ceiling(sympy.sqrt(n))
    r = math.isqrt(n)
    return r if r * r == n else r + 1


def sym_min(a: Dim, b: Dim) -> Dim:
    """min(a, b) for ints or sympy expressions."""
    if is_symbolic(a, b):
        return sympy.Min(a, b)
    return min(a, b)


def same_size(a: Dim, b: Dim) -> bool:
    """Whether two sizes are provably equal (sympy expressions compared symbolically)."""
    if is_symbolic(a, b):
        return sympy.simplify(sympy.sympify(a) - b) == 0
    return a == b


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 runs Triton kernels on the CPU (no triton import needed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    """G = H / Hk, the query heads per key/value head; ValueError when Hk does not divide H."""
    h, hk = q.shape[1], k.shape[1]
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    return h // hk


class Sizes(NamedTuple):
    """The sizes of one attention call: q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv];
    G = H / Hk query heads per key/value head."""

    B: int
    H: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    G: int


def sizes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Sizes:
    """``Sizes`` of q, k, v; ValueError when Hk does not divide H."""
    B, H, Nq, D = q.shape
    return Sizes(B, H, k.shape[1], Nq, k.shape[2], D, v.shape[3], check_heads(q, k))


def pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad dim -2 of ``t`` to length ``n`` (contiguous; no copy when already so)."""
    if t.shape[-2] == n:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(*t.shape[:-2], n - t.shape[-2], t.shape[-1])], dim=-2)


def block_sums(x: torch.Tensor, block: int, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sums of consecutive ``block`` rows of ``x`` [..., N, E] -> [..., ceil(N/block), E], rows
    weighted by ``w`` [..., N] (broadcast against x's leading dims) when given. No padded copy."""
    n, e = x.shape[-2], x.shape[-1]
    full, rem = n // block, n % block
    parts = []
    for lo, nb, bs in ((0, full, block), (full * block, 1 if rem else 0, rem)):
        if nb == 0:
            continue
        xs = x[..., lo:lo + nb * bs, :].reshape(*x.shape[:-2], nb, bs, e)
        if w is None:
            parts.append(xs.sum(-2))
        else:
            ws = w[..., lo:lo + nb * bs].reshape(*w.shape[:-1], nb, 1, bs)
            parts.append((ws @ xs).squeeze(-2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def as_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    """``attn_mask`` viewed as 4-D ``[B|1, H|1, Nq|1, Nk|1]`` by prepending size-1 dims (SDPA's
    broadcasting), e.g. ``[Nk]`` -> ``[1, 1, 1, Nk]``. A view, never a copy.

    Raises ValueError for a mask with more than 4 dims (it cannot broadcast to [B, H, Nq, Nk]).
    """
    if attn_mask.dim() > 4:
        raise ValueError(
            f"attn_mask must have at most 4 dims (broadcastable to [B, H, Nq, Nk]); got shape "
            f"{tuple(attn_mask.shape)}"
        )
    return attn_mask[(None,) * (4 - attn_mask.dim())]


def as_additive(attn_mask: Optional[torch.Tensor], dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """The mask as an additive float tensor (0 keep, ``MASKED`` drop; floats cast), or None."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
        return torch.where(attn_mask, zero, torch.tensor(MASKED, dtype=dtype, device=attn_mask.device))
    return attn_mask.to(dtype)


def causal_keep(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Bool [Nq, Nk] keep mask of SDPA's ``is_causal`` (top-left aligned)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def key_range(q0: int, q1: int, nk: int, is_causal: bool, mods) -> tuple[int, int]:
    """The keys ``[lo, hi)`` that queries ``q0 .. q1-1`` can see under ``is_causal`` and the window
    of ``mods`` (a ``ScoreMods``)."""
    lo, hi = 0, nk
    if mods.window_left >= 0:
        lo = max(0, q0 - mods.window_left)
    if mods.window_right >= 0:
        hi = min(nk, q1 - 1 + mods.window_right + 1)
    if is_causal:
        hi = min(hi, q1)
    return lo, max(lo, hi)


def is_key_padding(attn_mask: Optional[torch.Tensor]) -> bool:
    """True when the mask does not vary along queries (it has no query axis, or one of size 1)."""
    return attn_mask is None or attn_mask.dim() < 2 or attn_mask.shape[-2] == 1


def key_padding_bias(attn_mask: Optional[torch.Tensor], nk: int, nk_pad: int, dtype: torch.dtype,
                     device: torch.device, what: str) -> Optional[torch.Tensor]:
    """A key-padding mask as an additive bias ``[Bm, Hm, nk_pad]`` (Bm in {1, B}, Hm in {1, H}).

    Bool masks become 0 / -inf; float masks are used as they are (cast to ``dtype``). Keys beyond
    ``nk`` (block padding) get -inf. Returns None when there is neither a mask nor padding. A mask
    with a query axis is accepted when all its rows are equal; otherwise ValueError naming ``what``.
    """
    bias = None
    if attn_mask is not None:
        m = as_4d(attn_mask)
        if not is_key_padding(m) and not bool((m == m[..., :1, :]).all()):
            raise ValueError(
                f"{what} supports only key-padding masks (broadcastable to [B, H, 1, Nk]); got a "
                f"mask of shape {tuple(attn_mask.shape)} that varies along queries. Use method "
                f"'topk' or 'exact' for general masks."
            )
        m = m[..., 0, :]
        bias = as_additive(m.expand(m.shape[0], m.shape[1], nk), dtype)
    if nk_pad > nk:
        if bias is None:
            bias = torch.zeros(1, 1, nk, dtype=dtype, device=device)
        bias = F.pad(bias, (0, nk_pad - nk), value=MASKED)
    return bias


# --------------------------------------------------------------------------------------------
# key-only score modifications as a key-padding bias (Monarch's R-step, MRA's pooling)
# --------------------------------------------------------------------------------------------
def key_bias_terms_reason(method: str, terms: tuple, alternative: str = "use 'topk' or 'exact'") -> Optional[str]:
    """Trace-time: why ``method``, which takes score modifications only as a constant scale and a
    key bias ``bias[b, h, k]`` (per-row constants dropped: softmax ignores them; ALiBi is one),
    cannot keep the score ``terms`` (``SiteShape.terms``), or None."""
    for t in terms:
        if t.kind == "softcap":
            return (f"{method} cannot apply soft-capping ({t.label()}): it takes the logits only as "
                    f"scale * q.k plus a key-only bias; {alternative}")
        if t.kind == "bias" and t.form != "key_only":
            shown = f" `{t.text}`" if t.text else ""
            return (f"{method} takes only key-only biases (of batch, head and key position, like key "
                    f"padding); got {t.label()}{shown}, which varies along queries; {alternative}")
        if t.kind == "score_mod":
            return (f"{method} cannot apply the element-wise score modification `{t.text}`: it takes only "
                    f"a constant scale and key-only biases; {alternative}")
        if t.kind == "mask" and t.form == "sliding_window":
            return f"{method} has no sliding-window form ({t.label()}); {alternative}"
    return None


def key_bias_mods_reason(method: str, mods, alternative: str = "use 'topk' or 'exact'") -> Optional[str]:
    """Run-time: why ``method`` cannot apply the ``ScoreMods`` ``mods`` as a constant scale plus a
    key bias (``fold_key_bias``), or None."""
    from ..scoremod.analysis import split_key_bias

    if mods.windowed:
        return (f"{method} has no sliding-window form (window ({mods.window_left}, {mods.window_right})); "
                f"{alternative}")
    if mods.text and _score_factor(split_key_bias(mods.text).rest) is None:
        return (f"{method} takes only a constant scale and key-only biases; score_mod {mods.text!r} is "
                f"not of that form; {alternative}")
    return None


def _score_factor(rest: str) -> Optional[float]:
    """The constant c when ``rest`` (an expression without its key bias) is ``s`` ('' -> 1.0),
    ``s * c``, ``c * s`` or ``s / c``; else None."""
    from ..scoremod.expr import BinOp, Const, Var, parse

    if not rest:
        return 1.0
    tree = parse(rest)
    if not (isinstance(tree, BinOp) and tree.op in ("*", "/")):
        return None
    pairs = [(tree.left, tree.right)] + ([(tree.right, tree.left)] if tree.op == "*" else [])
    for x, c in pairs:
        if isinstance(x, Var) and x.name == "s" and isinstance(c, Const) and not isinstance(c.value, bool):
            value = float(c.value)
            if tree.op == "*":
                return value
            return 1.0 / value if value != 0 else None
    return None


def fold_key_bias(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float, mods,
                  dtype: torch.dtype, what: str) -> tuple[Optional[torch.Tensor], float]:
    """``(attn_mask, scale)`` that give a method the logits the ``ScoreMods`` ``mods`` make: the key
    bias (``scoremod.analysis.split_key_bias``; per-row constants dropped) evaluated to
    ``[B, H, 1, Nk]`` and added to the key-padding mask as an additive bias in ``dtype``, a
    constant factor on ``s`` folded into ``scale``. ValueError naming ``what`` when ``mods`` is not
    of that form."""
    from ..scoremod.analysis import split_key_bias

    if mods.empty:
        return attn_mask, scale
    reason = key_bias_mods_reason(what, mods)
    if reason is not None:
        raise ValueError(reason)
    split = split_key_bias(mods.text)
    scale = scale * _score_factor(split.rest)
    return with_key_bias(q, k, attn_mask, split.key_bias, mods.tensors, dtype, what), scale


def with_key_bias(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], key_bias: str, tensors,
                  dtype: torch.dtype, what: str) -> Optional[torch.Tensor]:
    """The key-padding mask ``attn_mask`` plus the key bias expression ``key_bias`` (it reads b, h,
    k and ``tensors``, no score and no query) evaluated to ``[B, H, 1, Nk]``, as one additive mask
    in ``dtype`` (masked keys stay -inf); ``attn_mask`` itself when ``key_bias`` is ''."""
    from ..scoremod.evaluate import apply_score_mod

    if not key_bias:
        return attn_mask
    B, H, Nk = q.shape[0], q.shape[1], k.shape[2]
    dev = q.device
    bias = apply_score_mod(
        key_bias, torch.zeros(B, H, 1, Nk, dtype=dtype, device=dev),
        b=torch.arange(B, device=dev).view(B, 1, 1, 1), h=torch.arange(H, device=dev).view(1, H, 1, 1),
        q=0, k=torch.arange(Nk, device=dev).view(1, 1, 1, Nk), tensors=tensors)
    padding = key_padding_bias(attn_mask, Nk, Nk, dtype, dev, what)
    if padding is not None:
        padding = padding.unsqueeze(2)
        # masked keys take the mask itself: no gradient reaches the expression's tensors through
        # them (a method's backward may hold NaN at keys of no weight, and where() drops it)
        bias = torch.where(padding == MASKED, padding, bias + padding)
    return bias


# --------------------------------------------------------------------------------------------
# softmax with SDPA's non-finite rows (module docstring)
# --------------------------------------------------------------------------------------------
def row_shift(m: torch.Tensor) -> torch.Tensor:
    """The row max used as the stabilising shift, with -inf (a row of no finite logit) -> 0 so
    that ``exp(x - shift)`` is 0 there instead of NaN; NaN and +inf stay (they must propagate)."""
    return m.masked_fill(m == MASKED, 0.0)


class _SoftmaxLse(torch.autograd.Function):
    """``(softmax(x), logsumexp(x))`` over the last dim, sharing one exp pass (in place inside the
    forward); the backward is the usual one (d lse / dx = softmax). Rows of all -inf give 0 / -inf."""

    @staticmethod
    def forward(ctx, x):
        m = row_shift(x.amax(-1, keepdim=True))
        p = torch.sub(x, m)
        p.exp_()
        s = p.sum(-1, keepdim=True)
        lse = (m + torch.log(s)).squeeze(-1)            # log(0) = -inf for a row of all -inf
        p.div_(s.masked_fill(s == 0, 1.0))
        ctx.save_for_backward(p)
        return p, lse

    @staticmethod
    def backward(ctx, gp, glse):
        (p,) = ctx.saved_tensors
        g = gp if gp is not None else torch.zeros_like(p)
        inner = (g * p).sum(-1, keepdim=True)
        if glse is not None:
            inner = inner - glse.unsqueeze(-1)
        return p * (g - inner)


def softmax_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax and log-sum-exp over the last dim (see the module docstring for non-finite rows)."""
    return _SoftmaxLse.apply(x)


def softmax_lse(logits: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_and_lse`` along any ``dim``: probabilities (same shape) and lse (``dim`` removed)."""
    if dim in (-1, logits.dim() - 1):
        return softmax_and_lse(logits)
    p, lse = softmax_and_lse(logits.movedim(dim, -1))
    return p.movedim(-1, dim), lse


def safe_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``; a row of all -inf gives zeros (SDPA's fully-masked-row behaviour)."""
    return softmax_lse(logits, dim)[0]


# --------------------------------------------------------------------------------------------
# float64 reference helpers (the methods' naive.py)
# --------------------------------------------------------------------------------------------
def key_bias_1d(attn_mask: Optional[torch.Tensor], B: int, H: int, b: int, h: int, nk: int) -> torch.Tensor:
    """The float64 additive per-key bias (-inf for dropped keys) of a key-padding mask at (b, h)."""
    if attn_mask is None:
        return torch.zeros(nk, dtype=torch.float64)
    row = as_4d(attn_mask).expand(B, H, -1, nk)[b, h, 0]
    if row.dtype == torch.bool:
        return torch.where(row, 0.0, MASKED).double()
    return row.double()


def key_only_mask(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], mods) -> Optional[torch.Tensor]:
    """For the float64 references of methods that take key-only biases: the key-padding mask plus
    the logits the ``ScoreMods`` ``mods`` make of zero scores on query row 0, float64
    [B, H, 1, Nk] (row 0 stands for every row: exact for a bias of b, h, k plus per-row
    constants, however it is spelled). ValueError for a window or any other expression."""
    from ..scoremod.analysis import split_key_bias

    if mods.windowed or (mods.text and not split_key_bias(mods.text).exact_key_only):
        raise ValueError(f"the reference takes only key-only biases, not {mods.describe()}")
    if not mods.text:
        return attn_mask
    B, H, Nk = q.shape[0], q.shape[1], k.shape[2]
    bias = mods.logits_grid(torch.zeros(B, H, 1, Nk, dtype=torch.float64), torch.zeros(1, dtype=torch.long)).double()
    if attn_mask is not None:
        bias = bias + as_additive(as_4d(attn_mask)[..., :1, :], torch.float64)
    return bias


def per_head(head_fn, q, k, v, attn_mask, *args) -> torch.Tensor:
    """Apply a single-head float64 oracle ``head_fn(q, k, v, key_bias, *args) -> [Nq, Dv]`` to every
    (batch, query head), with the query head's kv head (GQA) and its per-key mask bias."""
    B, H, Nq, _ = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            bias = key_bias_1d(attn_mask, B, H, b, h, k.shape[2])
            out[b, h] = head_fn(q[b, h].double(), k[b, h // G].double(), v[b, h // G].double(), bias, *args)
    return out
