"""Seed and width stability: how many features two SAEs share, by an optimal one-to-one matching of their directions.

Each SAE's decoder rows and encoder columns are taken into the raw activation space (the SAE's normalisation folded
in), unit-normed, and matched pair by pair on cosine similarity (`scipy.optimize.linear_sum_assignment`). Between
widths the matching covers the narrower SAE, and a nested view counts, for each narrow feature, the wide features
close to it (a feature split into several).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from saevctl import atomic, lock
from saevctl.errors import MismatchError
from saevctl.eval.config import StabilityConfig
from saevctl.memory import check_memory, physical_memory
from saevctl.sae.model import SAE

THRESHOLDS = (0.7, 0.9)
"""A feature has a partner when its matched cosine exceeds these (the usual 'shared' and 'near-identical')."""
SPLIT_COS = 0.7
"""In the nested view a wide feature belongs to a narrow one above this cosine."""
MAX_SPLITS = 5
"""The split histogram's last bin counts this many wide features or more."""
Matrix = NDArray[np.float64]


@dataclass(frozen=True)
class Directions:
    """One SAE's feature directions in raw activation space, unit rows (n_latents, d)."""

    name: str
    path: Path
    dec: Matrix
    enc: Matrix
    model: dict[str, Any]
    layer: int | None


@dataclass(frozen=True)
class PairResult:
    a: str
    b: str
    dec: dict[str, float]
    """Decoder: `>0.7`, `>0.9` (fraction of the narrower SAE's features matched above), mean matched cosine."""
    enc: dict[str, float]
    """The same for encoder directions (matched on their own)."""
    nested: dict[str, Any] | None
    """Widths differ: per narrow feature, the number of wide features above SPLIT_COS (mean and histogram)."""
    exemplars: dict[str, Any] | None
    """Both mined into --index from one store: top-exemplar overlap of matched features vs random pairs."""
    matched_dec: list[float]
    matched_enc: list[float]


@dataclass(frozen=True)
class StabilityResult:
    names: list[str]
    widths: list[int]
    pairs: list[PairResult]
    summary: Path
    plot: Path
    exemplar_note: str | None = None
    """With --index: which SAEs had no exemplars to compare, and why."""

    def pair(self, i: int, j: int) -> PairResult:
        """The result of SAEs i and j (either order)."""
        a, b = self.names[min(i, j)], self.names[max(i, j)]
        return next(p for p in self.pairs if (p.a, p.b) == (a, b))


def _unit(m: torch.Tensor) -> Matrix:
    m = m.detach().double()
    unit: Matrix = (m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    return unit


def directions(sae: SAE, name: str, path: Path) -> Directions:
    """x_norm = (x - mean) * scale, so a decoder row w adds w / scale to raw x, and an encoder column v reads
    x through v * scale: with a per-dimension scale the raw-space directions differ from the stored ones."""
    scale = sae.act_scale.detach().double().cpu()
    dec = sae.W_dec.detach().double().cpu() / scale  # (s, d), scale () or (d,)
    enc = sae.W_enc.detach().double().cpu().t() * scale  # (s, d)
    return Directions(name, path, _unit(dec), _unit(enc), dict(sae.cfg.model), sae.cfg.layer)


def _names(paths: tuple[Path, ...]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [p.resolve().name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _model_id(model: dict[str, Any]) -> str | None:
    return model.get("weights_sha256") or model.get("spec") or None


def _check_compatible(ds: list[Directions]) -> None:
    first = ds[0]
    for other in ds[1:]:
        if other.dec.shape[1] != first.dec.shape[1]:
            raise MismatchError(f"{other.name} reads d={other.dec.shape[1]}, {first.name} d={first.dec.shape[1]}",
                                "compare SAEs of the same model and layer width")
        a, b = _model_id(first.model), _model_id(other.model)
        if a is not None and b is not None and a != b:
            raise MismatchError(f"{other.name} was trained on another model than {first.name} "
                                f"({other.model.get('spec', b)} vs {first.model.get('spec', a)})",
                                "compare SAEs of the same model")


def assign(x: Matrix, y: Matrix) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """The optimal one-to-one matching of x's rows with y's (unit rows): (rows of x, rows of y, their cosines)."""
    from scipy.optimize import linear_sum_assignment

    cos = x @ y.T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64), np.asarray(cos[rows, cols], dtype=np.float64)


def match(x: Matrix, y: Matrix) -> NDArray[np.float64]:
    """Cosines of the optimal one-to-one matching of x's rows with y's (unit rows): min(len(x), len(y)) values."""
    return assign(x, y)[2]


def exemplar_overlap(ex_a: NDArray[np.int64], ex_b: NDArray[np.int64], rows: NDArray[np.int64],
                     cols: NDArray[np.int64], cos: NDArray[np.float64], seed: int = 0) -> dict[str, Any]:
    """Jaccard overlap of the top exemplar images of matched features (decoder cosine > 0.7), next to the same
    overlap for random pairs of features that fire (what chance gives on this data)."""
    def jaccard(i: int, j: int) -> float | None:
        a, b = set(ex_a[i][ex_a[i] >= 0].tolist()), set(ex_b[j][ex_b[j] >= 0].tolist())
        return len(a & b) / len(a | b) if a and b else None

    def mean(pairs: list[tuple[int, int]]) -> tuple[float, int]:
        vals = [v for i, j in pairs if (v := jaccard(i, j)) is not None]
        return (float(np.mean(vals)) if vals else float("nan")), len(vals)

    matched, n = mean([(int(i), int(j)) for i, j, c in zip(rows, cols, cos, strict=True) if c > THRESHOLDS[0]])
    rng = np.random.default_rng(seed)
    live_a, live_b = np.flatnonzero(ex_a[:, 0] >= 0), np.flatnonzero(ex_b[:, 0] >= 0)
    m = min(2000, len(live_a), len(live_b))
    pick_a, pick_b = rng.choice(live_a, m, replace=False).tolist(), rng.choice(live_b, m, replace=False).tolist()
    rand, _ = mean(list(zip(pick_a, pick_b, strict=True))) if m else (float("nan"), 0)
    return {"matched_above": THRESHOLDS[0], "jaccard_matched": matched, "n_matched": n, "jaccard_random": rand}


def _figures(matched: NDArray[np.float64]) -> dict[str, float]:
    out = {f">{t:g}": float((matched > t).mean()) for t in THRESHOLDS}
    out["mean"] = float(matched.mean())
    return out


def nested(narrow: Matrix, wide: Matrix) -> dict[str, Any]:
    """For each narrow feature, how many wide decoder directions exceed SPLIT_COS: mean and histogram."""
    counts = ((narrow @ wide.T) > SPLIT_COS).sum(axis=1)
    hist = {str(k): int((counts == k).sum()) for k in range(MAX_SPLITS)}
    hist[f"{MAX_SPLITS}+"] = int((counts >= MAX_SPLITS).sum())
    return {"threshold": SPLIT_COS, "mean": float(counts.mean()),
            "split": float((counts >= 2).mean()), "histogram": hist}


def compare(a: Directions, b: Directions, exemplars: dict[str, NDArray[np.int64]] | None = None) -> PairResult:
    rows, cols, md = assign(a.dec, b.dec)
    me = match(a.enc, b.enc)
    nest = None
    if len(a.dec) != len(b.dec):
        narrow, wide = (a, b) if len(a.dec) < len(b.dec) else (b, a)
        nest = {"narrow": narrow.name, "wide": wide.name, **nested(narrow.dec, wide.dec)}
    ex = None
    if exemplars is not None and a.name in exemplars and b.name in exemplars:
        ex = exemplar_overlap(exemplars[a.name], exemplars[b.name], rows, cols, md)
    return PairResult(a.name, b.name, _figures(md), _figures(me), nest, ex, md.tolist(), me.tolist())


def mined_exemplars(index: Path, ds: list[Directions]) -> tuple[dict[str, NDArray[np.int64]], str | None]:
    """Each SAE's exemplar image ids from the index, for those mined there from one store (exemplar ids of two
    stores do not name the same images); and a note on what was left out."""
    from saevctl.errors import IndexError_
    from saevctl.mine.index import Index

    out: dict[str, NDArray[np.int64]] = {}
    stores: dict[str, str] = {}
    missing = []
    with Index.open(index) as idx:
        for d in ds:
            try:
                sae_id = idx.resolve_sae(str(d.path))
            except IndexError_:
                missing.append(d.name)
                continue
            stores[d.name] = str(idx.sae_info(sae_id)["store_id"])
            out[d.name] = idx.exemplar_images(sae_id)
    notes = [f"not mined into {index}: {', '.join(missing)}"] if missing else []
    if len(set(stores.values())) > 1:
        first = next(iter(stores.values()))
        notes.append("mined from different stores: exemplar overlap only between SAEs of the first one")
        out = {n: e for n, e in out.items() if stores[n] == first}
    return out, "; ".join(notes) or None


def _plot(pairs: list[PairResult], fpath: Path) -> None:
    """Histograms of the matched cosines, decoder and encoder, one outline per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(-0.2, 1.0, 61)
    for ax, kind in zip(axes, ("decoder", "encoder"), strict=True):
        for p in pairs:
            vals = p.matched_dec if kind == "decoder" else p.matched_enc
            ax.hist(np.clip(vals, -0.2, 1.0), bins=bins, histtype="step", lw=1.2, label=f"{p.a} vs {p.b}")
        for t in THRESHOLDS:
            ax.axvline(t, color="grey", ls="--", lw=0.8)
        ax.set_title(f"{kind} directions: cosine of each matched pair")
        ax.set_xlabel("cosine similarity (one-to-one matching)")
        ax.set_ylabel("features")
    if len(pairs) <= 10:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(fpath, buf.getvalue())  # one atomic write: a full disk leaves the old plot or none


def _summary(ds: list[Directions], pairs: list[PairResult]) -> dict[str, Any]:
    return {
        "thresholds": list(THRESHOLDS),
        "saes": [{"name": d.name, "path": str(d.path), "n_latents": len(d.dec), "d": d.dec.shape[1],
                  "layer": d.layer, "model": d.model.get("spec")} for d in ds],
        "pairs": [{"a": p.a, "b": p.b, "decoder": p.dec, "encoder": p.enc, "nested": p.nested,
                   "exemplars": p.exemplars} for p in pairs],
    }


def run_stability(cfg: StabilityConfig) -> StabilityResult:
    """Match every pair of `cfg.saes`; write stability.json and stability.png into `cfg.out`."""
    names = _names(cfg.saes)
    ds = [directions(SAE.load(p, "cpu"), n, p) for p, n in zip(cfg.saes, names, strict=True)]
    _check_compatible(ds)
    widths = sorted(len(d.dec) for d in ds)
    # the largest pair's float64 cosine matrix, and the assignment's working copy of it
    check_memory(2 * 8 * widths[-1] * widths[-2], f"matching SAEs of {widths[-2]:,} and {widths[-1]:,} features",
                 "compare narrower SAEs, or run on a machine with more memory", available=physical_memory())
    exemplars, note = mined_exemplars(cfg.index, ds) if cfg.index is not None else (None, None)
    pairs = [compare(a, b, exemplars) for a, b in itertools.combinations(ds, 2)]
    summary, plot = cfg.out / "stability.json", cfg.out / "stability.png"
    with lock.exclusive(cfg.out, "the stability output folder"):
        cfg.out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(summary, _summary(ds, pairs) | {"exemplar_note": note})
        _plot(pairs, plot)
    return StabilityResult(names, [len(d.dec) for d in ds], pairs, summary, plot, note)
