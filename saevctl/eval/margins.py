"""The SAE against its null baselines, metric by metric: each metric's per-unit statistics (blocks of images,
images, classes) read from one SAE's evaluation results, and the SAE's margin over every baseline with a paired
percentile bootstrap CI (the same resamples of the same units for the SAE and each baseline).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from saevctl.eval.metrics import VARIANTS, mean_score, percentile_ci, recovery_rows, resample_weights

Score = Callable[[np.ndarray], np.ndarray]
"""(m, k) summed unit statistics -> (m,) metric values."""
CHANCE_AUROC = 0.5
"""A class none of whose features fires has no best feature: its best AUROC counts as chance."""


@dataclass(frozen=True)
class Units:
    """One SAE's statistics for one metric: unit ids (images or classes, shared across SAEs evaluated on the same
    inputs) and per-unit sums whose column sums `score` turns into the metric."""

    ids: np.ndarray
    stats: np.ndarray
    score: Score


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_better: bool
    unit: str
    """What the bootstrap resamples: 'images', 'classes' or 'features'."""
    units: Callable[[dict[str, Any]], Units | None]
    """From an evaluation's results (suite.Scores.results): the units, or None when that part did not run."""
    pct: bool = False
    """Shown as a percentage (a margin as percentage points)."""


def _recon(results: dict[str, Any]) -> Units | None:
    from saevctl.eval.recon import unit_nmse

    rec = results.get("recon")
    if rec is None or rec.units is None:
        return None
    return Units(np.arange(len(rec.units)), rec.units, unit_nmse)


def _splice(results: dict[str, Any]) -> Units | None:
    sp = results.get("splice")
    if sp is None or not sp.scored:
        return None
    first = sp.scored[0]
    parts = [first.stats[v] for v in VARIANTS]
    k = parts[0].shape[1]

    def score(m: np.ndarray) -> np.ndarray:
        o, s, a = (first.score(m[:, i * k : (i + 1) * k]) for i in range(3))
        return recovery_rows(o, s, a)

    return Units(np.arange(len(parts[0])), np.hstack(parts), score)


def _classes(results: dict[str, Any], value: Callable[[float | None, float], float]) -> Units | None:
    cov = results.get("coverage")
    if cov is None:
        return None
    rows = cov["classes"]
    ids = np.array([r["class_id"] for r in rows], dtype=np.int64)
    stats = np.array([[value(r["auroc"], cov["min_auroc"]), 1.0] for r in rows], dtype=np.float64).reshape(-1, 2)
    return Units(ids, stats, mean_score)


def _covered(auroc: float | None, min_auroc: float) -> float:
    return float(auroc is not None and auroc >= min_auroc)


def _best_auroc(auroc: float | None, min_auroc: float) -> float:
    return CHANCE_AUROC if auroc is None or not math.isfinite(auroc) else float(auroc)


def specificity(m: np.ndarray) -> np.ndarray:
    """Target change rate minus other change rate, pooled, from summed (target changed, target, other changed,
    other) counts."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out: np.ndarray = m[:, 0] / m[:, 1] - m[:, 2] / m[:, 3]
    return out


def _edits(results: dict[str, Any]) -> Units | None:
    ed = results.get("edits")
    if ed is None or ed.per_image is None:
        return None
    images, counts = ed.per_image
    return Units(images, counts["feature"].astype(np.float64), specificity)


def _per_unit(values: list[float | None] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, [value, 1]) rows for the units with a finite value; the score is their mean."""
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    ids = np.flatnonzero(np.isfinite(v))
    return ids, np.stack([v[ids], np.ones(len(ids))], 1)


def _spatial(results: dict[str, Any]) -> Units | None:
    """Units are feature slots: SAEs of one width have the same slots but not the same features, so this
    resamples each SAE's features like an unpaired bootstrap; the score is the mean Moran's I of the scored ones."""
    sp = results.get("spatial")
    if sp is None or not sp.scored.size:
        return None
    ids, stats = _per_unit(sp.moran_s)
    return Units(ids, stats, mean_score)


def _probe_k1(results: dict[str, Any]) -> Units | None:
    """Units are the classes (the same labels and held-out split for every SAE of the suite)."""
    pr = results.get("sparse_probe")
    if pr is None or not pr.classes:
        return None
    k = str(min(pr.ks))
    ids, stats = _per_unit(pr.per_class.get("sae", {}).get(k, []))
    return Units(ids, stats, mean_score) if len(ids) else None


def _absorbed(results: dict[str, Any]) -> Units | None:
    ab = results.get("absorption")
    if ab is None or not ab.n_tested:
        return None
    # a class's id is its name's checksum: each SAE lists only the classes it tested, and ids must agree
    rows = [(zlib.crc32(str(r["class"]).encode()), r["absorbed"]) for r in ab.classes if r.get("absorbed") is not None]
    if not rows:
        return None
    ids = np.array([i for i, _ in rows], dtype=np.int64)
    return Units(ids, np.array([[v, 1.0] for _, v in rows], dtype=np.float64), mean_score)


METRICS: list[Metric] = [
    Metric("fvu", "normalised MSE (FVU)", False, "images", _recon),
    Metric("recovery", "behaviour recovered when spliced in", True, "images", _splice, pct=True),
    Metric("coverage", "label coverage (classes with a feature at AUROC >= min)", True, "classes",
           lambda r: _classes(r, _covered), pct=True),
    Metric("best_auroc", "best feature's AUROC, mean over classes", True, "classes",
           lambda r: _classes(r, _best_auroc)),
    Metric("specificity", "edit specificity (target - other change rate)", True, "images", _edits, pct=True),
    Metric("spatial", "spatial coherence (mean Moran's I over features)", True, "features", _spatial),
    Metric("probe_k1", "sparse probe, k=1 (balanced accuracy, mean over classes)", True, "classes", _probe_k1,
           pct=True),
    Metric("absorbed", "absorption (share of a class's positives taken by a close feature)", False, "classes",
           _absorbed, pct=True),
]
"""Every metric the SAE is compared with its baselines on; a new evaluation adds its entry here."""


def _aligned(units: dict[str, Units]) -> tuple[int, dict[str, np.ndarray]]:
    """Each SAE's statistics over the union of the unit ids, zero where it has none (a unit it never scored adds
    nothing to its sums)."""
    ids = np.unique(np.concatenate([u.ids for u in units.values()]))
    out = {}
    for name, u in units.items():
        m = np.zeros((len(ids), u.stats.shape[1]), np.float64)
        m[np.searchsorted(ids, u.ids)] = u.stats
        out[name] = m
    return len(ids), out


def _ci(point: float, rows: np.ndarray) -> dict[str, float]:
    lo, hi = percentile_ci(rows)
    return {"mean": point, "lo": lo, "hi": hi}


def compare(metric: Metric, sae: Units, baselines: dict[str, Units], n_boot: int, seed: int) -> dict[str, Any]:
    """The SAE's and each baseline's value with a CI, and the SAE's margin over each (positive: the SAE is better),
    all from the same resamples of the units; `best` is the baseline with the best value."""
    n, stats = _aligned({"sae": sae, **baselines})
    w = resample_weights(n, n_boot, seed)
    score = sae.score
    point = {k: float(score(m.sum(0, keepdims=True))[0]) for k, m in stats.items()}
    boot = {k: score(w @ m) for k, m in stats.items()}
    sign = 1.0 if metric.higher_better else -1.0
    rows = {}
    for kind in baselines:
        rows[kind] = {"value": _ci(point[kind], boot[kind]),
                      "margin": _ci(sign * (point["sae"] - point[kind]), sign * (boot["sae"] - boot[kind]))}
    ranked = [k for k in baselines if math.isfinite(point[k])]
    best = max(ranked, key=lambda k: sign * point[k]) if ranked else None
    return {"metric": metric.name, "label": metric.label, "higher_better": metric.higher_better, "unit": metric.unit,
            "pct": metric.pct, "n_units": n, "sae": _ci(point["sae"], boot["sae"]), "baselines": rows,
            "best": best, "margin": rows[best]["margin"] if best is not None else None}


def table(sae: dict[str, Any], baselines: dict[str, dict[str, Any]], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """`compare` for every metric the SAE was scored on and at least one baseline too (others are left out; a
    baseline that lacks a part, e.g. edits with no class covered, is left out of that metric's row)."""
    out = []
    for metric in METRICS:
        mine = metric.units(sae)
        if mine is None:
            continue
        theirs = {k: u for k, r in baselines.items() if (u := metric.units(r)) is not None}
        if theirs:
            row = compare(metric, mine, theirs, n_boot, seed)
            row["missing"] = sorted(set(baselines) - set(theirs))
            out.append(row)
    return out
