"""The spellings the pass fuzzer composes (tests/passes/test_fuzz.py): what a draw holds, how a
draw becomes a function of its input tensors, and the hypothesis strategies that draw them.

A draw is plain data (frozen dataclasses), so a failing example prints as a reproducer:
``Spelling(draw).build()`` gives ``(fn, args, names)`` with ``fn(*args)`` the spelled attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

FMIN = torch.finfo(torch.float32).min
FILLS = (float("-inf"), FMIN, -1e9, -1e4)
SCALES = (0.125, 0.3, 0.5, 2.0, 1 / math.sqrt(8))
SET_FORMS = ("masked_fill", "where_scores", "where_inverted")
RUNTIME_SCALES = ("tensor0", "div_tensor0", "per_head")


# -- what a draw holds ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Rank of the scores (2: [N, D]; 3: [L, N, D] with L = batch; 4: [B, H, N, D])."""

    rank: int
    batch: int
    heads: int
    kv_heads: int
    nq: int
    nk: int
    d: int
    dv: int

    @property
    def lead(self) -> tuple:
        """Leading dims of the scores."""
        return {2: (), 3: (self.batch,), 4: (self.batch, self.heads)}[self.rank]


@dataclass(frozen=True)
class MaskDraw:
    """One keep mask written into the scores. ``what``: padding | causal | both (one mask, HF
    style); ``causal``: how the causal part is built; ``form``: how it is applied; ``fill``: the
    value masked entries get; ``fill_tensor``: the fill as a graph-built 0-dim tensor; ``late``:
    the padding is placed ([B, 1, 1, K]) after the where / the arithmetic, not before."""

    what: str
    causal: str = "tril"
    form: str = "masked_fill"
    fill: float = float("-inf")
    fill_tensor: bool = False
    late: bool = False
    expand_as: bool = False


@dataclass(frozen=True)
class Step:
    """One step on the scores between QK^T and softmax: ``kind`` scale | mask | bias | number."""

    kind: str
    how: str = ""
    value: float = 1.0
    term: Optional[MaskDraw] = None


@dataclass(frozen=True)
class Draw:
    """One composed attention site (or look-alike): every choice the spelled function makes."""

    shape: Shape
    seed: int
    family: str = "decomposed"        # decomposed | sdpa | channel (look-alike)
    level: str = "dynamo"             # dynamo | make_fx | export
    method: str = "exact"
    params: tuple = ()
    heads_last: bool = False          # 4-D inputs stored [B, N, H, D]
    bmm_views: bool = False           # 4-D site computed with bmm on [B*H, N, D] views
    softmax_3d: bool = False          # bmm_views: softmax taken in the [B*H, N, N] view
    score_op: str = "matmul"
    key_form: str = "transpose"
    operand_scales: tuple = ()        # (where, how, value): where in q | k | kT
    steps: tuple = ()
    padding: str = "none"             # pattern of the key padding: none | right | random | dead_sample | left
    softmax: str = "torch"
    dropout: str = "none"
    copies: tuple = ()
    output: str = "matmul"
    gqa: str = "none"                 # none | repeat_kv | repeat_interleave | enable_gqa
    baddbmm: tuple = (1.0, 1.0)       # (beta, alpha)
    sdpa_mask: str = "none"
    sdpa_scale: Optional[float] = None
    fill: float = float("-inf")       # SDPA additive masks
    poison: str = ""                  # look-alike: what makes it not an attention site

    @property
    def terms(self) -> list:
        """The draw's mask terms, in eager's order."""
        return [s.term for s in self.steps if s.kind == "mask"]


# -- building the spelled function ---------------------------------------------------------------
class Spelling:
    """Turns a Draw into ``fn(*args)`` and ``args``: the closures below read the draw at trace
    time, so the graph holds exactly the drawn ops."""

    def __init__(self, d: Draw):
        self.d, self.s = d, d.shape
        self.g = torch.Generator().manual_seed(d.seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.keep = self._keep()

    # inputs ----------------------------------------------------------------------------------
    def tensor(self, name: str, make: Callable[[], torch.Tensor]) -> str:
        """An input tensor of the spelled function (made once, by ``make``); returns its name."""
        if name not in self.tensors:
            self.tensors[name] = make()
        return name

    def randn(self, *shape) -> torch.Tensor:
        """Standard normal values from the draw's generator."""
        return torch.randn(*shape, generator=self.g)

    def uniform(self, lo: float, hi: float, *shape) -> torch.Tensor:
        """Uniform values in [lo, hi) from the draw's generator."""
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g)

    def _keep(self) -> torch.Tensor:
        """Key padding, bool [rows, Nk] (rows = batch, or 1 at rank 2): True = attend."""
        s, rows = self.s, (self.s.batch if self.s.rank > 2 else 1)
        keep = torch.ones(rows, s.nk, dtype=torch.bool)
        pattern = self.d.padding
        for r in range(rows):
            if pattern in ("right", "dead_sample"):
                keep[r, int(torch.randint(1, s.nk + 1, (), generator=self.g)):] = False
            elif pattern == "left":
                keep[r, :int(torch.randint(0, s.nk, (), generator=self.g))] = False
            elif pattern == "random":
                keep[r] = torch.rand(s.nk, generator=self.g) < 0.7
        if pattern == "dead_sample":
            keep[int(torch.randint(0, rows, (), generator=self.g))] = False
        return keep

    def qkv(self) -> tuple[str, str, str]:
        """The q, k, v inputs, in the draw's layout."""
        s = self.s
        if s.rank == 4:
            shapes = [(s.batch, s.heads, s.nq, s.d), (s.batch, s.kv_heads, s.nk, s.d), (s.batch, s.kv_heads, s.nk, s.dv)]
            if self.d.heads_last:
                shapes = [(b, n, h, x) for b, h, n, x in shapes]
        elif s.rank == 3:
            shapes = [(s.batch, s.nq, s.d), (s.batch, s.nk, s.d), (s.batch, s.nk, s.dv)]
        else:
            shapes = [(s.nq, s.d), (s.nk, s.d), (s.nk, s.dv)]
        return tuple(self.tensor(n, lambda sh=sh: self.randn(*sh)) for n, sh in zip("qkv", shapes))

    def build(self) -> tuple[Callable, list, list[str]]:
        """``(fn, args, names)``: the spelled function of its input tensors, the tensors, their names."""
        self.qkv()
        body = {"decomposed": self.decomposed, "sdpa": self.sdpa, "channel": self.channel}[self.d.family]()
        names = list(self.tensors)

        def fn(*args):
            return body(dict(zip(names, args)))

        return fn, [self.tensors[n] for n in names], names

    # layout ----------------------------------------------------------------------------------
    def place_keys(self, x: torch.Tensor) -> torch.Tensor:
        """A per-key tensor [rows, Nk] broadcast against the scores."""
        if self.s.rank == 4:
            return x[:, None, None, :]
        if self.s.rank == 3:
            return x[:, None, :]
        return x[0]   # [Nk]: broadcasts over the query axis

    def heads_in(self, x: torch.Tensor) -> torch.Tensor:
        """A [B, N, H, D] input moved to [B, H, N, D] (as models do after the projections)."""
        return x.transpose(1, 2) if self.d.heads_last else x

    def repeat(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped-query heads repeated to the query heads, in the draw's GQA spelling."""
        s = self.s
        groups = s.heads // s.kv_heads
        if groups == 1 or self.d.gqa in ("none", "enable_gqa"):
            return x
        if self.d.gqa == "repeat_interleave":
            return x.repeat_interleave(groups, dim=1)
        b, h, n, e = x.shape
        return x[:, :, None, :, :].expand(b, h, groups, n, e).reshape(b, h * groups, n, e)

    def transpose(self, k: torch.Tensor) -> torch.Tensor:
        """K^T in the draw's spelling."""
        form, r = self.d.key_form, self.s.rank
        if form in ("transpose", "before_repeat"):
            return k.transpose(-2, -1)
        if form == "transpose_pos":
            return k.transpose(r - 1, r - 2)
        if form == "mT":
            return k.mT
        if form == "T":
            return k.T
        if form == "permute":
            return k.permute(*range(r - 2), r - 1, r - 2)
        raise AssertionError(form)

    # the decomposed family ---------------------------------------------------------------------
    def operand_scale(self, where: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` times the draw's constant scales on operand ``where`` (q, k or kT)."""
        for w, how, value in self.d.operand_scales:
            if w == where:
                x = x * value if how == "mul" else x / value
        return x

    def decomposed(self) -> Callable:
        """softmax(QK^T)V written out op by op (the body of ``fn``)."""
        d, s = self.d, self.s
        steps = [self.step(st_) for st_ in d.steps]
        poison = d.poison
        hm = self.tensor("head_mask", lambda: self.uniform(0.0, 1.0, *[x if i == 1 else 1 for i, x in enumerate(s.lead)], 1, 1)) \
            if poison == "head_mask" else None
        weights = self.tensor("weights", lambda: self.randn(s.nq, s.nk)) if poison == "matrix_scale" else None
        keep_name = self.tensor("keep", lambda: self.keep) if poison == "small_fill" else None
        site = d.seed % (len(steps) + 1)  # where a score poison goes among the steps
        if d.score_op == "baddbmm":   # ALiBi-like bias of the baddbmm: per key, or per (query, key)
            rows = s.batch * s.heads if d.bmm_views else s.batch
            self.tensor("alibi", lambda: self.randn(rows, 1 if d.seed % 2 else s.nq, s.nk))

        def body(t):
            q, k, v = (t[n] for n in "qkv")
            if s.rank == 4 and d.heads_last:
                q, v = q.transpose(1, 2), v.transpose(1, 2)
                if d.key_form == "permute_bnhd":
                    k = k.permute(0, 2, 3, 1)    # [B, N, H, D] -> [B, H, D, N]: K^T in one permute
                else:
                    k = k.transpose(1, 2)
            q = self.operand_scale("q", q)
            v = self.repeat(v)
            if d.key_form == "permute_bnhd":
                kt = self.repeat(k)
            elif d.key_form == "before_repeat":
                kt = self.repeat(self.transpose(self.operand_scale("k", k)))
            elif d.key_form == "einsum":
                kt = self.repeat(self.operand_scale("k", k))   # contracted by the einsum itself
            else:
                kt = self.transpose(self.repeat(self.operand_scale("k", k)))
            kt = self.operand_scale("kT", kt)
            x = self.scores(q, kt, t)
            for i, step in enumerate(steps):
                if poison in SCORE_POISONS and i == site:
                    x = self.poison_scores(x, t, weights, keep_name)
                x = step(x, t)
            if poison in SCORE_POISONS and site == len(steps):
                x = self.poison_scores(x, t, weights, keep_name)
            scores = x
            if d.bmm_views and d.softmax_3d:
                x = x.reshape(s.batch * s.heads, s.nq, s.nk)
            p = self.softmax(x)
            for copy in d.copies:
                p = p.clone() if copy == "clone" else p.contiguous()
            p = self.dropout(p)
            if poison == "head_mask":
                p = p * t[hm]
            out = self.pv(p, v)
            if s.rank == 4 and d.heads_last:
                out = out.transpose(1, 2)
            if poison == "return_scores":
                return out, scores
            if poison == "return_probs":
                return out, p
            if poison == "reuse_scores":
                return out + scores.amax()
            if poison == "reuse_probs":
                return out + p.nan_to_num().sum()
            return out

        return body

    def scores(self, q, kt, t) -> torch.Tensor:
        """QK^T, in the site's layout (bmm on [B*H, ..] views viewed back to [B, H, ..])."""
        d, s = self.d, self.s
        if d.bmm_views:
            bh = s.batch * s.heads
            q3, kt3 = q.reshape(bh, s.nq, s.d), kt.reshape(bh, s.d, s.nk)
            x = self.score_product(q3, kt3, t, letters="b")
            return x.view(s.batch, s.heads, s.nq, s.nk)
        return self.score_product(q, kt, t, letters={2: "", 3: "b", 4: "bh"}[s.rank])

    def score_product(self, q, kt, t, letters: str) -> torch.Tensor:
        """The score product in the draw's op; ``letters`` are the einsum batch axes."""
        op = self.d.score_op
        if op == "matmul":
            return torch.matmul(q, kt)
        if op == "at":
            return q @ kt
        if op == "method":
            return q.matmul(kt)
        if op == "bmm":
            return torch.bmm(q, kt)
        if op == "baddbmm":
            beta, alpha = self.d.baddbmm
            return torch.baddbmm(t["alibi"], q, kt, beta=beta, alpha=alpha)
        natural = self.d.key_form == "einsum"
        kk = f"{letters}kd" if natural else f"{letters}dk"
        if op == "einsum_qk":
            return torch.einsum(f"{letters}qd,{kk}->{letters}qk", q, kt)
        if op == "einsum_kq":
            return torch.einsum(f"{kk},{letters}qd->{letters}qk", kt, q)
        raise AssertionError(op)

    def step(self, step: Step) -> Callable:
        """The closure ``(scores, tensors) -> scores`` of one step between QK^T and softmax."""
        s = self.s
        if step.kind == "scale":
            how, c = step.how, step.value
            if how == "tensor0":
                name = self.tensor("scale0", lambda: self.uniform(0.3, 1.5, ()))
                return lambda x, t: x * t[name]
            if how == "div_tensor0":
                name = self.tensor("divisor0", lambda: self.uniform(0.7, 3.0, ()))
                return lambda x, t: x / t[name]
            if how == "per_head":
                name = self.tensor("temperature", lambda: self.uniform(0.5, 1.5, s.heads, 1, 1))
                return lambda x, t: x * t[name]
            return {"mul": lambda x, t: x * c, "rmul": lambda x, t: c * x, "div": lambda x, t: x / c,
                    "imul": _imul(c)}[how]
        if step.kind == "bias":
            shape = (*s.lead[:1], *([1] * (s.rank - 2)), s.nk) if step.how == "key" else \
                    ((1, s.heads) if s.rank == 4 else s.lead) + (s.nq, s.nk)
            name = self.tensor(f"bias_{step.how}", lambda: self.randn(*shape))
            return lambda x, t: x + t[name]
        if step.kind == "number":
            shape = (*s.lead[:1], *([1] * (s.rank - 2)), s.nk) if step.value == 0 else (*s.lead[:1], *([1] * (s.rank - 3)), s.nq, s.nk)
            if step.how == "bool":
                name = self.tensor("number_bool", lambda: torch.rand(*shape, generator=self.g) < 0.5)
            else:
                name = self.tensor("number_int", lambda: torch.randint(-2, 3, shape, generator=self.g))
            return lambda x, t: x + t[name]
        return self.mask(step.term)

    def causal_keep(self, how: str, x: torch.Tensor) -> torch.Tensor:
        """The top-left causal keep mask [Q, K] of scores ``x``, built in the draw's way."""
        nq, nk = x.shape[-2], x.shape[-1]
        if how == "tril":
            return torch.tril(torch.ones(nq, nk, dtype=torch.bool, device=x.device))
        if how == "tril_method":
            return torch.ones(nq, nk, dtype=torch.bool).tril()
        i = torch.arange(nq, device=x.device)[:, None]
        j = torch.arange(nk, device=x.device).view(1, -1)
        if how == "index_le":
            return j <= i
        if how == "index_diff":
            return (i - j) >= 0
        raise AssertionError(how)

    def mask(self, term: MaskDraw) -> Callable:
        """The closure that writes mask ``term`` into the scores."""
        s = self.s
        keep_name = self.tensor("keep", lambda: self.keep) if term.what != "causal" else None
        if term.form == "add_input":
            # an additive mask precomputed outside the graph (what HF passes in)
            keep = self.keep
            big = torch.zeros((*s.lead[:1], *([1] * (s.rank - 2)), s.nk)) if term.what != "causal" else torch.zeros(s.nq, s.nk)
            if term.what != "causal":
                big = big.masked_fill(~self.place_keys(keep).expand_as(big), term.fill)
            if term.what != "padding":
                big = big + torch.zeros(s.nq, s.nk).masked_fill(~torch.ones(s.nq, s.nk, dtype=torch.bool).tril(), term.fill)
            name = self.tensor(f"additive_{term.what}_{len(self.tensors)}", lambda: big)
            return lambda x, t: x + t[name]

        def keep_mask(x, t, late: bool):
            parts = []
            if term.what != "padding":
                c = self.causal_keep(term.causal, x)
                parts.append(c[None, None] if s.rank == 4 and self.d.seed % 3 == 0 else c)
            if term.what != "causal":
                parts.append(t[keep_name] if late else self.place_keys(t[keep_name]))
            m = parts[0]
            for other in parts[1:]:
                m = m & other
            return m

        def fill(x):
            if term.fill_tensor:
                return torch.full([], term.fill, dtype=x.dtype, device=x.device)
            return term.fill

        late = term.late and term.what == "padding"

        def apply(x, t):
            m = keep_mask(x, t, late)
            if term.form == "masked_fill":
                m = m.expand_as(x) if term.expand_as else m
                return x.masked_fill(~m, fill(x))
            if term.form == "where_scores":
                return torch.where(m, x, fill(x))
            if term.form == "where_inverted":
                return torch.where(~m, fill(x), x)
            if term.form == "add_where":
                add = torch.where(m, 0.0, fill(x))
                return x + (self.place_keys(add) if late else add)
            if term.form == "add_one_minus":
                add = (1.0 - m.float()) * term.fill
                return x + (self.place_keys(add) if late else add)
            if term.form == "add_triu":
                nq, nk = x.shape[-2], x.shape[-1]
                return x + torch.full((nq, nk), term.fill).triu(1)
            raise AssertionError(term.form)

        return apply

    def poison_scores(self, x, t, weights, keep_name) -> torch.Tensor:
        """The look-alike's op on the scores (not an elementwise scale or mask)."""
        p = self.d.poison
        if p == "roll":
            return torch.roll(x, 1, -1)
        if p == "cumsum":
            return x.cumsum(-1)
        if p == "sort":
            return torch.sort(x, dim=-1).values
        if p == "tanh":
            return torch.tanh(x / 30) * 30
        if p == "matrix_scale":
            return x * t[weights]
        if p == "small_fill":
            return x.masked_fill(~self.place_keys(t[keep_name]), -5.0)
        raise AssertionError(p)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """softmax over the key axis (over the query axis for that look-alike)."""
        form = self.d.softmax
        dim = -1 if self.d.poison != "softmax_dim" else -2
        if form == "torch":
            return torch.softmax(x, dim)
        if form == "torch_dim_kw":
            return torch.softmax(x, dim=dim if dim != -1 else x.dim() - 1)
        if form == "functional":
            return F.softmax(x, dim=dim)
        if form == "functional_dtype":
            return F.softmax(x, dim=dim, dtype=torch.float32).to(x.dtype)
        if form == "method":
            return x.softmax(dim)
        if form == "float_type_as":
            return F.softmax(x.float(), dim=dim).type_as(x)
        raise AssertionError(form)

    def dropout(self, p: torch.Tensor) -> torch.Tensor:
        """The draw's dropout identity (active dropout for that look-alike)."""
        form = self.d.dropout
        if self.d.poison == "training_dropout":
            return F.dropout(p, p=0.5, training=True)
        if form == "eval":
            return F.dropout(p, p=0.1, training=False)
        if form == "zero_p":
            return F.dropout(p, p=0.0, training=True)
        if form == "torch_dropout":
            return torch.dropout(p, 0.2, False)
        return p

    def pv(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """P V in the draw's output op."""
        d, s = self.d, self.s
        if d.bmm_views:
            bh = s.batch * s.heads
            return torch.bmm(p.reshape(bh, s.nq, s.nk), v.reshape(bh, s.nk, s.dv)).view(s.batch, s.heads, s.nq, s.dv)
        letters = {2: "", 3: "b", 4: "bh"}[s.rank]
        if d.output == "matmul":
            return torch.matmul(p, v)
        if d.output == "at":
            return p @ v
        if d.output == "bmm":
            return p.bmm(v)
        if d.output == "einsum":
            return torch.einsum(f"{letters}qk,{letters}kd->{letters}qd", p, v)
        if d.output == "einsum_vt":
            return torch.einsum(f"{letters}qk,{letters}dk->{letters}qd", p, v.transpose(-2, -1))
        raise AssertionError(d.output)

    # the SDPA family -----------------------------------------------------------------------------
    def sdpa(self) -> Callable:
        """``F.scaled_dot_product_attention`` with the draw's mask, scale and GQA."""
        d, s = self.d, self.s
        keep = self.tensor("keep", lambda: self.keep) if d.sdpa_mask in ("bool_padding", "bool_both", "additive_padding") else None
        extra = None
        if d.sdpa_mask == "float_bias":
            extra = self.tensor("bias_general", lambda: self.randn(*((1, s.heads) if s.rank == 4 else s.lead), s.nq, s.nk))
        elif d.sdpa_mask == "additive_input":
            extra = self.tensor("additive_padding", lambda: self.place_keys(torch.zeros(self.keep.shape).masked_fill(~self.keep, d.fill)))

        def body(t):
            q, k, v = (self.heads_in(t[n]) for n in "qkv") if s.rank == 4 else (t[n] for n in "qkv")
            k, v = self.repeat(k), self.repeat(v)
            mask = None
            if d.sdpa_mask == "bool_padding":
                mask = self.place_keys(t[keep])
            elif d.sdpa_mask == "bool_both":
                mask = torch.ones(s.nq, s.nk, dtype=torch.bool).tril() & self.place_keys(t[keep])
            elif d.sdpa_mask == "additive_padding":
                mask = torch.where(self.place_keys(t[keep]), 0.0, d.fill)
            elif extra is not None:
                mask = t[extra]
            kwargs = {}
            if d.sdpa_scale is not None:
                kwargs["scale"] = d.sdpa_scale
            if d.gqa == "enable_gqa":
                kwargs["enable_gqa"] = True
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=d.sdpa_mask == "is_causal", **kwargs)
            return out.transpose(1, 2) if s.rank == 4 and d.heads_last else out

        return body

    # channel attention (a look-alike): softmax over channels, q^T k ----------------------------
    def channel(self) -> Callable:
        """XCiT-style channel attention softmax(q^T k) v^T: a look-alike."""
        def body(t):
            q, k, v = (t[n] for n in "qkv")
            return torch.softmax(q.transpose(-2, -1) @ k * 0.3, -1) @ v.transpose(-2, -1)

        return body


def _imul(c: float) -> Callable:
    """``x *= c`` on a fresh copy of the scores (dynamo rebinds the name to the result)."""

    def step(x, t):
        x = x * 1.0   # a fresh tensor to update in place (never the caller's)
        x *= c
        return x

    return step


SCORE_POISONS = ("roll", "cumsum", "sort", "tanh", "matrix_scale", "small_fill")
#: the reason a dynamo-level look-alike must give (None: any reason; where a score op sits among
#: the other steps decides which refusal the walk meets first)
POISON_REASONS = {
    "softmax_dim": "not the key axis", "return_scores": "escapes", "return_probs": "escapes",
    "reuse_scores": "escapes", "reuse_probs": "escapes", "head_mask": "probabilities are multiplied",
    "roll": None, "cumsum": None, "sort": None, "tanh": None, "matrix_scale": None, "small_fill": None,
    "training_dropout": "dropout is active", "channel": "channels",
}


# -- strategies ----------------------------------------------------------------------------------
@st.composite
def shapes(draw, ranks=(2, 3, 4), gqa_ok: bool = True) -> Shape:
    """A tiny layout (N <= 12, D <= 8): rank, batch, heads, GQA groups, cross attention, Dv != D."""
    rank = draw(st.sampled_from(ranks))
    batch = draw(st.integers(1, 3)) if rank > 2 else 1
    kv_heads = draw(st.integers(1, 3)) if rank == 4 else 1
    groups = draw(st.sampled_from((1, 1, 2))) if rank == 4 and gqa_ok else 1
    nq = draw(st.integers(1, 12))
    nk = draw(st.one_of(st.just(nq), st.integers(1, 12)))
    return Shape(rank, batch, kv_heads * groups, kv_heads, nq, nk, draw(st.integers(1, 8)), draw(st.integers(1, 8)))


@st.composite
def mask_terms(draw, rank: int) -> MaskDraw:
    """One keep mask: padding / causal / both, built and applied one of many ways, with a fill."""
    what = draw(st.sampled_from(("padding", "padding", "causal", "both")))
    forms = ["masked_fill", "where_scores", "where_inverted", "add_where", "add_one_minus", "add_input"]
    if what == "causal":
        forms.append("add_triu")
    form = draw(st.sampled_from(forms))
    fills = FILLS if form != "add_one_minus" else FILLS[1:]   # (1 - m) * -inf is NaN on kept entries
    return MaskDraw(
        what=what, causal=draw(st.sampled_from(("tril", "tril_method", "index_le", "index_diff"))), form=form,
        fill=draw(st.sampled_from(fills)),
        fill_tensor=form in ("masked_fill", "where_scores", "where_inverted", "add_where") and draw(st.booleans()),
        late=form in ("add_where", "add_one_minus") and draw(st.booleans()),
        expand_as=form == "masked_fill" and draw(st.booleans()),
    )


@st.composite
def score_steps(draw, shape: Shape, per_head_ok: bool) -> tuple:
    """Scales, masks, biases and numbers added, in a drawn order."""
    steps = []
    for _ in range(draw(st.integers(0, 2))):
        hows = ["mul", "rmul", "div", "imul", "tensor0", "div_tensor0"] + (["per_head"] if per_head_ok else [])
        steps.append(Step("scale", draw(st.sampled_from(hows)), draw(st.sampled_from(SCALES))))
    terms = draw(st.lists(mask_terms(shape.rank), max_size=2))
    steps += [Step("mask", term=t) for t in terms]
    if draw(st.integers(0, 3)) == 0:
        steps.append(Step("bias", draw(st.sampled_from(("key", "general")))))
    if draw(st.integers(0, 5)) == 0:
        steps.append(Step("number", draw(st.sampled_from(("bool", "int"))), draw(st.sampled_from((0.0, 1.0)))))
    return tuple(draw(st.permutations(steps)))


@st.composite
def methods(draw, shape: Shape) -> tuple[str, tuple]:
    """A method with parameters at which it computes exact attention."""
    method = draw(st.sampled_from(("exact", "exact", "topk", "mra", "monarch")))
    n = max(shape.nq, shape.nk)
    if method == "topk":
        return method, (("k", shape.nk + draw(st.integers(0, 3))), ("chunk_size", draw(st.integers(1, 16))))
    if method == "mra":
        b = draw(st.integers(1, 8))
        return method, (("block_size", b), ("blocks_per_row", -(-n // b) + draw(st.integers(0, 2))),
                        ("variant", draw(st.sampled_from(("mra2", "mra2s")))))
    if method == "monarch":
        return method, (("block_size", draw(st.sampled_from((1, shape.nk, shape.nk + 3)))),
                        ("num_steps", draw(st.integers(1, 2))))
    return method, ()


@st.composite
def decomposed_draws(draw, levels=("dynamo",)) -> Draw:
    """A written-out softmax(QK^T)V site at one of ``levels``."""
    shape = draw(shapes())
    rank = shape.rank
    grouped = shape.heads != shape.kv_heads
    heads_last = rank == 4 and draw(st.booleans())
    bmm_views = rank == 4 and draw(st.integers(0, 3)) == 0
    softmax_3d = bmm_views and draw(st.booleans())
    if bmm_views or rank == 3:
        score_op = draw(st.sampled_from(("matmul", "at", "bmm", "baddbmm", "einsum_qk", "einsum_kq") if rank == 3
                                        else ("bmm", "baddbmm")))
    else:
        score_op = draw(st.sampled_from(("matmul", "at", "method", "einsum_qk", "einsum_kq")))
    key_forms = ["transpose", "transpose_pos", "mT", "permute"] + (["T"] if rank == 2 else [])
    if score_op.startswith("einsum"):
        key_forms.append("einsum")
    if grouped and not bmm_views:
        key_forms.append("before_repeat")
    if heads_last and not bmm_views and not score_op.startswith("einsum"):
        key_forms.append("permute_bnhd")
    key_form = draw(st.sampled_from(key_forms))
    operand_scales = tuple(draw(st.lists(st.tuples(st.sampled_from(("q", "k", "kT")), st.sampled_from(("mul", "div")),
                                                   st.sampled_from(SCALES)), max_size=2)))
    steps = draw(score_steps(shape, per_head_ok=rank == 4 and not softmax_3d))
    outputs = ("matmul", "at", "einsum", "einsum_vt") + (("bmm",) if rank == 3 else ())
    method, params = draw(methods(shape))
    output = draw(st.sampled_from(outputs))
    level = draw(st.sampled_from(levels))
    if level == "make_fx" and (score_op.startswith("einsum") or output.startswith("einsum")):
        # make_fx decomposes einsum into permute / view / bmm chains the matcher does not read
        # (a documented limit); torch.export keeps aten.einsum
        level = "export"
    return Draw(
        shape=shape, seed=draw(st.integers(0, 2**31 - 1)), level=level, method=method,
        params=params, heads_last=heads_last, bmm_views=bmm_views, softmax_3d=softmax_3d, score_op=score_op,
        key_form=key_form, operand_scales=operand_scales, steps=steps,
        padding=draw(st.sampled_from(("none", "right", "random", "dead_sample", "left"))),
        softmax=draw(st.sampled_from(("torch", "torch_dim_kw", "functional", "functional_dtype", "method", "float_type_as"))),
        dropout=draw(st.sampled_from(("none", "eval", "zero_p", "torch_dropout"))),
        copies=tuple(draw(st.lists(st.sampled_from(("clone", "contiguous")), max_size=2))),
        output=output,
        gqa=draw(st.sampled_from(("repeat_kv", "repeat_interleave"))) if grouped else "none",
        baddbmm=(draw(st.sampled_from((1.0, 0.5))), draw(st.sampled_from((1.0, 0.25)))),
    )


@st.composite
def sdpa_draws(draw, levels=("dynamo",)) -> Draw:
    """An SDPA call at one of ``levels``."""
    shape = draw(shapes(ranks=(3, 4)))
    grouped = shape.heads != shape.kv_heads
    method, params = draw(methods(shape))
    return Draw(
        shape=shape, seed=draw(st.integers(0, 2**31 - 1)), family="sdpa", level=draw(st.sampled_from(levels)),
        method=method, params=params, heads_last=shape.rank == 4 and draw(st.booleans()),
        padding=draw(st.sampled_from(("none", "right", "random", "dead_sample", "left"))),
        gqa=draw(st.sampled_from(("repeat_kv", "repeat_interleave", "enable_gqa"))) if grouped else "none",
        sdpa_mask=draw(st.sampled_from(("none", "bool_padding", "bool_both", "additive_padding", "float_bias",
                                        "additive_input", "is_causal"))),
        sdpa_scale=draw(st.sampled_from((None, 0.3, 2.0))), fill=draw(st.sampled_from(FILLS)),
    )


@st.composite
def look_alike_draws(draw) -> Draw:
    """A site made not-attention by one poison (see POISON_REASONS), or channel attention."""
    level = draw(st.sampled_from(("dynamo", "dynamo", "make_fx")))
    poison = draw(st.sampled_from(sorted(POISON_REASONS)))
    if poison == "channel":
        shape = draw(shapes(gqa_ok=False))
        shape = replace(shape, nk=shape.nq, dv=shape.d)   # q^T k and (.) v^T need these to agree
        return Draw(shape=shape, seed=draw(st.integers(0, 2**31 - 1)), family="channel", level=level, poison=poison)
    base = draw(decomposed_draws(levels=(level,)))
    if poison == "matrix_scale" and base.shape.nq * base.shape.nk == 1:
        base = replace(base, shape=replace(base.shape, nk=2))   # a [1, 1] "matrix" is a scalar scale
    if poison == "head_mask" and base.bmm_views:
        base = replace(base, bmm_views=False, softmax_3d=False, score_op="matmul",
                       key_form="transpose" if base.key_form in ("before_repeat", "permute_bnhd") else base.key_form)
    return replace(base, poison=poison, method="exact", params=())
