"""Resumable train state: every group's weights, Adam moments and trackers as safetensors, plus a JSON header.

The JSON is written last and names the sha256 of its tensors, so a kill mid-write leaves the previous state.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saevctl import atomic, layout
from saevctl.errors import CheckpointError, TrainingError

log = logging.getLogger(__name__)
FORMAT = "saevctl-train-state"


def _stem(step: int) -> str:
    return f"step-{step:08d}"


def save(dpath: Path, step: int, tensors: dict[str, torch.Tensor], header: dict[str, Any],
         prune_old: bool = True) -> Path:
    """Write state at `step` (the number of steps done) into the state folder `dpath`; delete older states
    unless `prune_old` is False (several ranks each writing their own part prune after they all finished)."""
    dpath.mkdir(parents=True, exist_ok=True)
    wpath = dpath / f"{_stem(step)}.safetensors"
    tmp = wpath.with_name(f".{wpath.name}.tmp{os.getpid()}")
    with atomic.translate_os_errors(wpath):
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, wpath)
        finally:
            tmp.unlink(missing_ok=True)  # a disk that filled up mid-write gets its space back
    full = {"schema_version": layout.TRAIN_STATE_SCHEMA, "format": FORMAT, "step": step, **header}
    full["tensors_sha256"] = atomic.sha256_file(wpath)
    jpath = dpath / f"{_stem(step)}.json"
    atomic.write_json(jpath, full)
    if prune_old:
        prune(dpath, step)
    return jpath


def prune(dpath: Path, keep_step: int) -> None:
    """Delete every state in `dpath` but the one at `keep_step`."""
    for old in dpath.glob("step-*"):
        if not old.name.startswith(_stem(keep_step)):
            old.unlink(missing_ok=True)


def latest(dpath: Path, at_most: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The newest complete state in the state folder `dpath` (at step `at_most` or before), or None."""
    if not dpath.is_dir():
        return None
    for jpath in sorted(dpath.glob("step-*.json"), reverse=True):
        try:
            header = json.loads(jpath.read_text())
        except json.JSONDecodeError:
            log.warning("skipping unreadable train state %s", jpath)
            continue
        if header.get("format") != FORMAT or header.get("schema_version") != layout.TRAIN_STATE_SCHEMA:
            raise CheckpointError(
                f"train state {jpath} has schema {header.get('schema_version')}, this saevctl reads "
                f"{layout.TRAIN_STATE_SCHEMA}",
                "finish it with the saevctl version that started it, or start again in a new --out",
            )
        if at_most is not None and int(header.get("step", 0)) > at_most:
            continue
        wpath = jpath.with_suffix(".safetensors")
        if not wpath.is_file() or atomic.sha256_file(wpath) != header.get("tensors_sha256"):
            log.warning("skipping train state %s: its tensors are missing or do not match", jpath)
            continue
        return header, load_file(str(wpath))
    return None


def check_same_settings(saved: dict[str, Any], now: dict[str, Any], out_dpath: Path) -> None:
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = "; ".join(f"{k} {saved.get(k)!r} vs {now.get(k)!r}" for k in diff[:3])
        raise TrainingError(
            f"the run in {out_dpath} was started with other settings ({shown})",
            "resume with the same options, or train into a new --out",
        )
