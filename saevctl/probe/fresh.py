"""Reruns of `probe` and `heads train` (saevctl.rerun): the fingerprint of their inputs, recorded in the probe's
JSON summary (beside its PNG) or the head's config.json. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from saevctl import rerun, workspace

_BY_CONTENT = ("sae", "index", "head", "image", "images", "masks", "class_names", "out")


def _image_part(image: str | None) -> Any:
    """One image: a file by its size and mtime, a demo or dataset path by itself."""
    if image is None:
        return None
    return rerun.file_part(image) if os.path.isfile(image) else image


def probe_inputs(cfg: Any) -> str:
    """What a probe (one image or a batch) is made from: the SAE's weights, the head, the index's content (Nx clamps,
    controls), the image(s) and the edit's options."""
    from saevctl.mine.index import Index

    ckpt = workspace.resolve_ckpt(workspace.resolve_sae_ref(cfg.sae))
    return rerun.digest({
        "sae": rerun.sae_part(ckpt), "index": Index.fingerprint_of(cfg.index), "head": rerun.head_part(cfg.head),
        "image": _image_part(getattr(cfg, "image", None)),
        "images": rerun.images_part(getattr(cfg, "images", None), getattr(cfg, "max_images", None)),
        "config": rerun.config_part(cfg, drop=_BY_CONTENT)})


def single_summary_fpath(figure: Path) -> Path:
    """The JSON summary a one-image probe writes beside its PNG (what a rerun prints again)."""
    return figure.with_suffix(".json")


def head_inputs(cfg: Any) -> str:
    """What a trained head is made from: the model, the images, the masks and class names, the options."""
    return rerun.digest({"images": rerun.images_part(cfg.images, cfg.max_images), "masks": rerun.masks_part(cfg.masks),
                         "class_names": rerun.file_part(cfg.class_names),
                         "config": rerun.config_part(cfg, drop=_BY_CONTENT)})
