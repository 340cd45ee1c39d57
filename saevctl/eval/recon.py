"""Reconstruction quality of an SAE over an activation store, streamed a chunk of tokens at a time:
MSE, normalised MSE (fraction of variance unexplained), L0, dead and dense latents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from saevctl import atomic, layout
from saevctl.config import resolve_device
from saevctl.errors import StoreError
from saevctl.eval import common
from saevctl.eval.config import ReconConfig
from saevctl.memory import check_memory, device_memory
from saevctl.sae.compat import check_compatible
from saevctl.sae.model import DENSE_RATE, SAE  # dense: fires on more than this share of tokens, as training reports

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


@dataclass
class ReconResult:
    mse: float
    """Mean squared error per element in the SAE's normalised space (what training reports)."""
    nmse: float
    """Sum of squared errors over the sum of squared deviations from the mean token (FVU)."""
    l0: float
    """Mean number of active latents per token."""
    dead: float
    """Share of latents that never fired on the evaluated tokens."""
    dense: float
    """Share of latents firing on more than 1% of the evaluated tokens."""
    n_tokens: int
    n_images: int
    store: Path
    kinds: tuple[str, ...]
    summary: Path
    seconds: float
    notes: list[str] = field(default_factory=list)
    units: np.ndarray | None = field(default=None, repr=False)
    """float64 (n_units, 3 + d): per block of images (UNITS blocks at most), the squared error, the squared
    deviation from the SAE's mean, the token count and the summed deviation: what a bootstrap of the normalised MSE
    over images resamples (`unit_nmse`)."""

    def figures(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("mse", "nmse", "l0", "dead", "dense", "n_tokens", "n_images")}


class Figures(TypedDict):
    mse: float
    nmse: float
    l0: float
    dead: float
    dense: float


def default_store(sae: SAE) -> Path:
    ref = sae.cfg.train.get("store") if isinstance(sae.cfg.train, dict) else None
    if not ref:
        raise StoreError("no --store given and the SAE does not record the store it was trained on",
                         "pass --store DIR")
    return Path(ref)


UNITS = 1000
"""Bootstrap units of the reconstruction: images, grouped into at most this many contiguous blocks (so the per-unit
sums stay small on any store)."""


def unit_nmse(sums_mk: np.ndarray) -> np.ndarray:
    """Normalised MSE from summed unit statistics (rows of `ReconResult.units` summed or resampled): error over the
    variance about the tokens' own mean."""
    var = sums_mk[:, 1] - (sums_mk[:, 3:] ** 2).sum(1) / np.maximum(sums_mk[:, 2], 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, sums_mk[:, 0] / np.where(var > 0, var, 1.0), np.nan)


class _Sums:
    """Float64 running sums, in total and per bootstrap unit; deviations are taken from the SAE's own mean so the
    variance stays well conditioned."""

    def __init__(self, sae: SAE, n_units: int) -> None:
        d, s = sae.cfg.d, sae.cfg.n_latents
        self.shift = sae.act_mean.detach().double().cpu()
        self.sq_err_norm = self.sq_err = self.sq_dev = self.l0 = 0.0
        self.sum_dev = torch.zeros(d, dtype=torch.float64)
        self.fired = torch.zeros(s, dtype=torch.float64)
        self.units = torch.zeros(n_units, 3 + d, dtype=torch.float64)
        self.n = 0
        self.encode = sae.encoder()  # sae.encode's fused fast path, into one reused codes buffer
        self.codes_buf = torch.empty(0)

    @torch.no_grad()
    def add(self, sae: SAE, x_nd: torch.Tensor, unit_n: torch.Tensor) -> None:
        if len(self.codes_buf) < len(x_nd):
            self.codes_buf = torch.empty(len(x_nd), sae.cfg.n_latents, device=x_nd.device, dtype=sae.W_enc.dtype)
        codes = self.encode(x_nd, out=self.codes_buf[: len(x_nd)])
        err = (sae.decode(codes) - x_nd.to(codes.dtype)).double()
        scale = float(sae.act_scale)
        err_n = err.pow(2).sum(1).cpu()
        self.sq_err += float(err_n.sum())
        self.sq_err_norm += float(err_n.sum()) * scale * scale
        dev = x_nd.double().cpu() - self.shift
        dev_n = dev.pow(2).sum(1)
        self.sum_dev += dev.sum(0)
        self.sq_dev += float(dev_n.sum())
        fired = codes > 0
        self.l0 += float(fired.sum())
        self.fired += fired.sum(0).double().cpu()
        self.n += len(x_nd)
        cols = torch.cat([torch.stack([err_n, dev_n, torch.ones_like(dev_n)], 1), dev], 1)
        self.units.index_add_(0, unit_n, cols)

    def result(self, d: int) -> Figures:
        n = max(self.n, 1)
        var = self.sq_dev - float(self.sum_dev.pow(2).sum()) / n
        rate = self.fired / n
        return {"mse": self.sq_err_norm / (n * d), "nmse": self.sq_err / var if var > 0 else float("nan"),
                "l0": self.l0 / n, "dead": float((self.fired == 0).double().mean()),
                "dense": float((rate > DENSE_RATE).double().mean())}


def run_recon(cfg: ReconConfig, progress: Progress | None = None, sae: SAE | None = None,
              on_total: Callable[[int], None] | None = None) -> ReconResult:
    """Encode and decode every stored token of the kinds the SAE was trained on; progress counts images
    (`on_total` learns how many once the store is open). The summary's write lock is held throughout."""
    t0 = time.perf_counter()
    with common.summary_target(cfg.sae, cfg.index, cfg.out, "recon") as (sae_path, summary):
        return _recon(cfg, sae_path, summary, t0, progress, sae, on_total)


def _recon(cfg: ReconConfig, sae_path: Path, summary: Path, t0: float, progress: Progress | None, sae: SAE | None,
           on_total: Callable[[int], None] | None) -> ReconResult:
    from saevctl.store import open_store

    sae = sae if sae is not None else SAE.load(sae_path, device=resolve_device(cfg.device))
    sae.eval().requires_grad_(False)
    store_dpath = cfg.store or default_store(sae)
    store = open_store(store_dpath)
    kinds = tuple(k for k in sae.cfg.tokens if k in ("patches", "cls"))
    layer = check_compatible(sae.cfg, store=store, kinds=kinds)
    n_images = min(store.n_images, cfg.max_images or store.n_images)
    if on_total:
        on_total(n_images)
    device = next(sae.parameters()).device
    n_units = min(n_images, UNITS)
    sums = _Sums(sae, n_units)
    arrays = [store.layer(layer).kind(k) for k in kinds]
    per_image = sum(int(np.prod(a.shape[1:-1], dtype=np.int64)) for a in arrays)
    step = max(1, cfg.batch_tokens // max(per_image, 1))
    available, where = device_memory(str(device))
    # the codes of one chunk, the reconstruction's error and its square (each chunk holds whole images)
    check_memory(4 * step * per_image * (sae.cfg.n_latents + 2 * sae.cfg.d), f"--batch-tokens {cfg.batch_tokens}",
                 "pass a smaller --batch-tokens", available=available, where=where)
    for lo in range(0, n_images, step):
        hi = min(lo + step, n_images)
        unit_b = torch.arange(lo, hi) * n_units // max(n_images, 1)
        for arr in arrays:
            x = arr.torch(slice(lo, hi)).reshape(-1, arr.shape[-1]).to(device)
            sums.add(sae, x.float(), unit_b.repeat_interleave(len(x) // (hi - lo)))
        if progress:
            progress(hi - lo)
    res = ReconResult(**sums.result(sae.cfg.d), n_tokens=sums.n, n_images=n_images, store=store_dpath, kinds=kinds,
                      summary=summary, seconds=time.perf_counter() - t0, units=sums.units.numpy())
    atomic.write_json(summary, {
        "schema_version": layout.EVAL_SCHEMA, "format": common.FORMAT + "-recon", "sae": str(sae_path),
        "store": str(store_dpath), "layer": layer, "kinds": list(kinds), **common.jsonable(res.figures()),
        "dense_rate": DENSE_RATE, "seconds": res.seconds,
    })
    return res
