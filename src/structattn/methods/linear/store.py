"""The weights file of fitted feature maps: one file, many layers, keyed by module FQN.

A ``torch.save`` of plain types and tensors (read back with ``torch.load(weights_only=True)``)::

    {"format": "structattn.linear", "version": 1,
     "layers": {"<layer FQN>": FeatureMaps.to_dict(), ...}}

Loads are cached per (absolute path, modification time, size), so compiling many sites reads
the file once and a rewritten file is read again.
"""
from __future__ import annotations

import os
import tempfile
from typing import Mapping

import torch

from .maps import FeatureMaps

__all__ = ["FORMAT", "VERSION", "save_maps", "load_maps", "maps_tensors"]

FORMAT = "structattn.linear"
VERSION = 1

_CACHE: dict = {}
_TENSORS: dict = {}


def _key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def save_maps(path: str, layers: Mapping[str, FeatureMaps], *, merge: bool = False) -> None:
    """Write ``layers`` (FQN -> maps) to ``path`` atomically; with ``merge``, entries already in an
    existing file are kept unless ``layers`` replaces them."""
    entries = {}
    if merge and os.path.exists(path):
        entries.update(load_maps(path))
    entries.update(layers)
    data = {"format": FORMAT, "version": VERSION, "layers": {name: m.to_dict() for name, m in entries.items()}}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".structattn-linear-", dir=folder)
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            torch.save(data, fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_maps(path: str) -> dict[str, FeatureMaps]:
    """FQN -> ``FeatureMaps`` of the file at ``path``; ValueError naming the file when it is
    missing or not a structattn linear-attention weights file."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"linear attention weights must be the path of a file written by structattn.fit_linear; "
                         f"got {path!r}")
    try:
        key = _key(path)
    except OSError:
        raise ValueError(f"linear attention weights file {path!r} does not exist (write it with "
                         f"structattn.fit_linear(..., path={path!r}))") from None
    if key in _CACHE:
        return _CACHE[key]
    try:
        # real tensors even when called while dynamo traces (torch.load would make fakes)
        with torch._guards.tracing(None), torch._subclasses.fake_tensor.unset_fake_temporarily():
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"linear attention weights file {path!r} could not be read: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a structattn linear-attention weights file (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path!r} has weights-file version {data.get('version')!r}; this structattn reads "
                         f"version {VERSION}")
    layers = {name: FeatureMaps.from_dict(entry, where=f"{path!r} layer {name!r}")
              for name, entry in data.get("layers", {}).items()}
    stale = [k for k in _CACHE if k[0] == key[0]]
    for k in stale if len(_CACHE) < 8 else list(_CACHE):   # older versions of this file; bounded
        del _CACHE[k]
    _CACHE[key] = layers
    return layers


def maps_tensors(path: str, layer: str, maps: FeatureMaps, device) -> tuple:
    """``maps.tensors(device)``, cached per (file version, layer, device) so repeated binds (the
    transformers entry point binds on every call) do not copy them again."""
    key = (_key(path), layer, str(device))
    if key not in _TENSORS:
        if len(_TENSORS) > 256:
            _TENSORS.clear()
        _TENSORS[key] = maps.tensors(device)
    return _TENSORS[key]
