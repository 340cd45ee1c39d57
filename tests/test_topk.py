"""`row_topk` (the narrowed per-row top-k) against torch.topk: the same values, valid distinct indices."""

from __future__ import annotations

import pytest
import torch

from saevctl.sae.topk import row_topk


def _check(x: torch.Tensor, k: int) -> None:
    vals, idx = row_topk(x, k)
    ref_vals, _ = x.topk(k, dim=1)
    assert vals.dtype == x.dtype and idx.dtype == torch.int64 and vals.shape == idx.shape == (len(x), k)
    torch.testing.assert_close(vals.sort(dim=1, descending=True).values, ref_vals, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.gather(1, idx), vals, rtol=0, atol=0, equal_nan=True)  # indices point at the values
    assert bool((idx.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("s", "k"), [(6144, 32), (24576, 32), (4096, 64), (2048, 1), (1024, 32), (6000, 16)])
def test_values_match_torch_topk(dtype: torch.dtype, s: int, k: int) -> None:
    g = torch.Generator().manual_seed(s + k)
    _check(torch.randn(37, s, generator=g).to(dtype), k)


def test_ties_keep_the_values_and_pick_distinct_columns() -> None:
    # few distinct values: the k-th place is tied in every row, and groups' maxima tie too
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (64, 8192), generator=g).float()
    _check(x, 32)
    _check(torch.zeros(3, 8192), 32)
    _check(-torch.ones(3, 8192) * float("inf"), 32)  # every entry -inf, as AuxK's masked rows can be


def test_nan_counts_largest_as_in_torch() -> None:
    x = torch.randn(8, 8192)
    x[0, 17] = x[3, 4000] = x[3, 4001] = float("nan")
    _check(x, 32)


def test_a_strided_row_block_and_sorted_output() -> None:
    stacked = torch.randn(2, 16, 8192)
    x = stacked[1, 3:12]  # rows of a bigger tensor
    _check(x, 32)
    vals, idx = row_topk(x, 32, sorted=True)
    ref_vals, ref_idx = x.topk(32, dim=1)
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)  # no ties in random data: the same order too
    _check(stacked[0].t().contiguous()[:, :16].contiguous(), 8)  # a narrow row: torch.topk itself


def test_rejects_other_ranks() -> None:
    with pytest.raises(ValueError, match="2-D"):
        row_topk(torch.randn(2, 3, 8192), 4)


def test_flat_topk_is_torch_topk_of_the_flattened_tensor() -> None:
    from saevctl.sae.topk import flat_topk

    x = torch.randn(64, 6144, generator=torch.Generator().manual_seed(3)).bfloat16()
    vals, idx = flat_topk(x, 64 * 32)
    ref_vals, _ = x.flatten().topk(64 * 32)
    assert torch.equal(vals.sort(descending=True).values, ref_vals)
    assert torch.equal(x.flatten()[idx], vals) and len(idx.unique()) == len(idx)
