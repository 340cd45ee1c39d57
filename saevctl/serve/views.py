"""The image view and the feature page as plain data, from library calls only: the selection's features by the sum
of their codes (`mine.query.top_features`, as `features search`), a feature's statistics, histogram, top images,
faiss neighbours (`mine.query.similar`) and matches in the other SAEs of the index (`mine.query.match`); and the
pictures they show (mine's heat tiles, as the CLI's grids and the report draw them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saevctl.errors import InputError, SaevctlError
from saevctl.mine import query
from saevctl.mine.figures import TILE_PX, heat_tile, open_model_view, shared_vmax
from saevctl.serve import commands, pictures
from saevctl.serve.state import Explorer

STRIP_PX = 96
"""Side of each tile in a listed feature's exemplar strip."""


def selection(ex: Explorer, image_id: str, codes_ps: np.ndarray, cells: str) -> dict[str, Any]:
    """The features of the selected patches (all patches when `cells` is empty), the largest sums first, each with
    its frequency, label and how many selected patches it fires on (the paper's Figure 2)."""
    cells = cells.strip()
    selected = query.parse_patches(cells, ex.grid) if cells else list(range(ex.grid[0] * ex.grid[1]))
    rows = []
    for f, total in query.top_features(codes_ps, selected, ex.cfg.n_features):
        fired = int((codes_ps[selected, f] > 0).sum())
        rows.append({**ex.feature_row(f), "sum": total, "fired": fired})
    ref = ex.ref(image_id)
    return {"image": ref.public(), "selected": len(selected), "features": rows,
            "cli": commands.search(ex.target, ref.path, cells, ex.cfg.n_features)}


def _feature_id(ex: Explorer, feature: int) -> int:
    n = int(ex.info["n_latents"])
    if not 0 <= feature < n:
        raise InputError(f"feature {feature} is out of range: this SAE has features 0..{n - 1}",
                         f"pick an id from 0 to {n - 1}")
    return feature


def _matches(ex: Explorer, feature: int, other: str) -> dict[str, Any]:
    if other not in ex.others:
        raise InputError(f"no other SAE {other[:60]!r} in this index", f"pick one of: {', '.join(ex.others)}")
    try:
        res = query.match(ex.idx, ex.sae_id, feature, other, 10)
    except SaevctlError as e:  # e.g. no shared exemplar images: said on the page, not an error of the page
        return {"sae_id": other, "method": None, "rows": [], "note": e.one_line()}
    rows = [{"feature": int(m["feature"]), "score": float(m["score"])} for m in res.matches]
    return {"sae_id": other, "method": res.method, "rows": rows, "shared_images": res.n_shared_images, "note": None}


def feature_page(ex: Explorer, feature: int, other: str | None, n_similar: int = 10) -> dict[str, Any]:
    """Everything the feature page shows; `other` is the SAE of the same index to find matches in."""
    feature = _feature_id(ex, feature)
    other = other or (ex.others[0] if ex.others else None)
    with ex.lock:
        stats = ex.idx.feature_stats(ex.sae_id, feature, "patches")
        hist = ex.idx.histogram(ex.sae_id, feature, "patches")
        labels = ex.idx.feature_label(ex.sae_id, feature)
        similar = query.similar(ex.idx, ex.sae_id, feature, n_similar)
        matches = _matches(ex, feature, other) if other is not None else None
    top = [{"rank": int(e["rank"]), "image_id": str(e["image_id"]), "name": ex.refs[str(e["image_id"])].name
            if str(e["image_id"]) in ex.refs else str(e["path"]), "label": e["label"], "value": float(e["value"]),
            "fired": int(e["n_fired"])} for e in ex.top_exemplars(feature)]
    return {
        "feature": feature, "stats": {k: v for k, v in stats.items() if k not in ("sae_id", "token", "feature")},
        "labels": [{"level": r["level"], "name": r["class_name"], "auroc": r["auroc"], "f1": r["f1"]}
                   for r in labels],
        "histogram": [{"lo": b["lo"], "hi": b["hi"], "count": b["count"]} for b in hist],
        "top": top, "n_patches": ex.grid[0] * ex.grid[1],
        "similar": [{**ex.feature_row(f), "cosine": s} for f, s in similar],
        "matches": matches, "others": ex.others,
        "cli": commands.feature(ex.target, feature, n_similar, other),
    }


# --- pictures ------------------------------------------------------------------------------------


def _tiles(ex: Explorer, feature: int, k: int, px: int) -> tuple[list[Any], float]:
    exemplars = ex.top_exemplars(feature)[:k]
    vmax = shared_vmax(exemplars)
    pre = ex.info["model"]["preprocess"]
    tiles = [heat_tile(open_model_view(e["path"], pre), e["acts"].reshape(e["grid"]) if len(e["acts"]) else None,
                       vmax, px) for e in exemplars]
    return tiles, vmax


def strip_png(ex: Explorer, feature: int) -> bytes:
    """The feature's top exemplars side by side, firing patches heat-overlaid on one scale."""
    feature = _feature_id(ex, feature)

    def draw() -> bytes:
        return pictures.png(pictures.hstrip(_tiles(ex, feature, ex.cfg.strip, STRIP_PX)[0]))

    return ex.picture(("strip", feature), draw)


def tile_png(ex: Explorer, feature: int, rank: int) -> bytes:
    """One top image of the feature, its firing patches heat-overlaid on the scale its grid shares."""
    feature = _feature_id(ex, feature)
    exemplars = ex.top_exemplars(feature)
    if not 0 <= rank < len(exemplars):
        raise InputError(f"feature {feature} has no top image of rank {rank}",
                         f"ranks go 0..{len(exemplars) - 1}" if exemplars else "this feature never fired")

    def draw() -> bytes:
        e = exemplars[rank]
        acts = e["acts"].reshape(e["grid"]) if len(e["acts"]) else None
        img = open_model_view(e["path"], ex.info["model"]["preprocess"])
        return pictures.png(heat_tile(img, acts, shared_vmax(exemplars), TILE_PX))

    return ex.picture(("tile", feature, rank), draw)


def heat_png(ex: Explorer, image_id: str, codes_ps: np.ndarray, feature: int) -> bytes:
    """Where the feature fires on this image, on the scale of its exemplar strip (or higher, if it fires more)."""
    feature = _feature_id(ex, feature)

    def draw() -> bytes:
        from PIL import Image

        values = codes_ps[:, feature]
        vmax = max(shared_vmax(ex.top_exemplars(feature)[: ex.cfg.strip]), float(values.max()))
        view = Image.fromarray(ex.view_u8(ex.ref(image_id)))
        return pictures.png(heat_tile(view, values.reshape(ex.grid), vmax, STRIP_PX))

    return ex.picture(("heat", image_id, feature), draw)


def view_png(ex: Explorer, image_id: str) -> bytes:
    """The image as the model sees it, at the model's input size (the page draws the patch grid over it)."""
    from PIL import Image

    ref = ex.ref(image_id)
    return ex.picture(("view", image_id), lambda: pictures.png(Image.fromarray(ex.view_u8(ref))))
