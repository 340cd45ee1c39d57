"""Write an activation store shard by shard; each shard folder appears atomically, so a killed run resumes.

The manifest is written first (complete=false) and rewritten with counts once every shard exists.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import saevctl
from saevctl import atomic, layout
from saevctl.errors import OutputError, StoreError
from saevctl.store.format import STORE_FORMAT, kind_shape, read_manifest


def _masks_name(masks: dict[str, Any] | None) -> str:
    """A store's mask folder, for messages (its class list is too long to print)."""
    return str((masks or {}).get("dpath") or "none")


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Name the first settings that differ, for the error message."""
    parts = []
    for key in ("model", "layers", "tokens", "dtype", "images", "images_per_shard", "masks", "mask_sets"):
        a, b = old.get(key), new.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            if a.get("spec") != b.get("spec"):
                parts.append(f"model {a.get('spec')} vs {b.get('spec')}")
            elif a.get("weights_sha256") != b.get("weights_sha256"):
                old_h, new_h = str(a.get("weights_sha256"))[:12], str(b.get("weights_sha256"))[:12]
                parts.append(f"model {a.get('spec')} now has other weights (sha256 {old_h}... vs {new_h}...)")
            elif a != b:
                parts.append("model preprocessing")
        elif key == "images" and isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                parts.append(f"images {a.get('spec')} ({a.get('n')}) vs {b.get('spec')} ({b.get('n')})")
        elif key == "masks" and a != b:
            same = _masks_name(a) == _masks_name(b)
            why = " (other class names or set name)" if same else ""
            parts.append(f"masks {_masks_name(a)} vs {_masks_name(b)}{why}")
        elif key == "mask_sets" and a != b:
            names = [", ".join(f"{m.get('name')}={_masks_name(m)}" for m in sets or []) or "none" for sets in (a, b)]
            parts.append(f"further mask sets {names[0]} vs {names[1]}")
        elif a != b:
            parts.append(f"{key} {a} vs {b}")
    return "; ".join(parts) or "settings"


def _remove_stale_temps(dpath: Path) -> None:
    """Temp files of a killed atomic write of our own files (.manifest.json.tmpPID) are garbage.

    Only those exact names: the folder may turn out to hold someone else's files, which are never touched.
    """
    ours = {layout.store_manifest_fpath(dpath).name, layout.store_images_fpath(dpath).name}
    for p in dpath.iterdir():
        stem, sep, pid = p.name.rpartition(".tmp")
        if sep and pid.isdigit() and stem.startswith(".") and stem[1:] in ours and p.is_file():
            p.unlink(missing_ok=True)


def save_npy(fpath: Path, chunks: list[np.ndarray]) -> None:
    """Write row chunks as one .npy file without first concatenating them (one copy fewer per shard)."""
    first = chunks[0]
    with open(fpath, "wb") as f:
        f.write(npy_header(first.dtype, (sum(len(c) for c in chunks), *first.shape[1:])))
        for c in chunks:
            assert c.dtype == first.dtype and c.shape[1:] == first.shape[1:], (c.dtype, c.shape)
            write_rows(f, c)


NPY_HEADER_BYTES = 128
"""Streamed shard arrays get a fixed-size .npy header, rewritten in place once the row count is known."""


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to exactly NPY_HEADER_BYTES (a multiple of 64, as the format asks)."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    text = "{" + "".join(f"'{k}': {v!r}, " for k, v in d.items()) + "}"  # numpy's own spelling of the dict
    body_len = NPY_HEADER_BYTES - 10
    body = text.encode("latin1").ljust(body_len - 1) + b"\n"
    assert len(body) == body_len, f"npy header for {shape} does not fit in {NPY_HEADER_BYTES} bytes"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body


def write_rows(f: io.BufferedIOBase, arr: np.ndarray) -> None:
    """Append one chunk of rows to an open shard file (one function, so tests can make the disk fill up)."""
    if arr.size:
        f.write(np.ascontiguousarray(arr).data.cast("B"))


class ShardStream:
    """One shard written batch by batch from the background thread while the forward pass runs, so that only
    the last batch is left to write when the shard ends; `close` makes it appear atomically, `abort` removes it."""

    def __init__(self, writer: StoreWriter, index: int, arrays: dict[tuple[int, str], tuple[Any, tuple[int, ...]]]):
        self.final = layout.store_shard_dpath(writer.dpath, index)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp")
        self.spec = arrays
        self.rows = dict.fromkeys(arrays, 0)
        self.files: dict[tuple[int, str], io.BufferedIOBase] = {}
        with atomic.translate_os_errors(self.final):
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
            for (layer, kind), (dtype, row_shape) in arrays.items():
                f = open(self.tmp / layout.shard_array_name(layer, kind), "wb")  # noqa: SIM115 - closed in close/abort
                self.files[(layer, kind)] = f
                f.write(npy_header(dtype, (0, *row_shape)))

    def append(self, arrays: dict[tuple[int, str], np.ndarray]) -> None:
        with atomic.translate_os_errors(self.final):
            for key, arr in arrays.items():
                assert arr.dtype == np.dtype(self.spec[key][0]) and arr.shape[1:] == self.spec[key][1], key
                write_rows(self.files[key], arr)
                self.rows[key] += len(arr)
            for f in self.files.values():
                f.flush()
                os.fdatasync(f.fileno())  # flush as we go, so that close() has almost nothing left to wait for

    def close(self, images: list[dict[str, Any]]) -> None:
        try:
            self._close(images)
        except BaseException:
            self.abort()
            raise

    def _close(self, images: list[dict[str, Any]]) -> None:
        with atomic.translate_os_errors(self.final):
            for key, f in self.files.items():
                f.seek(0)
                f.write(npy_header(self.spec[key][0], (self.rows[key], *self.spec[key][1])))
                f.flush()
                os.fsync(f.fileno())
                f.close()
            text = "".join(json.dumps(im) + "\n" for im in images)
            atomic_text = self.tmp / layout.shard_images_name()
            with open(atomic_text, "w") as tf:
                tf.write(text)
                tf.flush()
                os.fsync(tf.fileno())
            os.replace(self.tmp, self.final)
            atomic.fsync_dir(self.final.parent)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class StoreWriter:
    """Creates or resumes the store at `dpath` for the given config (what must match to resume)."""

    def __init__(self, dpath: Path, config: dict[str, Any], n_images: int) -> None:
        self.dpath = dpath
        self.config = config
        self.n_images = n_images
        per = int(config["images_per_shard"])
        self.shard_ranges = [(s, min(s + per, n_images)) for s in range(0, n_images, per)]
        self._prepare()

    def _prepare(self) -> None:
        d = self.dpath
        if d.exists() and not d.is_dir():
            raise OutputError(f"--out {d} is a file", "choose a folder path for the store")
        if d.is_dir():
            _remove_stale_temps(d)
        if d.is_dir() and any(d.iterdir()):
            if not layout.store_manifest_fpath(d).is_file():
                raise OutputError(
                    f"output folder {d} already holds other files and is not an activation store",
                    "choose an empty or new --out folder",
                )
            old = read_manifest(d)
            if old["config"] != self.config:
                raise StoreError(
                    f"the store at {d} was made with other settings ({_diff(old['config'], self.config)})",
                    "use a new --out folder, or delete that store to replace it",
                )
            return
        d.mkdir(parents=True, exist_ok=True)
        self._write_manifest(complete=False, shards=[])

    def _write_manifest(
        self, complete: bool, shards: list[dict[str, Any]], extra: dict[str, Any] | None = None
    ) -> None:
        manifest = {
            "schema_version": layout.STORE_SCHEMA,
            "format": STORE_FORMAT,
            "saevctl_version": saevctl.__version__,
            "complete": complete,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": self.config,
            "shards": shards,
            **(extra or {}),
        }
        atomic.write_json(layout.store_manifest_fpath(self.dpath), manifest)

    @property
    def is_complete(self) -> bool:
        return bool(read_manifest(self.dpath).get("complete"))

    def done_shards(self) -> set[int]:
        """Shards already on disk (a shard folder exists only once fully written)."""
        root = layout.store_shards_dpath(self.dpath)
        if not root.is_dir():
            return set()
        for stale in root.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        return {int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()}

    def write_shard(
        self, index: int, arrays: dict[tuple[int, str], np.ndarray | list[np.ndarray]], images: list[dict[str, Any]]
    ) -> None:
        """Write one shard: one .npy per (layer, kind) (an array, or a list of row chunks) plus the shard's
        image rows, then rename the folder into place."""
        final = layout.store_shard_dpath(self.dpath, index)
        with atomic.staged_dir(final) as tmp:
            for (layer, kind), arr in arrays.items():
                with atomic.translate_os_errors(final):
                    save_npy(tmp / layout.shard_array_name(layer, kind), arr if isinstance(arr, list) else [arr])
            text = "".join(json.dumps(im) + "\n" for im in images)
            (tmp / layout.shard_images_name()).write_text(text)

    def _shapes(self, n_rows: int) -> dict[str, list[int]]:
        """Full array shape of each token kind (every stored layer has the same), for readers and humans."""
        model = self.config["model"]
        lay = model["layout"]
        n_patches = int(lay["grid_h"]) * int(lay["grid_w"])
        shapes = {}
        for kind in self.config["tokens"]:
            shapes[kind] = [n_rows, *kind_shape(kind, n_patches, int(lay["n_reg"]), int(model["d_model"]))]
        return shapes

    def finalize(self) -> dict[str, Any]:
        """Assemble the image table and mark the store complete."""
        shards, table, row = [], [], 0
        n_bytes = 0
        for index, (lo, hi) in enumerate(self.shard_ranges):
            sd = layout.store_shard_dpath(self.dpath, index)
            lines = (sd / layout.shard_images_name()).read_text().splitlines()
            ims = [json.loads(x) for x in lines if x]
            assert [im["id"] for im in ims] == list(range(lo, hi)), f"shard {index} lists the wrong images"
            n_rows = 0
            for im in ims:
                im["row"] = row + n_rows if im["status"] == "ok" else -1
                n_rows += im["status"] == "ok"
                table.append(im)
            n_bytes += sum(f.stat().st_size for f in sd.iterdir())
            shards.append({"index": index, "first_image": lo, "n_images": hi - lo, "n_rows": n_rows})
            row += n_rows
        atomic.write_text(layout.store_images_fpath(self.dpath), "".join(json.dumps(im) + "\n" for im in table))
        failed = [im["id"] for im in table if im["status"] != "ok"]
        extra = {
            "n_images": len(table),
            "n_rows": row,
            "n_failed": len(failed),
            "failed_ids": failed,
            "bytes": n_bytes,
            "shapes": self._shapes(row),
        }
        self._write_manifest(complete=True, shards=shards, extra=extra)
        return read_manifest(self.dpath)
