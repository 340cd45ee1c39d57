"""The compiled-kernel plumbing (saevctl.compiled): a cache that cannot be written (a full disk) costs the cache,
not the run."""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from typing import Any

import numba.core.caching
import numpy as np
import pytest

from saevctl.compiled import kernel


def _plus_one(a: np.ndarray) -> float:
    return float(a.sum()) + 1.0


def test_a_full_disk_at_the_kernel_cache_warns_and_the_kernel_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    @contextlib.contextmanager
    def full(self: Any, filepath: str) -> Iterator[Any]:
        raise OSError(errno.ENOSPC, "No space left on device", filepath)
        yield  # pragma: no cover

    monkeypatch.setattr(numba.core.caching.IndexDataCacheFile, "_open_for_write", full)
    compiled = kernel()(_plus_one)
    with caplog.at_level(logging.WARNING, logger="saevctl.compiled"):
        assert compiled(np.ones(3)) == 4.0
    assert "could not cache the compiled kernel" in caplog.text and "No space left" in caplog.text
