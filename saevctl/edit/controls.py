"""The matched controls an edit is measured against: a random other feature of similar firing frequency (with
feature statistics measured on the images when no mined index has them) and a random direction of the same norm.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saevctl.data import ImageRecord, open_image
from saevctl.edit.edit import EditPlan, delta_from_codes, feature_codes, target_codes
from saevctl.edit.session import FeatureStats, Prober
from saevctl.errors import ProbeError, SaevctlError
from saevctl.sae.model import SAE
from saevctl.store.format import TokenLayout

log = logging.getLogger(__name__)
CONDITIONS = ("feature", "random feature", "random direction")
"""The edit and its two controls, in the order their effects are reported."""
N_NEAR = 16
"""Control features are drawn from the features whose firing frequency is nearest the edited one's."""


# --- images --------------------------------------------------------------------------------------------


def _decode(records: list[ImageRecord], prober: Prober) -> tuple[np.ndarray, list[ImageRecord], int]:
    """(uint8 batch, the records it holds, how many could not be read)."""
    arrays, ok = [], []
    for rec in records:
        try:
            arrays.append(prober.bb.preprocess.to_uint8(open_image(rec.path)))
            ok.append(rec)
        except SaevctlError as e:
            log.warning("skipping %s: %s", rec.path, e.message)
    size = prober.bb.preprocess.size
    return (np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)), ok, len(records) - len(ok)


def iter_batches(records: list[ImageRecord], prober: Prober, bs: int,
                 n_workers: int) -> Iterator[tuple[np.ndarray, list[ImageRecord], int]]:
    """Decoded uint8 batches in order, a few decodes ahead of the consumer."""
    chunks = [records[i : i + bs] for i in range(0, len(records), bs)]
    with ThreadPoolExecutor(max(1, n_workers)) as pool:
        pending: list[Future[tuple[np.ndarray, list[ImageRecord], int]]] = []
        for i in range(len(chunks)):
            while len(pending) < min(n_workers + 1, len(chunks) - i):
                pending.append(pool.submit(_decode, chunks[i + len(pending)], prober))
            yield pending.pop(0).result()


# --- controls ------------------------------------------------------------------------------------------


@runtime_checkable
class SampleOpts(Protocol):
    """What measuring feature statistics reads of a Config (BatchConfig and EditsConfig have these fields)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def n_workers(self) -> int: ...
    @property
    def freq_images(self) -> int: ...


@torch.no_grad()
def measure_stats(prober: Prober, records: list[ImageRecord], cfg: SampleOpts) -> FeatureStats:
    """Firing frequency and max of every feature on the first `freq_images` images (no mined index)."""
    sae, n_prefix = prober.sae, prober.bb.layout.n_prefix
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.float64)
    peak = torch.zeros(sae.cfg.n_latents, dtype=torch.float64)
    n_tokens = 0
    for u8, _, _ in iter_batches(records[: cfg.freq_images], prober, cfg.batch_size, cfg.n_workers):
        if not len(u8):
            continue
        x = prober.prefix(prober.bb.preprocess.normalize(torch.from_numpy(u8).to(prober.device)))[:, n_prefix:]
        codes = sae.encode(x.reshape(-1, x.shape[-1]))
        fired += (codes > 0).sum(0).double().cpu()
        peak = torch.maximum(peak, codes.amax(0).double().cpu())
        n_tokens += codes.shape[0]
    source = f"{min(len(records), cfg.freq_images)} of the probed images"
    return FeatureStats(peak.numpy(), (fired / max(n_tokens, 1)).numpy(), source)


def pick_control_features(features: list[int], freq_s: np.ndarray, rng: np.random.Generator) -> list[int]:
    """For each edited feature, a random other feature among the N_NEAR nearest in log firing frequency."""
    taken = set(features)
    out = []
    log_f = np.log(np.maximum(freq_s, 1e-12))
    for f in features:
        cand = np.array([j for j in range(len(freq_s)) if j not in taken and freq_s[j] > 0])
        if cand.size == 0:
            cand = np.array([j for j in range(len(freq_s)) if j not in taken])
        if cand.size == 0:
            raise ProbeError("the SAE has no other feature to use as a control", "run with --no-controls")
        near = cand[np.argsort(np.abs(log_f[cand] - log_f[f]), kind="stable")[:N_NEAR]]
        pick = int(rng.choice(near))
        out.append(pick)
        taken.add(pick)
    return out


# --- random direction ----------------------------------------------------------------------------------


def direction_generator(seed: int) -> torch.Generator:
    """Generator for the random-direction control, offset so that it never replays an SAE's seed-0 initial
    decoder rows (randn rows too, which a lightly trained SAE still sits near)."""
    return torch.Generator().manual_seed(982_451_653 + seed)


def random_direction_edit(
    sae: SAE, x_btd: Tensor, lay: TokenLayout, plan: EditPlan, gen: torch.Generator
) -> Float[Tensor, "b t d"]:
    """Control: per image one random unit direction, scaled on each patch to the norm of the real edit there."""
    patches = x_btd[:, lay.n_prefix :]
    codes = feature_codes(sae, patches, plan.features)
    delta = delta_from_codes(sae, plan.features, target_codes(codes, plan.values_nk, plan.mask_npk) - codes)
    n, _, d = patches.shape
    r_nd = torch.randn(n, d, generator=gen).to(delta.device, delta.dtype)
    r_nd = r_nd / r_nd.norm(dim=-1, keepdim=True)
    rand = delta.norm(dim=-1, keepdim=True) * r_nd[:, None, :]
    return torch.cat([x_btd[:, : lay.n_prefix], patches + rand.to(patches.dtype)], dim=1)
