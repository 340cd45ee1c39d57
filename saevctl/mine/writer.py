"""Write a mined index atomically: work on a temporary copy, rename it over the index only when complete.

An interrupted mine leaves at most a `.NAME.tmpPID` file (cleaned up by the next run), never a half index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saevctl import atomic, layout, lock
from saevctl.mine.index import Index
from saevctl.mine.schema import PER_SAE_TABLES

log = logging.getLogger(__name__)


def _clean_stale_temps(fpath: Path) -> None:
    for tmp in fpath.parent.glob(f".{fpath.name}.tmp*"):
        suffix = tmp.name.rsplit(".tmp", 1)[-1].split(".")[0]
        if suffix.isdigit() and not atomic.pid_alive(int(suffix)):
            log.info("removing %s left by an interrupted mine", tmp)
            for extra in (tmp, tmp.with_name(tmp.name + ".wal")):
                extra.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_index(fpath: Path) -> Iterator[Index]:
    """Yield a writable Index on a temporary copy of `fpath` (or a new file); rename it over `fpath` on success.

    The index's write lock is held from the copy to the rename: a second writer (mine, features label) is refused
    rather than renaming its own copy over this one's work."""
    fpath = Path(fpath)
    with lock.exclusive(fpath, "the index", "--index"), _staged(fpath) as idx:
        yield idx


@contextlib.contextmanager
def _staged(fpath: Path) -> Iterator[Index]:
    with atomic.translate_os_errors(fpath):
        fpath.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(fpath)
    tmp = layout.index_tmp_fpath(fpath, os.getpid())
    tmp.unlink(missing_ok=True)
    if fpath.exists():
        Index.open(fpath, read_only=True).close()  # a locked or corrupt index fails here, before any work
        with atomic.translate_os_errors(tmp):
            shutil.copyfile(fpath, tmp)
        idx = Index.open(tmp, read_only=False)  # migrates an older schema
    else:
        idx = Index.create(tmp)
    try:
        yield idx
        idx.con.execute("CHECKPOINT")
        idx.close()
        with atomic.translate_os_errors(fpath):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, fpath)
            atomic.fsync_dir(fpath.parent)
    finally:
        with contextlib.suppress(Exception):
            idx.close()
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)


def _insert(idx: Index, table: str, columns: dict[str, np.ndarray], prefix: dict[str, Any]) -> None:
    """Bulk insert numpy columns plus constant `prefix` columns as bound values (no SQL from data)."""
    name = f"_new_{table}"
    idx.con.register(name, columns)
    try:
        targets = ", ".join(f'"{c}"' for c in [*prefix, *columns])
        sources = ", ".join(["?"] * len(prefix) + [f'"{c}"' for c in columns])
        idx.con.execute(f"INSERT INTO {table} ({targets}) SELECT {sources} FROM {name}", list(prefix.values()))
    finally:
        idx.con.unregister(name)


def put_store(idx: Index, store_id: str, row: dict[str, Any], images: list[dict[str, Any]]) -> None:
    """Insert (or replace) a store and its image table."""
    idx.con.execute("DELETE FROM images WHERE store_id = ?", [store_id])
    idx.con.execute("DELETE FROM stores WHERE store_id = ?", [store_id])
    idx.con.execute(
        "INSERT INTO stores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [store_id, row["path"], row["fingerprint"], row["model_spec"], row["model_sha256"],
         json.dumps(row["model"]), row["n_images"], row["grid_h"], row["grid_w"]],
    )
    cols = {
        "image_id": np.array([im["id"] for im in images], dtype=np.int32),
        "row": np.array([im["row"] for im in images], dtype=np.int32),
        "path": np.array([str(im["path"]) for im in images], dtype=object),
        "label": np.array([im.get("label") for im in images], dtype=object),
        "width": np.array([im.get("width") or -1 for im in images], dtype=np.int32),
        "height": np.array([im.get("height") or -1 for im in images], dtype=np.int32),
    }
    _insert(idx, "images", cols, {"store_id": store_id})


def delete_sae(idx: Index, sae_id: str) -> None:
    for table in PER_SAE_TABLES:
        idx.con.execute(f"DELETE FROM {table} WHERE sae_id = ?", [sae_id])  # table names are our constants


def put_sae_row(idx: Index, row: dict[str, Any]) -> None:
    (seq,) = idx.con.execute("SELECT coalesce(max(seq), 0) + 1 FROM saes").fetchone() or (1,)
    names = ["sae_id", "name", "ckpt_path", "weights_sha256", "store_id", "model_spec", "model_sha256", "layer",
             "d", "n_latents", "activation", "tokens", "top_k", "top_n", "rank_by", "n_images", "n_patches",
             "grid_h", "grid_w", "seconds", "config"]
    values = [row[n] for n in names]
    idx.con.execute(
        f"INSERT INTO saes (seq, mined_at, {', '.join(names)}) VALUES (?, now(), {', '.join('?' for _ in names)})",
        [seq, *values],
    )


def put_token_results(idx: Index, sae_id: str, token: str, tables: dict[str, dict[str, np.ndarray]]) -> None:
    """Insert the features, histograms and image_features columns of one token kind."""
    for table in ("features", "histograms", "image_features"):
        _insert(idx, table, tables[table], {"sae_id": sae_id, "token": token})


def put_exemplars(idx: Index, sae_id: str, token: str, columns: dict[str, np.ndarray]) -> None:
    """Insert one block of exemplar rows (see pipeline.exemplar_blocks)."""
    _insert(idx, "exemplars", columns, {"sae_id": sae_id, "token": token})
