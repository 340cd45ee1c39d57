"""`row_topk` and `flat_topk` (the compiled CPU kernels of saevctl.sae.topk_cpu, torch.topk elsewhere) against
torch.topk: the same values, valid distinct indices, on the inputs that take each of the kernels' paths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saevctl.sae import topk_cpu
from saevctl.sae.topk import flat_topk, row_topk


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


def _check_flat(x: torch.Tensor, k: int) -> None:
    vals, idx = flat_topk(x, k)
    ref_vals, _ = x.flatten().topk(k)
    assert vals.dtype == x.dtype and idx.dtype == torch.int64 and vals.shape == idx.shape == (k,)
    torch.testing.assert_close(vals.sort(descending=True).values, ref_vals, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.flatten()[idx], vals, rtol=0, atol=0, equal_nan=True)
    assert len(idx.unique()) == k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_topk_is_torch_topk_of_the_flattened_tensor(dtype: torch.dtype) -> None:
    x = torch.randn(64, 6144, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert topk_cpu.flat_supported(x, 64 * 32)
    _check_flat(x, 64 * 32)
    tail = torch.randn(70_001, generator=torch.Generator().manual_seed(4))  # a tail past the last whole block
    _check_flat(tail.to(dtype), 500)


def test_flat_topk_when_the_sampled_blocks_mislead_the_estimate() -> None:
    block = topk_cpu.FLAT_BLOCK * topk_cpu.GROUP
    n_blocks = 32  # the estimate samples every second block
    # sampled blocks large: the estimated threshold is too high and too few elements pass it
    # (one large element per group there, so the elements above the threshold are the groups above it)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n_blocks, block, generator=g) * 0.01
    x[0::2, : topk_cpu.FLAT_BLOCK] += 10 + torch.rand(n_blocks // 2, topk_cpu.FLAT_BLOCK, generator=g)
    k = block // 2
    t = topk_cpu._estimate(x.numpy().ravel(), n_blocks, k)
    assert int((x >= t).sum()) < k  # (this input does take that path)
    _check_flat(x, k)
    # unsampled blocks large: the threshold is too low and the threads' room for candidates overflows
    y = torch.randn(n_blocks, block, generator=g)
    y[1::2] += 10
    assert int((y >= topk_cpu._estimate(y.numpy().ravel(), n_blocks, 3 * block)).sum()) > 2 * 3 * block
    _check_flat(y, 3 * block)
    z = torch.randn(n_blocks * block, generator=g)  # the k largest all in the tail past the last whole block
    z = torch.cat([z, torch.full((100,), 50.0) + torch.arange(100)])
    _check_flat(z, 100)
    # the sampled blocks all NaN: the estimate has no elements to rank (the pass then finds the NaN: torch.topk)
    w = torch.randn(n_blocks, block, generator=g)
    w[0::2] = float("nan")
    _check_flat(w, 1000)


def test_flat_topk_nan_and_ties_as_torch() -> None:
    x = torch.randn(4, 65536)
    x[2, 7] = float("nan")
    _check_flat(x, 1000)
    _check_flat(torch.randint(0, 3, (4, 65536)).float(), 1000)  # the k-th place tied many times over
    _check_flat(torch.zeros(16, 65536), 4096)  # one value everywhere: left to torch.topk, not copied whole


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 9),
    s=st.integers(64, 5000),
    k_frac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "few", "ascending", "descending", "heavy", "equal"]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_row_topk_property(b: int, s: int, k_frac: float, kind: str, bf16: bool, seed: int) -> None:
    """Any width, any k (the kernel takes k <= s/64, torch.topk the rest), any value pattern."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, int(k_frac * s / 32))
    x = {
        "normal": lambda: torch.randn(b, s, generator=g),
        "few": lambda: torch.randint(-2, 3, (b, s), generator=g).float(),
        "ascending": lambda: torch.arange(s, dtype=torch.float32).expand(b, s).contiguous(),
        "descending": lambda: -torch.arange(s, dtype=torch.float32).expand(b, s).contiguous(),
        "heavy": lambda: torch.randn(b, s, generator=g).pow(5),
        "equal": lambda: torch.full((b, s), 1.5),
    }[kind]()
    _check(x.bfloat16() if bf16 else x, k)


def test_a_kernel_leaves_torchs_thread_count_alone() -> None:
    """numba's OpenMP pool shares the runtime with torch and sets its thread count when it starts: a fresh process
    told to use one thread must still use one after its first kernel (else results depend on the call order)."""
    code = ("import torch; from saevctl.sae.topk import row_topk; n = torch.get_num_threads(); "
            "row_topk(torch.randn(8, 4096), 8); print(n, torch.get_num_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"], out.stdout + out.stderr


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 3000),
    k_frac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "few", "signed_zeros", "narrow", "inf", "bf16"]),
    seed=st.integers(0, 2**16),
)
def test_kth_largest_property(n: int, k_frac: float, kind: str, seed: int) -> None:
    """The flat top-k's k-th value by histogram bins: the k-th of the sorted values, whatever the bins hold (one
    value from bfloat16; many close float32 values in one bin; -0 and +0 in two; infinities)."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(n, int(k_frac * n) + 1))
    x = {
        "normal": lambda: torch.randn(n, generator=g),
        "few": lambda: torch.randint(-2, 3, (n,), generator=g).float(),
        "signed_zeros": lambda: torch.randint(0, 2, (n,), generator=g).float() * -0.0,
        "narrow": lambda: 1.0 + torch.rand(n, generator=g) * 1e-3,  # every value in one or two bins
        "inf": lambda: torch.randn(n, generator=g).masked_fill(torch.rand(n, generator=g) < 0.3, float("-inf")),
        "bf16": lambda: torch.randn(n, generator=g).bfloat16().float(),
    }[kind]()
    want = x.sort(descending=True).values[k - 1]
    assert topk_cpu._kth_largest(x.numpy(), k) == want


@pytest.mark.parametrize("s", [80, 144, 6000])
def test_rows_mostly_minus_inf(s: int) -> None:
    """Rows of -inf but for two values (AuxK masks live latents so): the threshold bisected on the group maxima
    stays -inf and every group is a candidate, whatever the group count's remainder."""
    x = torch.full((64, s), float("-inf"))
    x[:, 3], x[:, 7] = 1.0, 0.5
    _check(x, max(1, s // 64))
