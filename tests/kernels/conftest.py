"""Kernel tests run the Triton kernels on CPU tensors under TRITON_INTERPRET=1.

``@triton.jit`` decides at decoration time whether a kernel is interpreted, so the variable must be
set before the kernel modules are imported. It is set here (this file loads while the tests/ tree is
collected), the kernel modules are imported (or re-imported, if another test module imported them
compiled), and the variable is then put back as it was, so that tests in other directories see the
environment they expect; an autouse fixture sets it again for each test in this directory.
"""
import importlib
import os
import sys

import pytest

from structattn.methods import REGISTRY

_KERNEL_MODULES = [m.kernel_module for m in REGISTRY.values() if m.kernel_module]

_prev = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    for _name in _KERNEL_MODULES:
        try:
            if _name in sys.modules:
                importlib.reload(sys.modules[_name])
            else:
                importlib.import_module(_name)
        except ImportError:  # a module not written yet, or triton missing: its tests will say so
            pass
finally:
    if _prev is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _prev


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
