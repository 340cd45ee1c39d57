"""A TopK SAE's codes over a store, kept by `mine` for `features label`: both passes would otherwise encode every
patch of the store with the same encoder, chunk for chunk, and the GEMM and top-k are most of either's time.

One safetensors file per SAE beside the index (`<index>.codes/<sae_id>.safetensors`): per patch its k values (float32,
exactly as mining's encoder computed them) and feature indices, and the chunks' first rows. Its header names the
SAE's weights, the store and the layer; a file that names anything else is ignored, so a stale file costs a re-encode,
never a wrong label. Kept only up to `MAX_BYTES` of memory (beyond that labelling encodes again), and written
atomically under the index's lock, which mine and label both hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from saevctl import atomic
from saevctl.errors import OutputError
from saevctl.mine.scan import TopKCodes

log = logging.getLogger(__name__)
MAX_BYTES = 1 << 30
"""Codes are kept up to this much memory during the scan (12 bytes a code; the demo's 2,048 images x 256 patches x
k 32: 201 MB, 101 MB on disk)."""
Chunks = Sequence[tuple[int, TopKCodes]]


def fpath(index_fpath: Path, sae_id: str) -> Path:
    return index_fpath.with_name(index_fpath.name + ".codes") / f"{sae_id}.safetensors"


def entry_bytes(n_latents: int) -> int:
    """Bytes per kept code: a float32 value and an int16 (or int32, past 32,767 latents) feature index."""
    return 4 + (2 if n_latents <= 1 << 15 else 4)


def fits(n_rows: int, k: int) -> bool:
    """Whether mining may keep the codes: held in memory during the scan as float32 values and int64 indices."""
    return n_rows * k * 12 <= MAX_BYTES


def save_codes(index_fpath: Path, sae_id: str, key: dict[str, Any], chunks: Chunks) -> None:
    """Write the chunks' codes (call with the index's lock held). A cache: when it cannot be written (a full disk),
    any older file is removed, the run goes on and label encodes instead."""
    try:
        _write(index_fpath, sae_id, key, chunks)
    except (OutputError, OSError) as e:  # full disk, read-only folder, a file where the folder should be
        log.warning("not keeping the codes for features label: %s", e.message if isinstance(e, OutputError) else e)
        with contextlib.suppress(OSError):
            remove(index_fpath, sae_id)


def _write(index_fpath: Path, sae_id: str, key: dict[str, Any], chunks: Chunks) -> None:
    s = chunks[0][1].shape[2]
    idx_dtype = torch.int16 if entry_bytes(s) == 6 else torch.int32
    tensors = {
        "vals": torch.cat([c.vals_tk for _, c in chunks]).float().contiguous(),
        "idx": torch.cat([c.idx_tk for _, c in chunks]).to(idx_dtype).contiguous(),
        "row0": torch.tensor([r for r, _ in chunks], dtype=torch.int64),
        "images": torch.tensor([c.shape[0] for _, c in chunks], dtype=torch.int64),
    }
    meta = {"key": json.dumps(key, sort_keys=True), "shape": json.dumps(list(chunks[0][1].shape[1:]))}
    atomic.write_bytes(fpath(index_fpath, sae_id), save({k: v.cpu() for k, v in tensors.items()}, metadata=meta))


def remove(index_fpath: Path, sae_id: str) -> None:
    fpath(index_fpath, sae_id).unlink(missing_ok=True)


def load_codes(index_fpath: Path, sae_id: str, key: dict[str, Any]) -> list[tuple[int, TopKCodes]] | None:
    """The kept codes if they were made from exactly `key` (SAE weights, store, layer), else None."""
    f = fpath(index_fpath, sae_id)
    if not f.is_file():
        return None
    try:
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("key") != json.dumps(key, sort_keys=True):
                return None
            p, s = json.loads(meta["shape"])
            vals, idx = st.get_tensor("vals"), st.get_tensor("idx").long()
            row0, images = st.get_tensor("row0").tolist(), st.get_tensor("images").tolist()
    except (OSError, ValueError, KeyError) as e:  # unreadable or half-known: encode instead
        log.warning("ignoring kept codes %s: %s", f, e)
        return None
    out, lo = [], 0
    for r, b in zip(row0, images, strict=True):
        hi = lo + b * p
        out.append((r, TopKCodes(vals[lo:hi], idx[lo:hi], (b, p, s))))
        lo = hi
    return out if lo == len(vals) else None
