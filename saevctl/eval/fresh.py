"""Reruns of the evaluations (saevctl.rerun): the fingerprint of an evaluation's inputs, recorded in its JSON
summary or card (kept and recorded with saevctl.rerun.kept and .record). Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saevctl import layout, rerun, workspace

# Fields whose content is fingerprinted on its own (or that only say where the output goes).
_BY_CONTENT = ("sae", "index", "store", "images", "masks", "head", "out")


def _training_store(ckpt: Path) -> Path | None:
    """The store the checkpoint was trained on, as its config.json records it (eval's default --store)."""
    try:
        train = json.loads(layout.sae_config_fpath(ckpt).read_text()).get("train")
    except (OSError, ValueError, AttributeError):
        return None
    ref = train.get("store") if isinstance(train, dict) else None
    return Path(ref) if ref else None


def inputs(cfg: Any) -> str:
    """What an evaluation (splice, edits, recon or all) is made from: the checkpoint's weights, the store, the
    images, masks and head, the index's content, and every other option."""
    from saevctl.mine.index import Index

    ckpt = workspace.resolve_ckpt(workspace.resolve_sae_ref(cfg.sae))
    parts: dict[str, Any] = {"sae": rerun.sae_part(ckpt), "index": Index.fingerprint_of(getattr(cfg, "index", None)),
                             "config": rerun.config_part(cfg, drop=_BY_CONTENT)}
    if hasattr(cfg, "store"):
        parts["store"] = rerun.store_part(cfg.store or _training_store(ckpt))
    if hasattr(cfg, "images"):
        parts["images"] = rerun.images_part(cfg.images, getattr(cfg, "max_images", None))
    if hasattr(cfg, "masks"):
        parts["masks"] = rerun.masks_part(cfg.masks)
    if hasattr(cfg, "head"):
        parts["head"] = rerun.head_part(cfg.head)
    return rerun.digest(parts)


def summary_fpath(cfg: Any, kind: str) -> Path:
    """Where `eval <kind>` writes its summary (as saevctl.eval.common.summary_target decides)."""
    from saevctl.eval.common import out_dpath

    return cfg.out or layout.eval_summary_fpath(out_dpath(workspace.resolve_sae_ref(cfg.sae), cfg.index), kind)
