"""Per-row and batch-wide top-k, the selections every TopK/BatchTopK SAE pass makes (training, mining, labels,
eval): on a CPU the compiled kernels of `saevctl.sae.topk_cpu` (2-3x faster than torch.topk, which partially
sorts a copy of each whole row), elsewhere torch.topk.

The values are exactly `torch.topk`'s (the same multiset, NaN counted largest, as torch does); where values tie
at the k-th place, which of the tied columns is returned may differ. Results are unsorted unless `sorted`.
"""

from __future__ import annotations

from torch import Tensor

from saevctl.sae import topk_cpu


def row_topk(x_bs: Tensor, k: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row of a 2-D tensor, like `x.topk(k, dim=1)`."""
    if x_bs.dim() != 2:
        raise ValueError(f"row_topk takes a 2-D tensor, not {tuple(x_bs.shape)}")
    if topk_cpu.supported(x_bs, k):
        vals, idx = topk_cpu.rows(x_bs, k)
    else:
        vals, idx = x_bs.topk(k, dim=1, sorted=False)
    if sorted:
        vals, order = vals.sort(dim=1, descending=True, stable=True)
        idx = idx.gather(1, order)
    return vals, idx


def flat_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, flat indices) of the k largest entries of a tensor, like `x.flatten().topk(k, sorted=False)`:
    BatchTopK's batch-wide selection."""
    got = topk_cpu.flat(x, k) if topk_cpu.flat_supported(x, k) else None
    return got if got is not None else x.flatten().topk(k, sorted=False)
