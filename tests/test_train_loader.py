"""The training data path: every row exactly once per epoch, seeded order, resume at any batch, prefetch errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saevctl.store import open_store
from saevctl.store.reader import ShardedArray
from saevctl.train.loader import ActivationLoader, Prefetcher


def _arrays(n_per_part: list[int], p: int, d: int) -> dict[str, ShardedArray]:
    """Patch rows whose first value is their global row id, so order and coverage are visible."""
    parts, cls_parts, row = [], [], 0
    for n in n_per_part:
        a = np.zeros((n, p, d), np.float32)
        a[..., 0] = np.arange(row, row + n * p).reshape(n, p)
        parts.append(a)
        cls_parts.append(np.full((n, d), -1.0, np.float32))
        row += n * p
    return {"patches": ShardedArray(parts, "float32"), "cls": ShardedArray(cls_parts, "float32")}


@settings(max_examples=25, deadline=None)
@given(
    parts=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    p=st.integers(1, 5),
    batch=st.integers(1, 17),
    buffer=st.integers(1, 64),
    seed=st.integers(0, 3),
)
def test_one_epoch_covers_every_row_once(parts: list[int], p: int, batch: int, buffer: int, seed: int) -> None:
    arrays = {"patches": _arrays(parts, p, 3)["patches"]}
    loader = ActivationLoader(arrays, batch, buffer_rows=buffer, seed=seed, block_rows=4)
    n = loader.n_rows
    it = loader.batches()
    n_batches = -(-2 * n // batch)
    rows = torch.cat([next(it) for _ in range(n_batches)])[:, 0].long().tolist()
    assert sorted(rows[:n]) == list(range(n))  # first epoch: a permutation
    assert sorted(rows[n : 2 * n]) == list(range(n))  # second epoch too


@settings(max_examples=20, deadline=None)
@given(start=st.integers(0, 40), batch=st.integers(1, 13), seed=st.integers(0, 5))
def test_resume_at_any_batch_gives_the_same_stream(start: int, batch: int, seed: int) -> None:
    arrays = _arrays([7, 5, 6], 3, 4)
    loader = ActivationLoader(arrays, batch, buffer_rows=16, seed=seed, block_rows=6)
    full = loader.batches()
    ref = [next(full) for _ in range(start + 3)]
    resumed = loader.batches(start)
    for t in range(start, start + 3):
        assert torch.equal(next(resumed), ref[t])


def test_seed_changes_order_and_both_tokens_mix_cls() -> None:
    arrays = _arrays([20], 4, 2)
    a = next(ActivationLoader(arrays, 40, seed=0).batches())
    b = next(ActivationLoader(arrays, 40, seed=1).batches())
    assert not torch.equal(a, b)
    loader = ActivationLoader(arrays, 25, seed=0)
    assert loader.n_rows == 20 * 5
    epoch = torch.cat([next(loader.batches(i)) for i in range(4)])
    assert int((epoch[:, 0] == -1).sum()) == 20  # every CLS row once


def test_loader_reads_a_real_store(tiny_store: Path) -> None:
    view = open_store(tiny_store).layer(3)
    loader = ActivationLoader({"patches": view.patches}, 16, seed=0)
    x = next(loader.batches())
    assert x.shape == (16, 32) and x.dtype == torch.float32
    flat = torch.from_numpy(view.patches[:]).reshape(-1, 32)
    # each loaded row is one of the stored rows
    assert bool((x[:, None, :] == flat[None]).all(-1).any(1).all())
    assert loader.sample(10_000).shape == (loader.n_rows, 32)


def test_prefetcher_passes_errors_to_the_consumer() -> None:
    def broken():
        yield torch.zeros(2)
        raise OSError("disk went away")

    pf = Prefetcher(broken())
    assert torch.equal(next(pf), torch.zeros(2))
    with pytest.raises(OSError, match="disk went away"):
        next(pf)
    pf.close()


def test_prefetcher_close_stops_an_endless_stream() -> None:
    loader = ActivationLoader(_arrays([50], 2, 8), 4, seed=0)
    pf = Prefetcher(loader.batches(), depth=2)
    next(pf)
    pf.close()
    assert not pf._thread.is_alive()
