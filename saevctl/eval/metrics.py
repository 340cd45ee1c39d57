"""Per-image task statistics for the splice evaluation, dataset scores from their sums, the fraction of
performance recovered, and paired bootstrap confidence intervals (images resampled together for all variants).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

VARIANTS = ("original", "spliced", "ablated")
RECOVERY_EPS = 1e-6
"""|original - ablated| below this: ablating the layer does not hurt the metric, so recovery is undefined."""

# Each metric is a dataset score computed from per-image statistics summed over images: a plain mean is
# (sum of values, count); mIoU is (intersection, prediction, truth counts per class). Sums make the
# bootstrap one matrix product per variant.
Score = Callable[[np.ndarray], np.ndarray]
"""(m, k) summed statistics -> (m,) scores."""


def recovery(original: float, spliced: float, ablated: float, eps: float = RECOVERY_EPS) -> float:
    """(spliced - ablated) / (original - ablated); NaN when original and ablated (nearly) tie."""
    if not all(math.isfinite(v) for v in (original, spliced, ablated)) or abs(original - ablated) < eps:
        return float("nan")
    return (spliced - ablated) / (original - ablated)


def recovery_rows(o_m: np.ndarray, s_m: np.ndarray, a_m: np.ndarray, eps: float = RECOVERY_EPS) -> np.ndarray:
    """`recovery` for arrays of bootstrap rows."""
    gap = o_m - a_m
    ok = np.abs(gap) >= eps
    return np.where(ok, (s_m - a_m) / np.where(ok, gap, 1.0), np.nan)


# --- per-image statistics -----------------------------------------------------------------------------


def mean_stats(values_n: np.ndarray) -> np.ndarray:
    """(n, 2): value and 1 per image; NaN values (no label, undefined) count as absent."""
    v = np.asarray(values_n, dtype=np.float64)
    ok = np.isfinite(v)
    return np.stack([np.where(ok, v, 0.0), ok.astype(np.float64)], axis=1)


def mean_score(sums_mk: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums_mk[:, 1] > 0, sums_mk[:, 0] / np.maximum(sums_mk[:, 1], 1e-300), np.nan)


@torch.no_grad()
def classify_stats(probs_bc: Tensor, ref_top_b: Tensor, labels_b: Tensor) -> dict[str, np.ndarray]:
    """Per image: top-1 correct (NaN where the label is unknown, -1) and top-1 agreement with the original model."""
    top = probs_bc.argmax(-1)
    correct = torch.where(
        labels_b >= 0, (top == labels_b).double(), torch.full_like(top, float("nan"), dtype=torch.float64)
    )
    return {"accuracy": correct.cpu().numpy(), "agreement": (top == ref_top_b).double().cpu().numpy()}


@torch.no_grad()
def saliency_cc(sal_b1hw: Tensor, ref_b1hw: Tensor) -> np.ndarray:
    """Pearson correlation of each saliency map with the original's (1 for an identical map, NaN when either is
    flat)."""
    a = sal_b1hw.reshape(len(sal_b1hw), -1).double()
    b = ref_b1hw.reshape(len(ref_b1hw), -1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    cc = (a * b).sum(1) / denom.clamp_min(1e-300)
    same = (sal_b1hw.reshape(len(a), -1) == ref_b1hw.reshape(len(b), -1)).all(1)
    cc = torch.where(denom > 1e-12, cc, torch.full_like(cc, float("nan")))
    return torch.where(same, torch.ones_like(cc), cc).cpu().numpy()


def segment_stats(pred_bp: np.ndarray, truth_bp: np.ndarray, n_classes: int) -> np.ndarray:
    """(b, 3c): per image and class, patches in prediction ∩ truth, in the prediction, in the truth
    (labelled patches only: truth >= 0)."""
    out = np.zeros((len(pred_bp), 3 * n_classes), np.float64)
    for i, (p, t) in enumerate(zip(pred_bp, truth_bp, strict=True)):
        keep = t >= 0
        p, t = p[keep].astype(np.int64), t[keep].astype(np.int64)
        out[i, :n_classes] = np.bincount(t[p == t], minlength=n_classes)[:n_classes]
        out[i, n_classes : 2 * n_classes] = np.bincount(p, minlength=n_classes)[:n_classes]
        out[i, 2 * n_classes :] = np.bincount(t, minlength=n_classes)[:n_classes]
    return out


def miou_score(sums_mk: np.ndarray) -> np.ndarray:
    """Mean IoU over the classes present in the truth or the prediction, per row of summed counts."""
    c = sums_mk.shape[1] // 3
    inter, pred, truth = sums_mk[:, :c], sums_mk[:, c : 2 * c], sums_mk[:, 2 * c :]
    union = pred + truth - inter
    present = union > 0
    iou = np.where(present, inter / np.where(present, union, 1.0), 0.0)
    n = present.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, iou.sum(1) / np.maximum(n, 1), np.nan)


# --- dataset scores and their bootstrap ------------------------------------------------------------------


@dataclass
class Scored:
    """One metric's per-image statistics for each variant, and how sums become a score."""

    name: str
    label: str
    stats: dict[str, np.ndarray]
    """variant -> (n_images, k)."""
    score: Score

    def point(self) -> dict[str, float]:
        return {v: float(self.score(s.sum(0, keepdims=True))[0]) for v, s in self.stats.items()}


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) counts of each image in each resample (a multinomial draw equals resampling with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def percentile_ci(rows: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap rows at `level` (NaN rows left out; NaN when none is finite)."""
    rows = rows[np.isfinite(rows)]
    if rows.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(rows, [alpha, 1 - alpha])
    return float(lo), float(hi)


def summarize(scored: Scored, n_boot: int, seed: int, level: float = 0.95) -> dict[str, Any]:
    """Point scores per variant and recovery, each with a percentile bootstrap CI over images (paired)."""
    point = scored.point()
    n = len(next(iter(scored.stats.values())))
    w = resample_weights(n, n_boot, seed)
    boot = {v: scored.score(w @ s) for v, s in scored.stats.items()}
    out: dict[str, Any] = {"metric": scored.name, "label": scored.label}
    for v in scored.stats:
        lo, hi = percentile_ci(boot[v], level)
        out[v] = {"mean": point[v], "lo": lo, "hi": hi}
    rec = recovery(point["original"], point["spliced"], point["ablated"])
    lo, hi = percentile_ci(recovery_rows(boot["original"], boot["spliced"], boot["ablated"]), level)
    out["recovery"] = {"mean": rec, "lo": lo, "hi": hi}
    return out
