"""Bulk reads of a mined index for the report: whole feature tables, sparse histograms and exemplars of a
range of features per query (the per-feature Index methods would cost several queries per page).

Everything goes through an `Index` opened read-only, with bound parameters, on the schema in saevctl/mine/schema.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from saevctl.errors import IndexError_, OutputError

log = logging.getLogger(__name__)
STAT_COLUMNS = ("freq", "img_freq", "mean", "mean_all", "max", "img_mean", "n_fired")


@dataclass(frozen=True)
class Exemplar:
    rank: int
    image_id: int
    path: str
    label: str | None
    value: float
    n_fired: int
    acts_hw: np.ndarray | None
    """Per-patch activations on the patch grid (float32), None for CLS exemplars."""


def feature_table(idx: Any, sae_id: str, token: str) -> dict[str, np.ndarray]:
    """Every feature's statistics as numpy columns, indexed by feature id (length n_latents)."""
    cols = ", ".join(STAT_COLUMNS)
    got = idx.con.execute(
        f"SELECT feature, {cols} FROM features WHERE sae_id = ? AND token = ? ORDER BY feature",
        [sae_id, token]).fetchnumpy()
    n = idx.n_features(sae_id)
    out = {c: np.zeros(n, dtype=np.int64 if c == "n_fired" else np.float64) for c in STAT_COLUMNS}
    feat = np.asarray(got["feature"], dtype=np.int64)
    for c in STAT_COLUMNS:
        out[c][feat] = np.asarray(got[c])
    return out


def histograms(idx: Any, sae_id: str, token: str) -> dict[int, np.ndarray]:
    """Each feature's counts over the log10 bins of saevctl.mine.scan.hist_edges (only features that fired)."""
    from saevctl.mine.scan import hist_edges

    n_bins = len(hist_edges())
    got = idx.con.execute(
        "SELECT feature, bin, count FROM histograms WHERE sae_id = ? AND token = ? ORDER BY feature, bin",
        [sae_id, token]).fetchnumpy()
    out: dict[int, np.ndarray] = {}
    for f, b, c in zip(np.asarray(got["feature"]), np.asarray(got["bin"]), np.asarray(got["count"])):
        out.setdefault(int(f), np.zeros(n_bins, dtype=np.int64))[int(b)] = int(c)
    return out


def exemplars(idx: Any, sae_id: str, token: str, lo: int, hi: int, k: int, grid: tuple[int, int]) -> dict[int, list[Exemplar]]:
    """The top-k exemplars of features lo..hi (inclusive), best first, in one query."""
    store_id = idx.sae_info(sae_id)["store_id"]
    rows = idx.con.execute(
        "SELECT e.feature, e.rank, e.image_id, i.path, i.label, e.value, e.n_fired, e.acts FROM exemplars e "
        "LEFT JOIN images i ON i.store_id = ? AND i.image_id = e.image_id "
        "WHERE e.sae_id = ? AND e.token = ? AND e.feature BETWEEN ? AND ? AND e.rank < ? ORDER BY e.feature, e.rank",
        [store_id, sae_id, token, int(lo), int(hi), int(k)]).fetchall()
    out: dict[int, list[Exemplar]] = {}
    n_patches = grid[0] * grid[1]
    for f, rank, image_id, path, label, value, n_fired, blob in rows:
        acts = None
        if blob:
            # Same encoding the mine writer uses: little-endian float16 over the patch grid, row-major.
            flat = np.frombuffer(blob, dtype="<f2").astype(np.float32)
            acts = flat.reshape(grid) if flat.size == n_patches else None
        out.setdefault(int(f), []).append(Exemplar(
            int(rank), int(image_id), str(path or f"image {image_id}"), None if label is None else str(label),
            float(value), int(n_fired or 0), acts))
    return out


def majority_label(exs: list[Exemplar]) -> tuple[str, float] | None:
    """The most common image label among a feature's exemplars and its share, when images carry labels."""
    labels = [e.label for e in exs if e.label]
    if not labels:
        return None
    label, count = Counter(labels).most_common(1)[0]
    return label, count / len(exs)


def neighbours(idx: Any, sae_id: str, features: np.ndarray, n: int) -> dict[int, list[tuple[int, float]]] | None:
    """The n nearest other features of each given feature by decoder cosine, in one batched faiss search;
    None (and a warning) when the index lacks this SAE's decoder directions."""
    from saevctl.mine import vectors

    if n <= 0 or not len(features):
        return {}
    sha = idx.sae_info(sae_id)["weights_sha256"]
    try:
        w_sd = vectors.load_decoder(idx.fpath, sae_id)
        fx = vectors.load(idx.fpath, sae_id, sha)
    except (IndexError_, OutputError) as e:
        log.warning("no neighbours for %s: %s", sae_id, e.one_line())
        return None
    sims_fk, ids_fk = vectors.search(fx, w_sd[np.asarray(features, dtype=np.int64)], n + 1)
    out = {}
    for f, sims, ids in zip(features, sims_fk, ids_fk):
        out[int(f)] = [(int(i), float(s)) for i, s in zip(ids, sims) if i >= 0 and i != f][:n]
    return out


def feature_labels(idx: Any, sae_id: str) -> dict[int, list[dict[str, Any]]]:
    """Each feature's label rows from `features label` (one per level, patch first); empty when not labelled."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in idx.feature_labels(sae_id):
        out.setdefault(int(r["feature"]), []).append(r)
    return out
