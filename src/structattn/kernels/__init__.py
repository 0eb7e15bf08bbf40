"""Triton kernels, one file per method. Nothing here imports torch.fx.

``get_kernel(name, ...)`` returns a callable with the signature of ``Method.forward`` when a kernel
for that method exists, triton imports, and the kernel supports the inputs; otherwise ``None``
(``strict=False``) or a ValueError saying why (``strict=True``, used by ``impl="triton"``).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Optional

#: method name -> module (in this package) exposing ``supports(...)`` and ``forward(...)``
KERNEL_MODULES: dict[str, str] = {"monarch": "monarch", "mra": "mra", "topk": "topk"}


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 runs kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_kernel(name: str, q, k, v, attn_mask, is_causal: bool, params: Any, *, strict: bool) -> Optional[Callable]:
    """The Triton implementation of method ``name`` for these inputs, if there is one."""
    def fail(reason: str):
        if strict:
            raise ValueError(f"impl='triton' for method {name!r}: {reason}")
        return None

    from ..methods import get_method

    own = getattr(get_method(name), "kernel_module", None)      # a method folder's own triton.py
    if name not in KERNEL_MODULES and own is None:
        return fail("no Triton kernel exists for this method")
    if not q.is_cuda and not interpreting():
        return fail("tensors are on the CPU; set TRITON_INTERPRET=1 to run the kernels there, or use impl='torch'")
    try:
        module = importlib.import_module(own) if own is not None else importlib.import_module(
            f".{KERNEL_MODULES[name]}", __name__)
    except ImportError as exc:  # triton missing or too old
        return fail(f"triton could not be imported ({exc})")
    reason = module.supports(q, k, v, attn_mask, is_causal, params)
    if reason is not None:
        return fail(reason)
    return module.forward
