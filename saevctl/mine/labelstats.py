"""Streaming per-feature, per-class statistics for `features label`: activation histograms per class, then
AUROC and best-threshold F1 from them. Pure torch, no I/O; `auroc_reference` is the exact rank-based version.

Memory is features x classes x bins counters, whatever the number of images; `label.py` feeds chunks of codes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor


def bin_of(acts: Tensor, max_f: Tensor, n_bins: int) -> Tensor:
    """Bin of positive activations: bin b holds (b/B * max, (b+1)/B * max]; values above max go to the last bin."""
    return (torch.ceil(acts / max_f * n_bins).long() - 1).clamp_(0, n_bins - 1)


class ClassHistograms:
    """Counts, for a block of features, of each item's activation per class (zero kept apart, exactly).

    An item (patch or image) may carry several classes (image-level presence labels); the negatives of class c
    are the labelled items without c, so they come from the all-items histogram minus c's.
    """

    def __init__(self, max_f: Float[Tensor, " f"], n_classes: int, n_bins: int, big: bool = False,
                 multi_label: bool = False) -> None:
        f = len(max_f)
        # Features that never fired keep a positive divisor; they have no non-zero value to bin anyway.
        self.max_f = max_f.double().clamp(min=1e-30)
        self.n_classes, self.n_bins = n_classes, n_bins
        dtype = torch.int64 if big else torch.int32  # int32 halves the memory; a count never exceeds the items
        self.pos_fcb = torch.zeros((f, n_classes, n_bins), dtype=dtype, device=max_f.device)
        self.all_fb = torch.zeros((f, n_bins), dtype=dtype, device=max_f.device)
        self.n_pos_c = torch.zeros(n_classes, dtype=torch.int64, device=max_f.device)
        self.n_items = 0
        self.single = not multi_label
        """Every item has at most one class: its class is a lookup, no join."""

    def update(self, acts_nf: Float[Tensor, "n f"], item_m: Int[Tensor, " m"], class_m: Int[Tensor, " m"]) -> None:
        """Fold in n items' dense activations and their (item, class) pairs; items without a pair are not counted."""
        nz_i, nz_f = acts_nf.nonzero(as_tuple=True)
        self.update_sparse(len(acts_nf), nz_i, nz_f, acts_nf[nz_i, nz_f], item_m, class_m)

    def update_sparse(self, n: int, nz_i: Int[Tensor, " z"], nz_f: Int[Tensor, " z"], vals_z: Float[Tensor, " z"],
                      item_m: Int[Tensor, " m"], class_m: Int[Tensor, " m"]) -> None:
        """Fold in n items given by their non-zero activations (item, feature, value) and (item, class) pairs."""
        c, b = self.n_classes, self.n_bins
        dev = vals_z.device
        per_n = torch.bincount(item_m, minlength=n)  # classes of each item
        self.n_items += int((per_n > 0).sum())
        self.n_pos_c += torch.bincount(class_m, minlength=c)
        assert not self.single or not len(per_n) or int(per_n.max()) <= 1, (
            "a single-label histogram got several classes per item"
        )
        rep = per_n[nz_i]
        keep = rep > 0  # unlabelled items are dropped from the (few) non-zero entries
        if not bool(keep.all()):
            nz_i, nz_f, vals_z, rep = nz_i[keep], nz_f[keep], vals_z[keep], rep[keep]
        if not len(nz_i):
            return
        bins = bin_of(vals_z.double(), self.max_f[nz_f], b)
        ones = torch.ones(len(nz_i), dtype=self.pos_fcb.dtype, device=dev)
        self.all_fb.view(-1).index_add_(0, nz_f * b + bins, ones)
        if self.single:  # one class per item (patch labels, ImageFolder): a lookup, no join
            class_n = torch.full((n,), -1, dtype=torch.int64, device=dev)
            class_n[item_m] = class_m
            self.pos_fcb.view(-1).index_add_(0, (nz_f * c + class_n[nz_i]) * b + bins, ones)
            return
        # Several classes per item: repeat each non-zero value once per class of its item.
        order = torch.argsort(item_m, stable=True)
        class_m = class_m[order]
        start_n = torch.cumsum(per_n, 0) - per_n
        e = torch.repeat_interleave(torch.arange(len(nz_i), device=dev), rep)
        within = torch.arange(len(e), device=dev) - torch.repeat_interleave(torch.cumsum(rep, 0) - rep, rep)
        flat = (nz_f[e] * c + class_m[start_n[nz_i[e]] + within]) * b + bins[e]
        self.pos_fcb.view(-1).index_add_(0, flat, torch.ones(len(flat), dtype=self.pos_fcb.dtype, device=dev))

    def all_counts(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """Counts of all labelled items per (feature, bin) for features lo..hi (float64)."""
        return self.all_fb[lo:hi].double()


@dataclass
class BlockScores:
    auroc_fc: Tensor
    """AUROC of each feature's activation for 'item is class c' (NaN where c has no positives or negatives)."""
    f1_fc: Tensor
    """Best F1 of 'activation > threshold' over the thresholds."""
    threshold_fc: Tensor
    """The activation value of that best threshold."""
    error_fc: Tensor
    """Bound on |binned AUROC - exact AUROC|: half the share of (positive, negative) pairs in one non-zero bin."""


def scores(h: ClassHistograms, edges: list[int], lo: int = 0, hi: int | None = None) -> BlockScores:
    """AUROC and best F1 of features lo..hi of a histogram block.

    AUROC counts pairs (positive, negative) with the positive higher, plus half the ties; values in one bin
    count as ties (the binning error, see docs/eval.md), zeros are exact ties. `edges` are bin indices e:
    'activation > e/B * max' is predicted positive (e = 0: the feature fires).

    Each pass over the (features, classes, bins) counts is a contraction with a per-feature vector, so the cost
    is a few reads of the histograms: with a = all items' counts, the negatives are a - p, and
    sum_b p_b (N_<b + n_b / 2) = sum_b p_b (A_<b + a_b / 2) - (sum_b p_b)^2 / 2.
    """
    # float32 contractions (BLAS): counts are exact in float32 up to 2^24 per bin, and the sums' relative
    # rounding (~1e-6) is far below the binning error; the small per-(feature, class) results are float64.
    pos = h.pos_fcb[lo:hi].float()
    f, c, b = pos.shape
    a_fb = h.all_counts(lo, hi)
    n_pos_c = h.n_pos_c.double()
    n_items = float(h.n_items)
    pairs_c = n_pos_c * (n_items - n_pos_c)
    a0_f = n_items - a_fb.sum(-1)  # labelled items where the feature is zero
    w_fb = a0_f[:, None] + torch.cumsum(a_fb, -1) - 0.5 * a_fb  # A_<b + a_b / 2, the zero bin below bin 0
    # One bmm gives, per (feature, class), sum_b p_b w_b and sum_b p_b a_b.
    pw_fc2 = torch.bmm(pos, torch.stack([w_fb, a_fb], -1).float()).double()
    # One matmul gives sum_b p_b and the sums over the segments between F1 edges.
    bounds = [*edges, h.n_bins]
    assert sorted(set(edges)) == list(edges), "edges must be sorted and distinct"
    ind_bj = torch.zeros((b, len(edges) + 1), device=pos.device)
    ind_bj[:, 0] = 1.0
    for j, (x, y) in enumerate(itertools.pairwise(bounds)):
        ind_bj[x:y, j + 1] = 1.0
    sums = (pos.reshape(f * c, b) @ ind_bj).double().reshape(f, c, -1)
    p0_fc = n_pos_c[None, :] - sums[..., 0]
    num = 0.5 * p0_fc * a0_f[:, None] + pw_fc2[..., 0] - 0.5 * n_pos_c[None, :] ** 2
    auroc = torch.where(pairs_c > 0, num / pairs_c.clamp(min=1), torch.full_like(num, float("nan")))
    sq_fc = torch.einsum("fcb,fcb->fc", pos, pos).double()
    error = 0.5 * (pw_fc2[..., 1] - sq_fc) / pairs_c.clamp(min=1)
    # True and false positives above each edge: suffix sums over the segments.
    tp = torch.flip(torch.cumsum(torch.flip(sums[..., 1:], [-1]), -1), [-1])  # (f, c, j)
    all_seg = torch.stack([a_fb[..., x:y].sum(-1) for x, y in itertools.pairwise(bounds)], -1)
    fp = torch.flip(torch.cumsum(torch.flip(all_seg, [-1]), -1), [-1])[:, None, :] - tp
    f1 = 2 * tp / (tp + fp + n_pos_c[None, :, None]).clamp(min=1)
    f1_best, best_j = f1.max(-1)
    e = torch.tensor(edges, device=pos.device)
    thr = (e[best_j].double() / h.n_bins) * h.max_f[lo:hi][:, None]
    return BlockScores(auroc, f1_best, thr, error)


def midranks(x_n: np.ndarray) -> np.ndarray:
    """1-based ranks with tied values sharing the mean of their ranks."""
    order = np.argsort(x_n, kind="stable")
    sorted_n = x_n[order]
    first = np.r_[True, sorted_n[1:] != sorted_n[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x_n)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    out = np.empty(len(x_n))
    out[order] = mean_rank[group]
    return out


def auroc_reference(scores_n: np.ndarray, positive_n: np.ndarray) -> float:
    """Exact AUROC (Mann-Whitney U with mid-ranks for ties): the plain version the histograms are tested against.
    NaN when either side is empty."""
    pos = np.asarray(positive_n, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = midranks(np.asarray(scores_n, dtype=np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def f1_reference(scores_n: np.ndarray, positive_n: np.ndarray, thresholds: list[float]) -> tuple[float, float]:
    """Best F1 of 'score > t' over the thresholds, and that t (the first on ties): the plain version."""
    pos = np.asarray(positive_n, dtype=bool)
    best = (-1.0, float("nan"))
    for t in thresholds:
        pred = np.asarray(scores_n) > t
        tp = int((pred & pos).sum())
        denom = int(pred.sum()) + int(pos.sum())
        f1 = 2 * tp / denom if denom else 0.0
        if f1 > best[0]:
            best = (f1, float(t))
    return best
