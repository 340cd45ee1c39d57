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
import torch

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


def test_f16_bits_rounds_as_torch_half() -> None:
    """Every rounding case of float32 -> float16 (normals, subnormals, ties, overflow, inf, NaN, signed zero) over a
    million random bit patterns and the edges, against torch's own conversion."""
    import numba

    from saevctl.compiled import f16_bits

    @numba.njit
    def convert(a: np.ndarray, out: np.ndarray) -> None:
        for i in range(a.shape[0]):
            out[i] = f16_bits(a[i])

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x477FE000, 0x477FF000, 0x477FEFFF,
                      0x33000000, 0x33000001, 0x32FFFFFF, 0x38800000, 0x387FC000, 0x387FE000, 0x3F801000,
                      0x3F803000, 0x3F801001], dtype=np.uint32)
    # the ties of every exponent: mantissa bits below float16's exactly one half
    ties = (np.arange(0, 256, dtype=np.uint32) << 23) | 0x1000
    a = np.concatenate([bits, edges, ties, ties | 0x2000]).view(np.float32)
    out = np.empty(len(a), np.uint16)
    convert(a, out)
    want = torch.from_numpy(a.copy()).half().view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(a)
    assert np.array_equal(out[~nan], want[~nan])
    assert bool(np.isnan(out[nan].view(np.float16)).all())
