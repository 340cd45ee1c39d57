"""Questions that need more than a lookup: which features fire on this part of a new image (the paper's
Figure 2), which features are like this one, and which feature of another SAE matches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl.errors import CheckpointError, IndexError_, InputError, ModelError
from saevctl.mine import vectors
from saevctl.mine.index import Index

if TYPE_CHECKING:  # the SAE (torch) and PIL load when an image is encoded
    from PIL import Image

    from saevctl.sae import SAE

log = logging.getLogger(__name__)


def parse_patches(text: str, grid: tuple[int, int]) -> list[int]:
    """'r,c;r,c' (0-based rows and columns of the patch grid) to flat patch indices."""
    gh, gw = grid
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        try:
            r, c = (int(v) for v in part.split(","))
        except ValueError as e:
            raise InputError(
                f"bad patch {part!r} in --patches", "write row,col pairs separated by ';', e.g. 3,4;3,5"
            ) from e
        if not (0 <= r < gh and 0 <= c < gw):
            raise InputError(
                f"patch {r},{c} is outside the {gh}x{gw} patch grid", f"rows 0..{gh - 1}, columns 0..{gw - 1}"
            )
        out.append(r * gw + c)
    if not out:
        raise InputError("--patches names no patch", "write row,col pairs separated by ';'")
    return sorted(set(out))


def parse_box(text: str, grid: tuple[int, int], size: int) -> list[int]:
    """'x0,y0,x1,y1' in pixels of the model's square input to the patches the box overlaps."""
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError as e:
        raise InputError(f"bad --box {text!r}", f"write x0,y0,x1,y1 in pixels of the {size}x{size} model input") from e
    gh, gw = grid
    ph, pw = size / gh, size / gw
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise InputError(
            f"--box {text} is not inside the {size}x{size} model input", "use 0 <= x0 < x1 <= size, same for y"
        )
    rows = range(int(y0 // ph), min(gh, int(np.ceil(y1 / ph))))
    cols = range(int(x0 // pw), min(gw, int(np.ceil(x1 / pw))))
    return [r * gw + c for r in rows for c in cols]


@dataclass
class SearchResult:
    sae_id: str
    image: str
    view: Image.Image
    """The image as the model saw it."""
    grid: tuple[int, int]
    selected: list[int]
    codes_ps: np.ndarray
    """Codes of every patch (p, s)."""
    features: list[tuple[int, float]]
    """(feature, summed code over the selected patches), best first."""


def load_sae_for(index: Index, sae_id: str, sae_path: str | Path | None = None) -> SAE:
    from saevctl.sae import SAE

    info = index.sae_info(sae_id)
    path = Path(sae_path or info["ckpt_path"])
    if not path.exists():
        raise CheckpointError(
            f"the checkpoint of {sae_id} recorded in the index ({path}) is gone", "pass --sae PATH to it"
        )
    sae = SAE.load(path)
    if sae.header.get("weights_sha256") != info["weights_sha256"]:
        raise CheckpointError(f"the checkpoint at {path} is not the SAE {sae_id} mined into {index.fpath}",
                              "pass the checkpoint that was mined, or mine this one")
    return sae


def encode_image(
    index: Index, sae_id: str, image: str, sae_path: str | Path | None = None
) -> tuple[Image.Image, np.ndarray]:
    """Run an image through the backbone to the SAE's layer and through the SAE: (model view, codes (p, s))."""
    import torch

    from saevctl.data import open_image
    from saevctl.mine.figures import model_view
    from saevctl.vit import load_backbone

    info = index.sae_info(sae_id)
    if "patches" not in info["tokens"]:
        raise IndexError_(f"SAE {sae_id} was not trained on patch tokens", "search needs a patch SAE")
    img = open_image(str(image))
    sae = load_sae_for(index, sae_id, sae_path)
    bb = load_backbone(info["model"]["spec"], "cpu")
    if bb.weights_sha256 != info["model_sha256"]:
        raise ModelError(f"the model {info['model_spec']} now loads other weights than the ones {sae_id} was mined on",
                         "restore that model's files, or re-extract and re-mine")
    layer = int(info["layer"])
    with torch.inference_mode():
        x_btd = bb.forward_to(bb.preprocess(img)[None], [layer])[layer]
        codes_ps = sae.encode(bb.layout.split(x_btd)["patches"][0]).float().numpy()
    return model_view(img, info["model"]["preprocess"]), codes_ps


def search_image(index: Index, sae_id: str, image: str, patches: str | None = None, box: str | None = None,
                 n: int = 8, sae_path: str | Path | None = None) -> SearchResult:
    """Sum the codes over the chosen patches (all when none are given) and take the top features."""
    info = index.sae_info(sae_id)
    grid = (int(info["grid_h"]), int(info["grid_w"]))
    if patches and box:
        raise InputError("give --patches or --box, not both", "pick one way to choose patches")
    if not Path(image).exists() and not str(image).startswith("skimage:"):
        raise InputError(f"image {image} does not exist", "check the path")
    view, codes_ps = encode_image(index, sae_id, image, sae_path)
    if patches:
        sel = parse_patches(patches, grid)
    elif box:
        sel = parse_box(box, grid, int(info["model"]["preprocess"]["size"]))
    else:
        sel = list(range(codes_ps.shape[0]))
    return SearchResult(sae_id, str(image), view, grid, sel, codes_ps, top_features(codes_ps, sel, n))


def top_features(codes_ps: np.ndarray, selected: list[int], n: int) -> list[tuple[int, float]]:
    """The paper's Figure 2 ranking: (feature, sum of its codes over the selected patches), the n largest sums
    first (ties by id), features that fire on none of them left out. saevctl serve ranks a selection the same way."""
    summed_s = codes_ps[selected].sum(0)
    order = np.argsort(-summed_s, kind="stable")[:n]
    return [(int(f), float(summed_s[f])) for f in order if summed_s[f] > 0]


def similar(index: Index, sae_id: str, feature: int, n: int = 10) -> list[tuple[int, float]]:
    """The nearest other features of the same SAE by decoder cosine (faiss)."""
    feature = index.check_feature(sae_id, feature)
    sha = index.sae_info(sae_id)["weights_sha256"]
    fx = vectors.load(index.fpath, sae_id, sha)
    query = (
        fx.reconstruct(feature) if hasattr(fx, "reconstruct") else vectors.load_decoder(index.fpath, sae_id)[feature]
    )
    sims, ids = vectors.search(fx, np.asarray(query)[None], n + 1)
    return [(int(i), float(s)) for i, s in zip(ids[0], sims[0], strict=True) if i != feature and i >= 0][:n]


@dataclass
class MatchResult:
    method: str
    """'decoder cosine' (same model and layer) or 'exemplar contrast' (another model or layer)."""
    matches: list[dict[str, Any]]
    """feature, score (and method-specific columns), best first."""
    n_shared_images: int = 0


def match(index: Index, sae_a: str, feature: int, sae_b: str, n: int = 10) -> MatchResult:
    """The features of SAE B closest to SAE A's `feature`."""
    feature = index.check_feature(sae_a, feature)
    a, b = index.sae_info(sae_a), index.sae_info(sae_b)
    if a["model_sha256"] == b["model_sha256"] and a["layer"] == b["layer"] and a["d"] == b["d"]:
        query = vectors.load_decoder(index.fpath, sae_a)[feature]
        sims, ids = vectors.search(vectors.load(index.fpath, sae_b, b["weights_sha256"]), query[None], n)
        rows = [{"feature": int(i), "score": float(s)} for i, s in zip(ids[0], sims[0], strict=True) if i >= 0]
        return MatchResult("decoder cosine", rows)
    paths = [ex["path"] for ex in index.top_exemplars(sae_a, feature)]
    ids_b = index.image_ids_by_path(sae_b, paths)
    if not ids_b:
        raise IndexError_(
            f"SAE {sae_b}'s store holds none of the exemplar images of {sae_a} feature {feature}",
            "mine both SAEs on stores extracted from the same images",
        )
    return MatchResult("exemplar contrast", index.contrast_features(sae_b, ids_b, n), len(ids_b))
