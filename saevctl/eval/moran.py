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


def rook_degrees(h: int, w: int) -> Float[Tensor, " p"]:
    """Each cell's number of rook neighbours, row-major (2 in a corner, 3 on an edge, 4 inside)."""
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    return ((r > 0).double() + (r < h - 1).double() + (c > 0).double() + (c < w - 1).double())


@torch.no_grad()
def morans_i_grid(codes_bps: Float[Tensor, "b p s"], h: int,
                  w: int) -> tuple[Float[Tensor, "b s"], Bool[Tensor, "b s"]]:
    """`morans_i` of every feature's map on every image at once, for codes (b, h*w, s) on a row-major grid.

    One pass over the nonzero entries (SAE codes are sparse: the cost follows their count, not b * p * s): each
    map's moments in float64, then I from them. With z = x - m, sum z^2 = S2 - S1 m and the edge sum
    sum_ij z_i z_j = P - m D + E m^2 (P: sum of x_i x_j over the E edges, D: sum of degree_i x_i), so the maps are
    never centred; float64 keeps that cancellation below the float32 rounding of the centred form."""
    b, p, s = codes_bps.shape
    assert p == h * w and rook_weight_sum(h, w) > 0, "codes must cover an h x w grid with neighbours"
    flat = codes_bps.reshape(-1)
    image, cell, feature = codes_bps.nonzero().unbind(1)  # no integer division (slow on int64)
    at = (image * p + cell) * s + feature  # flat index
    v = flat[at].double()
    last = flat.numel() - 1
    # each undirected edge once, from its left or upper cell: the value one cell right (s on) and one row down
    # (w * s on), weighted 0 past the grid's edge (a zero neighbour adds nothing either)
    right = flat[(at + s).clamp_(max=last)].double() * ((cell % w) < w - 1)
    below = flat[(at + w * s).clamp_(max=last)].double() * (cell < p - w)
    moments = torch.stack([v, v * v, v * rook_degrees(h, w).to(v.device)[cell], v * (right + below)], dim=1)
    sums = torch.zeros(b * s, 4, dtype=torch.float64, device=v.device).index_add_(0, image * s + feature, moments)
    s1, s2, d, p_sum = sums.T
    w_sum = rook_weight_sum(h, w)
    m = s1 / p
    den = s2 - s1 * m
    cross = p_sum - m * d + (w_sum // 2) * m * m
    defined = den > FLAT_EPS * s2
    i_bs = (p / w_sum) * 2 * cross / torch.where(defined, den, torch.ones_like(den))
    return torch.where(defined, i_bs, torch.zeros_like(i_bs)).reshape(b, s), defined.reshape(b, s)
