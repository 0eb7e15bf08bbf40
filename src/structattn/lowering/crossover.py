"""Measured crossover: the shortest kv length at which a method beats exact attention here.

``min_seq_len="auto"`` needs, for each (method, parameters, head dims, dtype, device kind,
causal), the length below which exact attention is faster on this machine. It is measured once
(a few timings of exact attention and of the method on [1, 4, n, d] inputs, n doubling from 64;
the crossover is the first n from which the method wins twice in a row) and cached in a JSON file
(``$STRUCTATTN_CACHE_DIR`` or ``~/.cache/structattn``), keyed also by torch's version and the
device's name. Timing belongs to run time: nothing here is asserted by tests.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

#: kv lengths tried, in order
GRID = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
#: returned when the method never wins on GRID (the site then always runs exact)
NEVER = 1 << 30
_HEADS = 4
_MEMORY: dict[str, int] = {}


def cache_file() -> Path:
    """Where measured crossovers are kept."""
    root = os.environ.get("STRUCTATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "structattn")
    return Path(root) / "crossover.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{os.cpu_count()}cpu:{torch.get_num_threads()}threads"


def crossover_key(method: str, params: Any, head_dim: int, v_head_dim: int, dtype: torch.dtype,
                  device: torch.device, causal: bool) -> str:
    """Cache key of one measurement."""
    return "|".join(map(str, (torch.__version__, _device_name(device), method, params, head_dim, v_head_dim,
                              dtype, causal)))


def measured_crossover(method, params: Any, *, head_dim: int, v_head_dim: int, dtype: torch.dtype,
                       device: torch.device, causal: bool, run: Callable) -> int:
    """The measured crossover kv length (``NEVER`` if the method never wins on ``GRID``).

    ``run(method, params, q, k, v, scale, causal)`` runs the method as the op would."""
    key = crossover_key(method.name, params, head_dim, v_head_dim, dtype, device, causal)
    if key in _MEMORY:
        return _MEMORY[key]
    stored = _load()
    if key in stored:
        _MEMORY[key] = stored[key]
        return stored[key]
    value = _measure(method, params, head_dim, v_head_dim, dtype, device, causal, run)
    _MEMORY[key] = value
    stored = _load()
    stored[key] = value
    _save(stored)
    return value


def _measure(method, params, head_dim, v_head_dim, dtype, device, causal, run) -> int:
    from ..methods import get_method

    exact = get_method("exact")
    scale = 1.0 / math.sqrt(head_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    wins, start = 0, None
    with torch.no_grad():
        for n in GRID:
            q = torch.randn(1, _HEADS, n, head_dim, generator=gen).to(device, dtype)
            k = torch.randn(1, _HEADS, n, head_dim, generator=gen).to(device, dtype)
            v = torch.randn(1, _HEADS, n, v_head_dim, generator=gen).to(device, dtype)
            t_exact = _time(lambda: run(exact, exact.Params(), q, k, v, scale, causal), device)
            t_method = _time(lambda: run(method, params, q, k, v, scale, causal), device)
            if t_method < t_exact:
                wins, start = wins + 1, start if wins else n
                if wins == 2:
                    return start
            else:
                wins, start = 0, None
    return start if wins else NEVER


def _time(fn: Callable, device: torch.device, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _load() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save(data: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measure again next time
