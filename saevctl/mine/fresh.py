"""Reruns of `mine` and `features label` (saevctl.rerun): the fingerprint of their inputs, recorded in the index,
and the result a rerun with unchanged inputs keeps. Torch-free: a kept result loads no SAE.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saevctl import layout, rerun, workspace
from saevctl.errors import IndexError_

if TYPE_CHECKING:
    from saevctl.mine.config import Config, LabelConfig

log = logging.getLogger(__name__)


def sae_id_of(name: str | None, sae_dpath: Path) -> str | None:
    """The id `mine` gives a checkpoint (its name, then the first 8 hex digits of its weights hash), from its
    config.json alone; None when the checkpoint records no hash."""
    sha = rerun.sae_part(workspace.resolve_ckpt(sae_dpath))
    if sha is None:
        return None
    name = name or sae_dpath.resolve().name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "sae"
    return f"{safe}-{sha[:8]}"


def mine_inputs(cfg: Config) -> str:
    """What a mined SAE is made from: the checkpoint's weights, the store's manifest, the mining options.
    `cfg` is resolved (saevctl.mine.config.Config.resolved)."""
    sae_dpath, store_dpath, _ = cfg.paths()
    store = rerun.store_part(store_dpath)
    return rerun.digest({"sae": rerun.sae_part(workspace.resolve_ckpt(sae_dpath)),
                         "store": store and {k: store[k] for k in ("path", "manifest")},
                         "config": rerun.config_part(cfg, drop=("sae", "store", "index"))})


def kept_mine(cfg: Config, inputs: str) -> dict[str, Any] | None:
    """The index's row of this SAE when it was mined from these very inputs (and its faiss files are there),
    with `alive` and `n_features` added; None when it must be mined."""
    sae_dpath, _, index_fpath = cfg.paths()
    sae_id = sae_id_of(cfg.name, sae_dpath)
    if cfg.force or sae_id is None or not index_fpath.is_file():
        return None
    if not (layout.faiss_fpath(index_fpath, sae_id).is_file() and layout.decoder_fpath(index_fpath, sae_id).is_file()):
        return None
    from saevctl.mine.index import Index

    try:
        with Index.open(index_fpath, read_only=True) as idx:
            if sae_id not in idx.sae_ids():
                return None
            info = idx.sae_info(sae_id)
            if info["config"].get(rerun.KEY) != inputs:
                return None
            count = idx.feature_count(sae_id, info["tokens"][0])
    except IndexError_ as e:  # a locked or corrupt index: the full run says what is wrong
        log.info("mining again: %s", e.message)
        return None
    return {**info, "alive": count["alive"], "n_features": count["total"]}


def label_inputs(cfg: LabelConfig, sae_id: str, store_dpath: Path, mined: dict[str, Any]) -> str:
    """What `features label` results are made from: the mined SAE (its own fingerprint), the store's labels and
    the labelling options."""
    return rerun.digest({"sae_id": sae_id, "mined": mined.get("config", {}).get(rerun.KEY),
                         "store": rerun.store_part(store_dpath),
                         "config": rerun.config_part(dataclasses.replace(cfg, store=None), drop=("index", "sae"))})


def label_key(sae_id: str) -> str:
    """The index's meta key holding the fingerprint of an SAE's labels."""
    return f"labels:{sae_id}"


def label_state(cfg: LabelConfig, index_fpath: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(the fingerprint of this labelling's inputs, the result recorded with it when the SAE was last labelled
    from the same inputs, else None). Read-only: a kept result leaves the index file untouched."""
    from saevctl.mine import index_reads
    from saevctl.mine.index import Index
    from saevctl.mine.queries import sae_in_index

    if not index_fpath.is_file():
        return None, None
    try:
        with Index.open(index_fpath, read_only=True) as idx:
            sae_id = sae_in_index(idx, cfg.sae)
            info = idx.sae_info(sae_id)
            text = index_reads.get_meta(idx.con, label_key(sae_id))
    except IndexError_:  # the full run says what is wrong
        return None, None
    store_dpath = cfg.store or Path(info.get("store_path") or "")
    inputs = label_inputs(cfg, sae_id, store_dpath, info)
    try:
        record = json.loads(text) if text else None
    except ValueError:
        record = None
    if cfg.force or not isinstance(record, dict) or record.get(rerun.KEY) != inputs:
        return inputs, None
    return inputs, record


def record_labels(index_fpath: Path, sae_id: str, inputs: str, result: dict[str, Any]) -> None:
    """Record, in the index, what the SAE's labels were made from and the summary a rerun prints again."""
    from saevctl.mine import index_reads
    from saevctl.mine.index import Index

    with Index.open(index_fpath, read_only=False) as idx:
        index_reads.set_meta(idx.con, label_key(sae_id), json.dumps({rerun.KEY: inputs, "result": result}))
