"""`fit(acts, cfg)`: train a sweep on rows held in a numpy array, a memmap or a torch tensor instead of a store,
with run()'s loop, loader and checkpoint folders. The array is checked up front: shape, dtype, finite values."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
import torch

from saevctl.errors import InputError
from saevctl.train.config import Config
from saevctl.train.loop import Progress, Result, train_on
from saevctl.train.setup import Data, open_array

_NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Rows checked for NaN/Inf at a time: bounded memory however large a memmap is.
_CHECK_ROWS = 65536


def fit(acts: np.ndarray | torch.Tensor, cfg: Config, progress: Progress | None = None,
        on_total: Callable[[int, int], None] | None = None) -> Result:
    """Train every SAE of `cfg`'s sweep on the rows of `acts` (n, d) and write `cfg.out` exactly as `run(cfg)`
    does; the same seed gives the same SAEs as run() on a one-shard store of these rows (tokens=patches).

    `acts`: float32 or float16 numpy array or memmap (read in place, never copied whole), or a float32, float16
    or bfloat16 torch tensor (a GPU tensor is copied to host memory). `cfg.store` is ignored; `cfg.layer` (a
    block >= 0, or None for unknown) and `cfg.tokens` only label the rows in the checkpoints, so later stages
    can match the SAE to a store. `cfg.resume` continues a fit into the same `cfg.out` (the array's shape and
    dtype must match). A bad shape, dtype or a NaN/Inf value is one InputError before anything is written."""
    rows_nd, dtype = as_rows(acts)
    if cfg.layer is not None and cfg.layer < 0:
        raise InputError(f"--layer {cfg.layer} counts from the model's end, and an array has no model",
                         "give the block number (>= 0), or leave --layer out")

    def opener(c: Config, rank: int, world_size: int, alone: bool) -> Data:
        return open_array(c, rows_nd, dtype, rank, world_size, alone)

    return train_on(cfg, opener, {"shape": list(rows_nd.shape), "dtype": dtype}, progress, on_total)


def as_rows(acts: object) -> tuple[np.ndarray, str]:
    """The checked (n, d) rows as numpy (bfloat16 as its uint16 bits) and their store dtype name."""
    if isinstance(acts, torch.Tensor):
        dtype = _TORCH_DTYPES.get(acts.dtype)
        if dtype is None:
            raise _bad_dtype(str(acts.dtype).removeprefix("torch."))
        t = acts.detach().cpu()
        rows = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    elif isinstance(acts, np.ndarray):
        found = _NUMPY_DTYPES.get(acts.dtype)
        if found is None:
            raise _bad_dtype(str(acts.dtype))
        dtype, rows = found, _readable(acts)
    else:
        raise InputError(f"fit takes a numpy array, a memmap or a torch tensor, not {type(acts).__name__}",
                         "pass the activations as an (n, d) array, e.g. np.asarray(rows, dtype=np.float32)")
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 1:
        raise InputError(f"the activations have shape {tuple(rows.shape)}; fit needs (n, d) with n, d >= 1",
                         "reshape them to (rows, width), e.g. acts.reshape(-1, acts.shape[-1])")
    bad = _first_non_finite(rows, dtype)
    if bad is not None:
        raise InputError(f"row {bad} of the activations is NaN or infinite",
                         "drop or fix the non-finite rows before training")
    return rows, dtype


def _bad_dtype(name: str) -> InputError:
    return InputError(f"fit cannot train on {name} activations",
                      "pass float32 or float16 (or a bfloat16 tensor), e.g. acts.astype(np.float32)")


def _readable(acts: np.ndarray) -> np.ndarray:
    """A read-only memmap opened on its file is kept as one, so the loader releases its pages as a store's; any
    other array, a writable or copy-on-write memmap or a slice of one included, is handed over as a plain view
    (releasing pages of those could drop the caller's unsaved changes, or hit the wrong pages)."""
    if isinstance(acts, np.memmap) and acts.mode == "r" and isinstance(acts.base, mmap.mmap):
        return acts
    return np.asarray(acts)


def _first_non_finite(rows: np.ndarray, dtype: str) -> int | None:
    """The first row holding a NaN or an infinity, read in slices (one pass over a memmap)."""
    for lo in range(0, len(rows), _CHECK_ROWS):
        part = np.asarray(rows[lo : lo + _CHECK_ROWS])
        # a bfloat16's exponent bits all set: infinite or NaN
        ok = (part & 0x7F80) != 0x7F80 if dtype == "bfloat16" else np.isfinite(part)
        bad = np.flatnonzero(~ok.all(axis=1))
        if len(bad):
            return lo + int(bad[0])
    return None
