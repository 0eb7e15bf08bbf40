"""Fixtures for the method tests; the helpers live in tests/testlib.py."""
from __future__ import annotations

import zlib

import pytest


@pytest.fixture
def seed(request):
    """A per-test seed derived from the test id (fresh inputs per test, reproducible)."""
    return zlib.crc32(request.node.nodeid.encode())
