"""Splice evaluation: run a task head with the SAE's reconstruction in place of the activation at its layer,
next to the original model and to mean-ablating that layer's tokens; report the fraction of performance recovered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saevctl import atomic, layout
from saevctl.config import resolve_device
from saevctl.data import resolve_images
from saevctl.edit.session import Prober
from saevctl.errors import InputError
from saevctl.eval import common, metrics
from saevctl.eval.config import SpliceConfig
from saevctl.eval.metrics import Scored
from saevctl.eval.passes import Passes, digest
from saevctl.sae.compat import check_compatible
from saevctl.sae.model import SAE

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
MEAN_CHUNK_TOKENS = 1 << 16
"""Store rows are averaged this many tokens at a time (memory stays bounded on any store)."""


@dataclass
class SpliceResult:
    task: str
    head: str
    layer: int
    kinds: tuple[str, ...]
    """Token kinds replaced by the reconstruction (and by the mean when ablating)."""
    n_images: int
    n_failed: int
    rows: list[dict[str, Any]]
    """Per metric: metric, label, original/spliced/ablated/recovery {mean, lo, hi}; the first is the primary."""
    mean_source: str
    summary: Path
    seconds: float
    notes: list[str] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list, repr=False)
    """Each metric's per-image statistics behind `rows` (what a paired comparison with another SAE resamples)."""

    @property
    def primary(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def recovery(self) -> float:
        return float(self.rows[0]["recovery"]["mean"])


# --- the three variants -------------------------------------------------------------------------------------


@torch.no_grad()
def splice(sae: SAE, x_btd: Float[Tensor, "b t d"], slices: list[slice]) -> Float[Tensor, "b t d"]:
    """The residual stream with the chosen token slices replaced by the SAE's reconstruction decode(encode(x))."""
    out = x_btd.clone()
    for sl in slices:
        part = x_btd[:, sl]
        flat = part.reshape(-1, part.shape[-1])
        out[:, sl] = sae.decode(sae.encode(flat)).reshape(part.shape).to(x_btd.dtype)
    return out


@torch.no_grad()
def ablate(x_btd: Float[Tensor, "b t d"], slices: list[slice], means: list[Tensor]) -> Float[Tensor, "b t d"]:
    """The residual stream with the chosen token slices replaced by their mean vector."""
    out = x_btd.clone()
    for sl, mean_d in zip(slices, means, strict=True):
        out[:, sl] = mean_d.to(out.device, out.dtype)
    return out


def store_means(store_dpath: Path, sae: SAE, layer: int, kinds: tuple[str, ...]) -> list[Tensor]:
    """Mean token vector of each kind at `layer` over the whole store, read a chunk of images at a time."""
    from saevctl.store import open_store

    store = open_store(store_dpath)
    check_compatible(sae.cfg, store=store, kinds=kinds)
    out = []
    for kind in kinds:
        arr = store.layer(layer).kind(kind)
        per_image = int(np.prod(arr.shape[1:-1], dtype=np.int64))
        step = max(1, MEAN_CHUNK_TOKENS // per_image)
        total = torch.zeros(arr.shape[-1], dtype=torch.float64)
        for lo in range(0, len(arr), step):
            total += arr.torch(slice(lo, lo + step)).double().reshape(-1, arr.shape[-1]).sum(0)
        out.append((total / max(len(arr) * per_image, 1)).float())
    return out


@torch.no_grad()
def image_means(prober: Prober, records: list[Any], slices: list[slice], cfg: SpliceConfig,
                progress: Progress | None) -> list[Tensor]:
    """Mean token vector of each spliced kind at the SAE's layer over the evaluated images (a first pass)."""
    sums = [torch.zeros(prober.bb.d_model, dtype=torch.float64) for _ in slices]
    counts = [0 for _ in slices]
    for batch in common.iter_images(records, prober.bb.preprocess, cfg.batch_size, cfg.n_workers):
        if len(batch.u8):
            x = prober.prefix(common.to_input(prober, batch.u8))
            for i, sl in enumerate(slices):
                part = x[:, sl].double()
                sums[i] += part.reshape(-1, part.shape[-1]).sum(0).cpu()
                counts[i] += part.shape[0] * part.shape[1]
        if progress:
            progress(len(batch.u8) + batch.n_failed)
    return [(s / max(c, 1)).float() for s, c in zip(sums, counts, strict=True)]


# --- per-batch statistics by task ----------------------------------------------------------------------------


class _Collector:
    """Per-image statistics of each variant for the head's task, gathered batch by batch."""

    def __init__(self, prober: Prober, masks: common.MaskLabels | None) -> None:
        self.prober, self.task, self.masks = prober, prober.head.task, masks
        self.parts: dict[str, dict[str, list[np.ndarray]]] = {}
        self.n_masked = 0

    def _add(self, metric: str, variant: str, stats: np.ndarray) -> None:
        self.parts.setdefault(metric, {}).setdefault(variant, []).append(stats)

    def out_hw(self) -> tuple[int, int]:
        # Segment heads are scored on the patch grid, where the linear head predicts; saliency at full size.
        return common.grid_hw(self.prober) if self.task == "segment" else self.prober.out_hw

    def add(self, batch: common.Batch, probs: dict[str, Tensor]) -> None:
        ref = probs["original"]
        if self.task == "classify":
            classes = self.prober.head.classes
            labels = torch.tensor([classes.index(r.label) if r.label in classes else -1 for r in batch.records],
                                  device=ref.device)
            for v, p in probs.items():
                st = metrics.classify_stats(p, ref.argmax(-1), labels)
                self._add("accuracy", v, metrics.mean_stats(st["accuracy"]))
                self._add("agreement", v, metrics.mean_stats(st["agreement"]))
        elif self.task == "saliency":
            for v, p in probs.items():
                self._add("cc", v, metrics.mean_stats(metrics.saliency_cc(p, ref)))
        else:
            ref_bp = ref.argmax(1).flatten(1).cpu().numpy()
            n_c = ref.shape[1]
            truth = self._truth(batch) if self.masks is not None else None
            for v, p in probs.items():
                pred = p.argmax(1).flatten(1).cpu().numpy()
                self._add("agreement", v, metrics.mean_stats((pred == ref_bp).mean(1)))
                if truth is not None:
                    self._add("miou", v, metrics.segment_stats(pred, truth, n_c))

    def _truth(self, batch: common.Batch) -> np.ndarray:
        assert self.masks is not None
        rows = []
        for rec, size in zip(batch.records, batch.sizes, strict=True):
            values = self.masks.values(rec.path, size)
            if values is None:
                rows.append(np.full(self.prober.bb.layout.n_patches, -1, np.int64))
            else:
                self.n_masked += 1
                rows.append(self.masks.head_labels(values))
        return np.stack(rows)

    def scored(self) -> list[Scored]:
        """Primary metric first: accuracy when some image has a label the head knows, mIoU with masks."""
        labels = {"accuracy": "top-1 accuracy (image labels)", "agreement": "top-1 agreement with the original model",
                  "cc": "saliency agreement with the original (Pearson CC)", "miou": "mIoU vs masks (patch grid)"}
        if self.task == "segment":
            labels["agreement"] = "patch agreement with the original model"
        order = {"classify": ["accuracy", "agreement"], "saliency": ["cc"], "segment": ["miou", "agreement"]}[self.task]
        out = []
        for name in order:
            if name not in self.parts:
                continue
            stats = {v: np.concatenate(s) for v, s in self.parts[name].items()}
            if name == "accuracy" and stats["original"][:, 1].sum() == 0:
                continue  # no image carries a label the head knows
            score = metrics.miou_score if name == "miou" else metrics.mean_score
            out.append(Scored(name, labels[name], stats, score))
        return out


# --- the run -------------------------------------------------------------------------------------------------


def _means(prober: Prober, records: list[Any], kinds: tuple[str, ...], slices: list[slice], cfg: SpliceConfig,
           progress: Progress | None, passes: Passes) -> tuple[list[Tensor], str]:
    if cfg.store is not None:  # a pass over the whole store: once per run (the model's store, whichever SAE)
        store = cfg.store
        means = passes.get(("store_means", id(prober.bb), str(Path(store).resolve()), prober.layer, kinds),
                           lambda: torch.stack(store_means(store, prober.sae, prober.layer, kinds)))
        return list(means.unbind(0)), f"the store at {cfg.store}"
    return image_means(prober, records, slices, cfg, progress), f"a first pass over the {len(records)} evaluated images"


@torch.no_grad()
def _batch_probs(prober: Prober, batch: common.Batch, slices: list[slice], means: list[Tensor],
                 out_hw: tuple[int, int], passes: Passes) -> dict[str, Tensor]:
    """The head's outputs on each variant; the original and ablated ones (and the stream) from `passes` when an
    earlier SAE of the run computed them (on a CPU the same one-variant-at-a-time chunks as together)."""
    x = passes.prefix(prober, batch.records, batch.u8)
    chunk = prober.variant_chunk(len(x))
    return {"original": passes.outputs(prober, batch.records, x, chunk, out_hw),
            "spliced": prober.outputs(splice(prober.sae, x, slices), chunk=chunk, out_hw=out_hw).float(),
            "ablated": passes.outputs(prober, batch.records, x, chunk, out_hw, "ablated",
                                      lambda x_btd: ablate(x_btd, slices, means), (digest(means),))}


def run_splice(cfg: SpliceConfig, progress: Progress | None = None, prober: Prober | None = None,
               on_total: Callable[[int], None] | None = None, passes: Passes | None = None) -> SpliceResult:
    """Score the head with the original, spliced and mean-ablated stream on every image; write a JSON summary.

    Progress counts images per pass (two passes when the ablation mean comes from the images); `on_total` learns
    that count once the images are listed. The summary's write lock is held throughout. `passes` shares the
    SAE-independent passes with the other evaluations of one run (`eval all`)."""
    t0 = time.perf_counter()
    with common.summary_target(cfg.sae, cfg.index, cfg.out, "splice") as (sae_path, summary):
        return _splice(cfg, sae_path, summary, t0, progress, prober, on_total,
                       passes if passes is not None else Passes(0))


def _splice(cfg: SpliceConfig, sae_path: Path, summary: Path, t0: float, progress: Progress | None,
            prober: Prober | None, on_total: Callable[[int], None] | None, passes: Passes) -> SpliceResult:
    assert cfg.images is not None  # SpliceConfig.check requires it
    records = list(resolve_images(cfg.images, cfg.max_images).records)
    if on_total:
        on_total(len(records) if cfg.store is not None else 2 * len(records))
    mask_set = common.open_checked_masks(cfg.masks, records, cfg.sae) if cfg.masks is not None else None
    prober = prober or Prober.load(cfg.sae, cfg.head, cfg.classes, resolve_device(cfg.device))
    prober.check_batch_memory(cfg.batch_size, len(records), len(metrics.VARIANTS), full_codes=True)
    kinds = common.spliced_kinds(prober.sae, prober.bb.layout.n_cls)
    slices = common.token_slices(prober.bb.layout, kinds)
    notes: list[str] = []
    masks = None
    if mask_set is not None:
        if prober.head.task == "segment":
            masks = common.MaskLabels(mask_set, prober)
        else:
            notes.append(f"--masks is ignored: head {prober.head.name} is a {prober.head.task} head")
    means, mean_source = _means(prober, records, kinds, slices, cfg, progress, passes)
    col = _Collector(prober, masks)
    n_failed = n_images = 0
    for batch in common.iter_images(records, prober.bb.preprocess, cfg.batch_size, cfg.n_workers):
        n_failed += batch.n_failed
        if len(batch.u8):
            col.add(batch, _batch_probs(prober, batch, slices, means, col.out_hw(), passes))
            n_images += len(batch.u8)
        if progress:
            progress(len(batch.u8) + batch.n_failed)
    if not n_images:
        raise InputError(f"none of the images in {cfg.images} could be read", "check the --images folder")
    if masks is not None and not col.n_masked:
        notes.append(f"no image has a mask in {cfg.masks}: scored by agreement with the original model")
        col.parts.pop("miou", None)
    scored = col.scored()
    rows = [metrics.summarize(s, cfg.n_boot, cfg.seed) for s in scored]
    if not np.isfinite(rows[0]["recovery"]["mean"]):
        notes.append("recovery is undefined: mean-ablating the layer does not change the metric")
    res = SpliceResult(prober.head.task, prober.head.name, prober.layer, kinds, n_images, n_failed, rows,
                       mean_source, summary, time.perf_counter() - t0, notes, scored)
    atomic.write_json(summary, {
        "schema_version": layout.EVAL_SCHEMA, "format": common.FORMAT + "-splice", "sae": str(sae_path),
        "images": cfg.images, "head": res.head, "task": res.task, "layer": res.layer, "kinds": list(kinds),
        "n_images": n_images, "n_failed": n_failed, "mean_source": mean_source, "n_boot": cfg.n_boot,
        "seed": cfg.seed, "metrics": common.jsonable(rows), "notes": notes, "seconds": res.seconds,
    })
    return res

