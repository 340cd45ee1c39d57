"""Feature absorption at image level: for each class whose best feature (by AUROC of its image-level code) reaches
MIN_AUROC, the share of the class's images on which that feature is silent while a feature with a close decoder
direction fires instead (it has absorbed the class there), next to the share on which it is silent at all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from saevctl.eval.config import MIN_AUROC
from saevctl.eval.imagecodes import ImageCodes, LabelSet
from saevctl.eval.metrics import percentile_ci, resample_weights
from saevctl.eval.stability import directions
from saevctl.sae.model import SAE

RANK_COLUMNS = 1024
"""Features ranked at once (memory: n_images x this float64)."""
N_ABSORBERS = 3
"""Absorbing features listed per class (those firing on most of its absorbed images)."""


@dataclass
class AbsorptionResult:
    source: str
    cos: float
    min_auroc: float
    classes: list[dict[str, Any]]
    """Per class: name, n_positive, feature, auroc, n_close, silent, absorbed, absorbers (feature, images)."""
    absorbed: dict[str, float]
    """Mean over the classes tested of the absorbed share, with a bootstrap CI over images."""
    silent: dict[str, float]
    """The same for the share of positives on which the best feature is silent."""
    n_tested: int
    n_classes: int
    notes: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, labels: LabelSet, cos: float) -> AbsorptionResult:
        """No class to test (`labels.note` says why)."""
        nan = {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
        return cls(labels.source, cos, MIN_AUROC, [], nan, dict(nan), 0, 0, [labels.note])

    def figures(self) -> dict[str, Any]:
        return {"labels": self.source, "cos": self.cos, "min_auroc": self.min_auroc, "level": "image",
                "n_tested": self.n_tested, "n_classes": self.n_classes, "absorbed": self.absorbed,
                "silent": self.silent, "classes": self.classes, "notes": self.notes}


def aurocs(x_ns: np.ndarray, y_nc: np.ndarray) -> np.ndarray:
    """(c, s) AUROC of every feature for every class (positives against all other rows; ties count one half), from
    the features' ranks: (rank sum of positives - n+(n+ + 1)/2) / (n+ n-)."""
    y = y_nc.astype(np.float64)
    n_pos = y.sum(0)
    n_neg = len(y) - n_pos
    out = np.empty((y.shape[1], x_ns.shape[1]))
    for lo in range(0, x_ns.shape[1], RANK_COLUMNS):
        ranks = rankdata(x_ns[:, lo : lo + RANK_COLUMNS], axis=0)  # average ranks of ties
        out[:, lo : lo + RANK_COLUMNS] = (y.T @ ranks - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * n_neg)[:, None]
    return out


def close_features(dec_sd: np.ndarray, feature: int, cos: float) -> np.ndarray:
    """Latents (other than `feature`) whose unit decoder direction (rows of `dec_sd`) has cosine > `cos` with it."""
    sims = dec_sd @ dec_sd[feature]
    sims[feature] = -np.inf
    return np.flatnonzero(sims > cos)


def _class_row(name: str, codes_ns: np.ndarray, pos_n: np.ndarray, feature: int, auroc: float,
               close: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    silent = pos_n & (codes_ns[:, feature] <= 0)
    fires_close = codes_ns[:, close] > 0  # (n, n_close)
    absorbed = silent & fires_close.any(axis=1)
    counts = fires_close[absorbed].sum(0)
    top = np.argsort(-counts, kind="stable")[:N_ABSORBERS]
    n_pos = int(pos_n.sum())
    row = {"class": name, "n_positive": n_pos, "feature": feature, "auroc": auroc, "n_close": len(close),
           "silent": int(silent.sum()) / n_pos, "absorbed": int(absorbed.sum()) / n_pos,
           "absorbers": [{"feature": int(close[i]), "images": int(counts[i])} for i in top if counts[i] > 0]}
    return row, silent, absorbed


def _mean_ci(num_cn: np.ndarray, pos_cn: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Mean over classes of num/pos per class, with a percentile CI over images resampled together."""
    w = resample_weights(num_cn.shape[1], n_boot, seed)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without a class's positives leaves it out
        boot = np.nanmean((w @ num_cn.T) / (w @ pos_cn.T), axis=1)
    lo, hi = percentile_ci(boot)
    return {"mean": float((num_cn.sum(1) / pos_cn.sum(1)).mean()), "lo": lo, "hi": hi}


def absorption_from_codes(sae: SAE, codes: ImageCodes, labels: LabelSet, cos: float, n_boot: int, seed: int,
                          min_auroc: float = MIN_AUROC) -> AbsorptionResult:
    """Absorption of each class's best feature, over the labelled images of `codes`."""
    rows = np.flatnonzero(labels.known_n)
    x, y = codes.codes_ns[rows], labels.y_nc[rows]
    auc = aurocs(x, y)
    best = auc.argmax(axis=1)
    dec = directions(sae, "", Path()).dec  # in raw activation space, as eval stability compares them
    out, silent, absorbed, pos = [], [], [], []
    for c, name in enumerate(labels.classes):
        f, a = int(best[c]), float(auc[c, best[c]])
        if a < min_auroc:
            out.append({"class": name, "n_positive": int(y[:, c].sum()), "feature": f, "auroc": a, "tested": False})
            continue
        row, s, ab = _class_row(name, x, y[:, c], f, a, close_features(dec, f, cos))
        out.append({**row, "tested": True})
        silent.append(s)
        absorbed.append(ab)
        pos.append(y[:, c])
    if pos:
        p = np.stack(pos).astype(np.float64)
        mean_abs = _mean_ci(np.stack(absorbed).astype(np.float64), p, n_boot, seed)
        mean_sil = _mean_ci(np.stack(silent).astype(np.float64), p, n_boot, seed)
    else:
        mean_abs = mean_sil = {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return AbsorptionResult(labels.source, cos, min_auroc, out, mean_abs, mean_sil, len(pos), len(labels.classes))
