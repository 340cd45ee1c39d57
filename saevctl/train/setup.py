"""Opening a training run's input (the store's layer and token kinds, or fit()'s array) as a loader, the
normalisation statistics, and the provenance each checkpoint carries so later stages can check an SAE matches a
store and model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saevctl.errors import TrainingError
from saevctl.layers import model_n_blocks, resolve_layer
from saevctl.memory import check_memory, device_memory, physical_memory
from saevctl.store import ShardedArray, open_store
from saevctl.train.config import Config, RunSpec
from saevctl.train.loader import ActivationLoader, store_exceeds_memory

MODEL_KEYS = ("spec", "arch", "weights_sha256", "n_blocks", "d_model", "patch_size", "layout", "preprocess")


@dataclass
class Data:
    loader: ActivationLoader
    layer: int | None
    """The block the rows come from (None: unknown, for an array given no --layer)."""
    kinds: tuple[str, ...]
    model: dict[str, Any]
    """The ViT the rows come from (the store manifest's MODEL_KEYS; {} for an array)."""
    source: dict[str, Any]
    """Where the rows come from, in every checkpoint's train provenance."""
    array: dict[str, Any] | None = None
    """fit()'s array as {"shape", "dtype"} (None for a store): it stands for the store when resuming."""

    @property
    def d(self) -> int:
        return self.loader.d

    def normalization(self, n_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and a scalar scale so that E||(x - mean) * scale||^2 = d on a sample of the stream."""
        sample_nd = self.loader.sample(n_sample).double()
        # non-finite rows are left out here; training stops at the step that meets them, naming it
        sample_nd = sample_nd[torch.isfinite(sample_nd).all(-1)]
        if len(sample_nd) == 0:
            raise TrainingError("every sampled activation is NaN or infinite", "re-extract the store")
        mean_d = sample_nd.mean(0)
        msq = (sample_nd - mean_d).pow(2).sum(-1).mean().clamp_min(1e-12)
        return mean_d.float(), (self.d / msq).sqrt().float()


def open_data(cfg: Config, rank: int = 0, world_size: int = 1, alone: bool = True) -> Data:
    """The layer's loader; with world_size > 1 it yields rank `rank`'s slice of every global batch. `alone`: no
    other process of this run reads the store (so dropping its pages from the page cache costs no one)."""
    store = open_store(cfg.store)
    # None: the last stored layer; negative counts from the model's end
    layer = resolve_layer(cfg.layer, model_n_blocks(store.model), available=store.layers,
                          what=f"the store at {store.dpath}")
    view = store.layer(layer)
    kinds = ("patches", "cls") if cfg.tokens == "both" else (cfg.tokens,)
    arrays = {k: view.kind(k) for k in kinds}
    drop = cfg.drop_cache if cfg.drop_cache is not None else alone and store_exceeds_memory(arrays)
    loader = ActivationLoader(arrays, cfg.batch_size, cfg.buffer_rows, cfg.seed, rank=rank, world_size=world_size,
                              drop_cache=drop)
    model = {k: store.model[k] for k in MODEL_KEYS if k in store.model}
    return Data(loader, layer, kinds, model, {"store": str(cfg.store.resolve()), "store_rows": store.n_images})


def open_array(cfg: Config, rows_nd: np.ndarray, dtype: str, rank: int = 0, world_size: int = 1,
               alone: bool = True) -> Data:
    """fit()'s checked (n, d) rows (`dtype` a store dtype; bfloat16 as uint16 bits) as one part of one token
    kind: the same loader, so the same seed gives the same batches as a one-shard store of these rows. --layer
    and --tokens only label the rows (they are recorded so later stages can match the SAE to a store)."""
    arrays = {"rows": ShardedArray([rows_nd], dtype)}
    drop = cfg.drop_cache if cfg.drop_cache is not None else alone and store_exceeds_memory(arrays)
    loader = ActivationLoader(arrays, cfg.batch_size, cfg.buffer_rows, cfg.seed, rank=rank, world_size=world_size,
                              drop_cache=drop)
    kinds = ("patches", "cls") if cfg.tokens == "both" else (cfg.tokens,)
    array = {"shape": list(rows_nd.shape), "dtype": dtype}
    return Data(loader, cfg.layer, kinds, {}, {"source": "array", "array": array}, array)


def check_train_memory(cfg: Config, specs_per_rank: list[list[RunSpec]], data: Data, device: str) -> None:
    """A batch, sweep or shuffle buffer that cannot fit fails before any SAE is built or file written (a size that
    does not fit would swap for hours or be killed mid-run). The estimates are lower bounds, for the busiest rank."""
    b, d = data.loader.local_batch, data.d
    # Per SAE: weights, their gradients and Adam's two moments (4 copies of 2 n d float32), and the pre-activations
    # with their gradient (2 of b x n float32); ReLU's dense codes and the optimiser's temporaries add more.
    sae_bytes = max(sum(32 * s.n_latents * d + 8 * b * s.n_latents for s in specs) for specs in specs_per_rank)
    # The shuffle buffer (at least 2-byte values) and the float32 batch, always in host memory.
    host_bytes = 2 * d * min(data.loader.buffer_rows, data.loader.n_rows) + 4 * b * d
    available, where = device_memory(device)
    widest = max(s.n_latents for specs in specs_per_rank for s in specs)
    n_saes = max(len(specs) for specs in specs_per_rank)
    check_memory(sae_bytes + (0 if device.startswith("cuda") else host_bytes),
                 f"--batch-size {cfg.batch_size} with {n_saes} SAE(s) of up to {widest:,} latents",
                 "use a smaller --batch-size, or fewer or narrower SAEs per run", available=available, where=where)
    check_memory(host_bytes, f"--buffer-rows {cfg.buffer_rows} with --batch-size {cfg.batch_size}",
                 "use a smaller --buffer-rows or --batch-size", available=physical_memory())


def provenance(
    cfg: Config, data: Data, spec: RunSpec, step: int, n_steps: int, final: dict[str, Any]
) -> dict[str, Any]:
    """SAEConfig fields naming the model, layer, tokens and training of one SAE."""
    train = {
        **spec.hyper(),
        **data.source,
        "steps": step,
        "n_steps": n_steps,
        "complete": step >= n_steps,
        "batch_size": cfg.batch_size,
        "tokens_seen": step * cfg.batch_size,
        "seed": cfg.seed,
        "lr_warmup": cfg.lr_warmup,
        "lr_decay": cfg.lr_decay,
        "sparsity_warmup": cfg.sparsity_warmup,
        "aux_coef": cfg.aux_coef,
        "freeze_decoder": cfg.freeze_decoder,
        "dtype": cfg.dtype,
        "impl": cfg.impl,
        "final": final,
    }
    return {"model": dict(data.model), "layer": data.layer, "tokens": data.kinds, "train": train}
