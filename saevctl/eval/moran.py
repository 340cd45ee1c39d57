"""Moran's I of activation maps on the patch grid, rook adjacency (the 4 edge-sharing neighbours, binary weights):
close to 1 for a smooth map, about -1/(N-1) for spatial noise, -1 for a checkerboard.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

ADJACENCY = "rook"
"""Neighbours share an edge (up, down, left, right); weights 1, not row-normalised."""
FLAT_EPS = 1e-8
"""A map whose variance is below this share of its energy is flat: Moran's I is undefined there."""


def rook_weight_sum(h: int, w: int) -> int:
    """Sum of the symmetric rook weights of an h x w grid: each of its edges counted in both directions."""
    return 2 * (h * (w - 1) + w * (h - 1))


def null_expectation(n: int) -> float:
    """E[I] for a map with no spatial structure (values randomly permuted over N cells): -1 / (N - 1)."""
    return -1.0 / (n - 1)


@torch.no_grad()
def morans_i(maps_bhw: Float[Tensor, "b h w"]) -> tuple[Float[Tensor, " b"], Bool[Tensor, " b"]]:
    """Moran's I of each map (one feature on one image), I = (N / W) sum_ij w_ij z_i z_j / sum_i z_i^2 with z the map
    minus its mean; and whether it is defined (the map is not flat). The grid is the last two (contiguous) axes."""
    _b, h, w = maps_bhw.shape
    n, w_sum = h * w, rook_weight_sum(h, w)
    assert w_sum > 0, "a 1x1 grid has no neighbours"
    z = maps_bhw - maps_bhw.mean(dim=(1, 2), keepdim=True)
    den = z.square().sum(dim=(1, 2))
    # each undirected edge once; the symmetric weight matrix counts it twice
    cross = (z[:, :, 1:] * z[:, :, :-1]).sum(dim=(1, 2)) + (z[:, 1:] * z[:, :-1]).sum(dim=(1, 2))
    defined = den > FLAT_EPS * maps_bhw.square().sum(dim=(1, 2))
    i_b = (n / w_sum) * 2 * cross / torch.where(defined, den, torch.ones_like(den))
    return torch.where(defined, i_b, torch.zeros_like(i_b)), defined
