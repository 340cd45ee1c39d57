"""Incremental reruns: a stage records a fingerprint of its inputs with its output, and a rerun whose inputs are
unchanged says so and keeps that output (docs/reliability.md, "Reruns"). Torch-free, so a skip loads no model.

An input is fingerprinted by content where that is cheap (a checkpoint's recorded weights hash, a store's manifest,
an image listing) and by size and modification time where it is not (an index file, a folder of masks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from saevctl import __version__, atomic, layout

KEY = "inputs"
"""The field of a stage's JSON output (or index row) that holds the fingerprint of what it was made from."""
# Fields that change how fast a stage runs, not what it writes.
NEUTRAL = frozenset({"device", "n_workers", "force", "fast", "set_defaults", "chunk_images"})


def digest(parts: dict[str, Any]) -> str:
    """sha256 of the parts as sorted JSON, with saevctl's version (another version redoes the work)."""
    text = json.dumps({"saevctl": __version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_part(cfg: Any, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A Config's fields that shape the output (NEUTRAL and `drop` left out), paths made absolute."""
    skip = NEUTRAL | set(drop)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = os.path.abspath(value) if isinstance(value, Path) else value
    return out


def file_part(fpath: Path | str | None) -> list[Any] | None:
    """[absolute path, size, mtime in ns] of a file or folder; None when it is missing."""
    if fpath is None:
        return None
    try:
        st = os.stat(fpath)
    except OSError:
        return None
    return [os.path.abspath(fpath), st.st_size, st.st_mtime_ns]


def tree_part(dpath: Path | str | None) -> str | None:
    """One hash over the relative path, size and mtime of every file under a folder (a head, a mask folder)."""
    if dpath is None or not os.path.isdir(dpath):
        return None if dpath is None else str(file_part(dpath))
    h = hashlib.sha256()
    for root, dirs, files in os.walk(dpath):
        dirs.sort()
        for name in sorted(files):
            fpath = os.path.join(root, name)
            st = os.stat(fpath)
            h.update(f"{os.path.relpath(fpath, dpath)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def listing(dpath: Path, skip: Iterable[str] = ()) -> str:
    """One hash over the relative path and size of every file under an output folder (`skip`: names left out), so
    a kept output whose folder gained, lost or changed a file is rebuilt."""
    h = hashlib.sha256()
    skipped = set(skip)
    for root, dirs, files in os.walk(dpath):
        dirs.sort()
        for name in sorted(files):
            if name not in skipped:
                fpath = os.path.join(root, name)
                h.update(f"{os.path.relpath(fpath, dpath)}\t{os.path.getsize(fpath)}\n".encode())
    return h.hexdigest()


def sae_part(ckpt_dpath: Path) -> str | None:
    """The checkpoint's weights hash as its config.json records it (written when the weights were saved)."""
    try:
        value = json.loads(layout.sae_config_fpath(ckpt_dpath).read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def store_part(store_dpath: Path | None) -> dict[str, Any] | None:
    """A store's manifest (settings, image listing, model weights, completion) and its labels' headers."""
    if store_dpath is None:
        return None
    try:
        manifest = layout.store_manifest_fpath(store_dpath).read_bytes()
    except OSError:
        return None
    labels = layout.store_labels_dpath(store_dpath)
    heads = sorted(labels.rglob("classes.json")) if labels.is_dir() else []
    return {"path": os.path.abspath(store_dpath), "manifest": hashlib.sha256(manifest).hexdigest(),
            "labels": [file_part(p) for p in heads]}


def images_part(spec: str | None, max_images: int | None = None) -> str | None:
    """An image source's listing (paths and labels in order) and, for files, their sizes and mtimes."""
    if spec is None:
        return None
    from saevctl.data.images import resolve_images

    src = resolve_images(spec, max_images)
    h = hashlib.sha256(src.fingerprint().encode())
    if src.kind in ("folder", "imagefolder", "list"):
        for rec in src.records:
            h.update(str(file_part(rec.path)).encode())
    return h.hexdigest()


def masks_part(masks: Path | str | None) -> str | None:
    """A mask folder's files; the demo's masks (`demo`) by their drawing's version."""
    if masks is None:
        return None
    from saevctl.data.demo import MASKS_VERSION
    from saevctl.data.masks import DEMO_MASKS

    return f"demo:{MASKS_VERSION}" if str(masks) == DEMO_MASKS else tree_part(Path(masks).expanduser())


def head_part(head: str | None) -> str | None:
    """A trained head folder by its files; a ready head (saliency, timm, clip) by its name."""
    if head is not None and Path(head).expanduser().is_dir():
        return tree_part(Path(head).expanduser())
    return head


def recorded(fpath: Path) -> str | None:
    """The fingerprint a stage's JSON output records, if the file is there and readable."""
    try:
        value = json.loads(fpath.read_text()).get(KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def kept(fpath: Path, fingerprint: str, force: bool = False) -> dict[str, Any] | None:
    """The JSON output at `fpath` when it records these inputs (a rerun keeps it), else None."""
    if force or recorded(fpath) != fingerprint:
        return None
    try:
        data = json.loads(fpath.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record(fpath: Path, fingerprint: str) -> None:
    """Add the inputs' fingerprint to a JSON output just written (atomically rewritten)."""
    record_extra(fpath, {KEY: fingerprint})


def record_extra(fpath: Path, extra: dict[str, Any]) -> None:
    """Add keys to a JSON output just written (atomically rewritten); nothing when it is missing or unreadable."""
    try:
        data = json.loads(fpath.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict):
        atomic.write_json(fpath, {**data, **extra})
