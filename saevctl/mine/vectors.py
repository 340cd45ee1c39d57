"""Decoder directions per SAE beside the index, and a faiss inner-product index over them for cosine search.

The faiss file is rebuilt whenever it is missing or was built from other weights (its JSON sidecar says which);
`brute_force_similar` is the plain reference the faiss path is tested against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from saevctl import atomic, layout
from saevctl.errors import IndexError_

if TYPE_CHECKING:  # faiss loads on first use
    import faiss

log = logging.getLogger(__name__)
FAISS_SCHEMA = 1


def _unit_rows(w_sd: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(w_sd, dtype=np.float32)
    unit: np.ndarray = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return unit


def save_decoder(index_fpath: Path, sae_id: str, w_dec_sd: np.ndarray, weights_sha256: str) -> Path:
    """Write the SAE's decoder rows (s, d) as safetensors, so similarity needs no checkpoint."""
    fpath = layout.decoder_fpath(index_fpath, sae_id)
    tmp = fpath.with_name(f".{fpath.name}.tmp")
    with atomic.translate_os_errors(fpath):
        fpath.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_file({"W_dec": np.ascontiguousarray(w_dec_sd, dtype=np.float32)}, str(tmp),
                      metadata={"weights_sha256": weights_sha256, "sae_id": sae_id})
            tmp.replace(fpath)
        finally:
            tmp.unlink(missing_ok=True)  # a disk that filled up mid-write gets its space back
    return fpath


def load_decoder(index_fpath: Path, sae_id: str) -> np.ndarray:
    fpath = layout.decoder_fpath(index_fpath, sae_id)
    if not fpath.is_file():
        raise IndexError_(
            f"the decoder directions of {sae_id} are missing ({fpath})", "run saevctl mine for that SAE again"
        )
    try:
        return load_file(str(fpath))["W_dec"]
    except Exception as e:  # safetensors raises several types for truncated files
        raise IndexError_(f"{fpath} cannot be read ({type(e).__name__})", "run saevctl mine for that SAE again") from e


def _to_gpu(index: faiss.Index) -> faiss.Index:
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def build(index_fpath: Path, sae_id: str, weights_sha256: str) -> Path:
    """(Re)build the cosine faiss index of one SAE from its saved decoder rows."""
    import faiss

    w = _unit_rows(load_decoder(index_fpath, sae_id))
    index = faiss.IndexFlatIP(w.shape[1])
    index.add(w)
    fpath = layout.faiss_fpath(index_fpath, sae_id)
    # serialised in memory, then written by Python: faiss's own writer reports a full disk as a RuntimeError
    atomic.write_bytes(fpath, faiss.serialize_index(index).tobytes())
    meta = {"schema_version": FAISS_SCHEMA, "sae_id": sae_id, "weights_sha256": weights_sha256,
            "n": int(w.shape[0]), "d": int(w.shape[1]), "metric": "cosine (inner product of unit rows)",
            "faiss": faiss.__version__}
    atomic.write_json(layout.faiss_meta_fpath(index_fpath, sae_id), meta)
    log.info("built faiss index %s (%d x %d)", fpath, *w.shape)
    return fpath


def _fresh(index_fpath: Path, sae_id: str, weights_sha256: str) -> bool:
    fpath, mpath = layout.faiss_fpath(index_fpath, sae_id), layout.faiss_meta_fpath(index_fpath, sae_id)
    if not fpath.is_file() or not mpath.is_file():
        return False
    try:
        meta = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(meta.get("schema_version") == FAISS_SCHEMA and meta.get("weights_sha256") == weights_sha256)


def load(index_fpath: Path, sae_id: str, weights_sha256: str) -> faiss.Index:
    """The SAE's faiss index, rebuilt first when missing or stale; on the GPU when faiss-gpu sees one."""
    import faiss

    if not _fresh(index_fpath, sae_id, weights_sha256):
        build(index_fpath, sae_id, weights_sha256)
    try:
        # Memory-mapped: a query touches the vectors once instead of first copying the whole file.
        index = faiss.read_index(str(layout.faiss_fpath(index_fpath, sae_id)), faiss.IO_FLAG_MMAP)
    except RuntimeError:
        build(index_fpath, sae_id, weights_sha256)  # a corrupt file is rebuilt like a stale one
        index = faiss.read_index(str(layout.faiss_fpath(index_fpath, sae_id)))
    return _to_gpu(index)


def search(index: faiss.Index, queries_qd: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and ids of the k nearest rows for each query row (queries are normalised here)."""
    k = min(k, index.ntotal)
    sims, ids = index.search(_unit_rows(np.atleast_2d(queries_qd)), k)
    return sims, ids


def brute_force_similar(w_sd: np.ndarray, queries_qd: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one matmul of unit rows, then a sort. Same contract as `search`."""
    sims_qs = _unit_rows(np.atleast_2d(queries_qd)) @ _unit_rows(w_sd).T
    k = min(k, sims_qs.shape[1])
    ids = np.argsort(-sims_qs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims_qs, ids, 1), ids
