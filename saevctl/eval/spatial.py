"""Spatial coherence of an SAE's features: each feature's Moran's I on the patch grid (rook adjacency), averaged over
the images where it fires; its distribution over features as figures and a histogram.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saevctl import atomic
from saevctl.eval.imagecodes import ImageCodes
from saevctl.eval.moran import ADJACENCY, null_expectation


@dataclass
class SpatialResult:
    moran_s: np.ndarray
    """float64 (s,): each feature's mean Moran's I over the images where it fires (NaN: never scored)."""
    n_images_s: np.ndarray
    """int64 (s,): images behind each feature's mean (it fires there and its map is not flat)."""
    grid: tuple[int, int]
    n_images: int

    @property
    def scored(self) -> np.ndarray:
        out: np.ndarray = self.moran_s[np.isfinite(self.moran_s)]
        return out

    def figures(self) -> dict[str, Any]:
        """The distribution over scored features (without the per-feature arrays)."""
        v = self.scored
        q1, med, q3 = (float(q) for q in np.quantile(v, [0.25, 0.5, 0.75])) if v.size else (float("nan"),) * 3
        return {"adjacency": ADJACENCY, "grid": list(self.grid), "n_images": self.n_images,
                "n_features": len(self.moran_s), "n_scored": int(v.size), "median": med, "q1": q1, "q3": q3,
                "mean": float(v.mean()) if v.size else float("nan"),
                "null": null_expectation(self.grid[0] * self.grid[1])}

    def per_feature(self) -> dict[str, list[Any]]:
        return {"moran": [float(m) if np.isfinite(m) else None for m in self.moran_s],
                "n_images": self.n_images_s.tolist()}


def spatial_from_codes(codes: ImageCodes) -> SpatialResult:
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(codes.moran_n_s > 0, codes.moran_sum_s / np.maximum(codes.moran_n_s, 1), np.nan)
    return SpatialResult(mean, codes.moran_n_s.copy(), codes.grid, codes.n_images)


def plot(res: SpatialResult, fpath: Path, title: str) -> None:
    """Histogram of the features' mean Moran's I, with the median and the no-structure expectation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    fig_vals = res.figures()
    v = res.scored
    lo = min(float(v.min()) if v.size else 0.0, fig_vals["null"]) - 0.02  # Moran's I lies in about [-1, 1]
    hi = max(float(v.max()) if v.size else 0.0, 0.1) + 0.02
    ax.hist(v, bins=np.linspace(lo, hi, 81).tolist(), color="#3a7bd5")
    ax.axvline(fig_vals["median"], color="black", lw=1.2, label=f"median {fig_vals['median']:.3f}")
    ax.axvline(fig_vals["null"], color="grey", ls="--", lw=1, label="no spatial structure, -1/(N-1)")
    ax.set_xlabel(f"Moran's I on the {res.grid[0]}x{res.grid[1]} patch grid ({ADJACENCY}), mean over firing images")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(fpath, buf.getvalue())
