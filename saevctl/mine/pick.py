"""`features pick`: features that look like concepts, by a rule anyone can rerun on an index: sparse, spatially
coherent on their top images, off the border ring and the letterbox padding, and not one photo's detector.

Torch-free: everything comes from the index's statistics and the per-patch activations of the stored exemplars.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl.data.images import source_of

if TYPE_CHECKING:
    from saevctl.mine.index import Index
    from saevctl.mine.queries import PickQuery

BLOCK = 1024
"""Features whose exemplars are read and scored at once."""


@dataclass(frozen=True)
class Pick:
    feature: int
    freq: float
    img_freq: float
    max: float
    coherence: float
    """On its median top image, the share of its firing patches that have a firing 4-neighbour."""
    border: float
    """Share of its activation (over its top images) on the outer ring of the patch grid."""
    padding: float
    """Share of its activation on patches that are mostly letterbox padding."""
    sources: int
    """Distinct source photos among its top images (saevctl.data.images.source_of)."""
    present: str
    """Its top image (the concept present)."""
    absent: str | None
    """A comparable image where it does not fire (see `absent_image`)."""
    label: str | None = None


def rule_text(q: PickQuery) -> str:
    """The rule, as the output states it."""
    return (f"sparse (fires on <= {q.max_freq:.2%} of patches and {q.min_img_freq:.2%}-{q.max_img_freq:.0%} of "
            f"images), coherent (on its median top image >= {q.min_coherence:.0%} of its firing patches have a "
            f"firing neighbour), off the border ring (<= {q.max_border:.0%} of its activation) and the padding "
            f"(<= {q.max_padding:.0%}), and top images from >= {q.min_sources} source photos; most coherent first. "
            "Columns: coherent, border, padding as shares; photos = source photos of its top images")


@cache
def _content(size: tuple[int, int], pre_json: str, grid: tuple[int, int]) -> np.ndarray:
    """Share of each patch that shows the image (not padding) for an image of this (width, height)."""
    import json

    from PIL import Image

    from saevctl.data.preprocess import Preprocess

    pre = dataclasses.replace(Preprocess.from_dict(json.loads(pre_json)), interpolation="nearest")
    valid = np.asarray(pre.geometry(Image.new("RGB", size, (255, 255, 255))))[..., 0] > 127
    gh, gw = grid
    ph, pw = valid.shape[0] // gh, valid.shape[1] // gw
    share: np.ndarray = valid[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw).mean(axis=(1, 3)).ravel()
    return share


def _ring(grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    ring = np.ones((gh, gw), bool)
    ring[1:-1, 1:-1] = False
    return ring.ravel()


def spatial_scores(acts_ep: np.ndarray, grid: tuple[int, int], padding_ep: np.ndarray) -> tuple[float, float, float]:
    """(coherence, border share, padding share) of one feature over its exemplars' (e, patches) activations.

    Coherence is the median over the exemplars of each one's share of firing patches with a firing 4-neighbour
    (an image where it fires on one patch scores 0), so a few images with large blobs cannot carry a feature
    that is scattered everywhere else."""
    gh, gw = grid
    fired = acts_ep.reshape(-1, gh, gw) > 0
    nb = np.zeros_like(fired)
    nb[:, 1:] |= fired[:, :-1]
    nb[:, :-1] |= fired[:, 1:]
    nb[:, :, 1:] |= fired[:, :, :-1]
    nb[:, :, :-1] |= fired[:, :, 1:]
    n_fired_e = fired.sum(axis=(1, 2))
    total = float(acts_ep.sum())
    if not n_fired_e.any() or total <= 0:
        return 0.0, 0.0, 0.0
    per_e = (fired & nb).sum(axis=(1, 2))[n_fired_e > 0] / n_fired_e[n_fired_e > 0]
    coherence = float(np.median(per_e))
    border = float(acts_ep[:, _ring(grid)].sum()) / total
    padding = float((acts_ep * padding_ep).sum()) / total
    return coherence, border, padding


def _candidates(idx: Index, sae_id: str, q: PickQuery) -> dict[int, dict[str, float]]:
    table = idx.feature_table(sae_id, "patches")
    ok = ((table["freq"] > 0) & (table["freq"] <= q.max_freq)
          & (table["img_freq"] >= q.min_img_freq) & (table["img_freq"] <= q.max_img_freq))
    return {int(f): {k: float(table[k][f]) for k in ("freq", "img_freq", "max")} for f in np.flatnonzero(ok)}


def pick(idx: Index, sae_id: str, q: PickQuery) -> tuple[list[Pick], int]:
    """The features that pass the rule, most coherent first (at most q.limit), and how many passed."""
    info = idx.sae_info(sae_id)
    grid = (int(info["grid_h"]), int(info["grid_w"]))
    pre_json = _preprocess_json(info)
    sizes = {int(im["image_id"]): (int(im["width"] or 0), int(im["height"] or 0)) for im in idx.images(sae_id)}
    cands = _candidates(idx, sae_id, q)
    passed: list[Pick] = []
    feats = sorted(cands)
    for lo in range(0, len(feats), BLOCK):
        block = feats[lo : lo + BLOCK]
        rows = [r for r in idx.exemplar_range(sae_id, block[0], block[-1], int(info["top_k"]), "patches")
                if r["feature"] in cands]
        by_f: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by_f.setdefault(int(r["feature"]), []).append(r)
        for f, ex in by_f.items():
            p = _score(f, ex, cands[f], grid, pre_json, sizes)
            if (p.coherence >= q.min_coherence and p.border <= q.max_border and p.padding <= q.max_padding
                    and p.sources >= q.min_sources):
                passed.append(p)
    passed.sort(key=lambda p: (-p.coherence, -p.max, p.feature))
    shown = [dataclasses.replace(p, absent=absent_image(idx, sae_id, p.feature, p.present))
             for p in passed[: q.limit]]
    return _labelled(idx, sae_id, shown), len(passed)


def _preprocess_json(info: dict[str, Any]) -> str | None:
    import json

    pre = info.get("model", {}).get("preprocess")
    return json.dumps(pre, sort_keys=True) if pre else None


def _score(f: int, ex: list[dict[str, Any]], st: dict[str, float], grid: tuple[int, int], pre_json: str | None,
           sizes: dict[int, tuple[int, int]]) -> Pick:
    acts = np.stack([np.asarray(r["acts"], dtype=np.float32) for r in ex])
    pad = np.zeros_like(acts)
    if pre_json is not None:
        for i, r in enumerate(ex):
            size = sizes.get(int(r["image_id"]))
            if size and min(size) > 0:
                pad[i] = _content(size, pre_json, grid) < 0.5
    coherence, border, padding = spatial_scores(acts, grid, pad)
    sources = len({source_of(str(r["path"])) for r in ex})
    return Pick(f, st["freq"], st["img_freq"], st["max"], coherence, border, padding, sources, str(ex[0]["path"]),
                None)


def absent_image(idx: Index, sae_id: str, feature: int, present: str) -> str | None:
    """An image like `present` without the concept: for a demo crop with a drawn shape, the same crop without it;
    else the first image from the same source photo (then any image) whose top features (mine --top-n) leave
    this feature out."""
    from saevctl.data.demo import PREFIX, without_shape

    if present.startswith(PREFIX) and without_shape(present) != present:
        return without_shape(present)
    paths = idx.images_without_feature(sae_id, feature, "patches")
    source = source_of(present)
    return next((p for p in paths if source_of(p) == source), paths[0] if paths else None)


def _labelled(idx: Index, sae_id: str, picks: list[Pick]) -> list[Pick]:
    if idx.primary_label_level(sae_id) is None:
        return picks
    out = []
    for p in picks:
        rows = idx.feature_label(sae_id, p.feature)
        out.append(dataclasses.replace(p, label=str(rows[0]["class_name"]) if rows else None))
    return out
