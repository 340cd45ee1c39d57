"""Per-row top-k over wide rows, the selection every TopK SAE pass makes (training, mining, labels, eval).

On CPU, `torch.topk` partially sorts a copy of each whole row: at (4,096 x 24,576) it costs about 0.4x the
bf16 encoder GEMM that made the row. `row_topk` first narrows each row to a few candidate groups, exactly:

- split the row into G strided groups (column j belongs to group j mod G) and take each group's maximum, a
  vectorised elementwise max over contiguous slices;
- the k groups with the largest maxima hold the row's top k values: any other group's maximum is at most the
  k-th largest of the group maxima, and those k maxima are k distinct elements of the row at least as large;
- so the top k of the k x (s / G) candidates are the row's top k (selected recursively, the group maxima being
  a narrower row of the same problem).

The values are exactly `torch.topk`'s (the same multiset, NaN counted largest, as torch does); where values tie
at the k-th place, which of the tied columns is returned may differ. Results are unsorted unless `sorted`.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP = 8  # columns per group: measured fastest of 4 / 8 / 16 at widths 6,144 and 24,576, fp32 and bf16
NARROW = 256  # at or below this width a row goes straight to torch.topk


def row_topk(x_bs: Tensor, k: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row of a 2-D tensor, like `x.topk(k, dim=1)`."""
    if x_bs.dim() != 2:
        raise ValueError(f"row_topk takes a 2-D tensor, not {tuple(x_bs.shape)}")
    vals, idx = _narrowed(x_bs, k) if _worth_narrowing(x_bs, k) else x_bs.topk(k, dim=1, sorted=False)
    if sorted:
        vals, order = vals.sort(dim=1, descending=True, stable=True)
        idx = idx.gather(1, order)
    return vals, idx


def flat_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, flat indices) of the k largest entries of a tensor, like `x.flatten().topk(k, sorted=False)`:
    BatchTopK's batch-wide selection (on a CPU 3-4x faster than torch.topk at a batch's size)."""
    vals, idx = row_topk(x.reshape(1, -1), k)
    return vals[0], idx[0]


def _worth_narrowing(x_bs: Tensor, k: int) -> bool:
    b, s = x_bs.shape
    # the candidates (k groups of GROUP) must be at most half the row for the narrowing to pay (measured)
    return not x_bs.is_cuda and s > NARROW and s % GROUP == 0 and 0 < k * GROUP * 2 <= s and b > 0


def _narrowed(x_bs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    s = x_bs.shape[1]
    groups = s // GROUP
    maxima_bg = x_bs.reshape(len(x_bs), GROUP, groups).amax(dim=1)  # group g = columns g, g + G, g + 2G, ...
    _, top_groups_bk = row_topk(maxima_bg, k)
    cand_idx = (top_groups_bk[:, :, None] + torch.arange(0, s, groups, device=x_bs.device)).flatten(1)
    vals, pos = x_bs.gather(1, cand_idx).topk(k, dim=1, sorted=False)
    return vals, cand_idx.gather(1, pos)
