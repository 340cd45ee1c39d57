"""The report's view of a mined index: whole feature tables, sparse histograms and exemplars of a range of
features per query (the per-feature Index methods would cost several queries per page).

Everything goes through the bulk-read methods of an `Index` opened read-only; no SQL here.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl.errors import IndexError_, OutputError
from saevctl.mine.schema import STAT_COLUMNS as STAT_COLUMNS  # the columns feature_table returns

if TYPE_CHECKING:
    from saevctl.mine.index import Index

log = logging.getLogger(__name__)


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


def feature_table(idx: Index, sae_id: str, token: str) -> dict[str, np.ndarray]:
    """Every feature's statistics as numpy columns (STAT_COLUMNS), indexed by feature id (length n_latents)."""
    return idx.feature_table(sae_id, token)


def histograms(idx: Index, sae_id: str, token: str) -> dict[int, np.ndarray]:
    """Each feature's counts over the log10 bins of saevctl.mine.schema.hist_edges (only features that fired)."""
    return idx.histogram_table(sae_id, token)


def exemplars(idx: Index, sae_id: str, token: str, lo: int, hi: int, k: int,
              grid: tuple[int, int]) -> dict[int, list[Exemplar]]:
    """The top-k exemplars of features lo..hi (inclusive), best first, in one query."""
    out: dict[int, list[Exemplar]] = {}
    n_patches = grid[0] * grid[1]
    for r in idx.exemplar_range(sae_id, lo, hi, k, token):
        flat, image_id, label = r["acts"], int(r["image_id"]), r["label"]
        acts = flat.reshape(grid) if flat.size == n_patches else None
        out.setdefault(int(r["feature"]), []).append(Exemplar(
            int(r["rank"]), image_id, str(r["path"] or f"image {image_id}"), None if label is None else str(label),
            float(r["value"]), int(r["n_fired"] or 0), acts))
    return out


def majority_label(exs: list[Exemplar]) -> tuple[str, float] | None:
    """The most common image label among a feature's exemplars and its share, when images carry labels."""
    labels = [e.label for e in exs if e.label]
    if not labels:
        return None
    label, count = Counter(labels).most_common(1)[0]
    return label, count / len(exs)


def neighbours(idx: Index, sae_id: str, features: np.ndarray, n: int) -> dict[int, list[tuple[int, float]]] | None:
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
    for f, sims, ids in zip(features, sims_fk, ids_fk, strict=True):
        out[int(f)] = [(int(i), float(s)) for i, s in zip(ids, sims, strict=True) if i >= 0 and i != f][:n]
    return out


def feature_labels(idx: Index, sae_id: str) -> dict[int, list[dict[str, Any]]]:
    """Each feature's label rows from `features label` (one per level, patch first); empty when not labelled."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in idx.feature_labels(sae_id):
        out.setdefault(int(r["feature"]), []).append(r)
    return out
