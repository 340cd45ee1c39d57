"""Extraction: decode images in threads, run the ViT to the deepest chosen block, write shards in the background.

Decoding, compute and writing overlap, so throughput approaches the bare forward's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import typing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saevctl import atomic, dist
from saevctl.config import resolve_device
from saevctl.data import ImageRecord, ImageSource, open_image, resolve_images
from saevctl.errors import InputError, SaevctlError, StoreError
from saevctl.extract import config, labels, precision, ranks
from saevctl.extract.config import Config
from saevctl.memory import check_memory, device_memory
from saevctl.store import StoreWriter
from saevctl.store.format import FLOAT16_MAX, NP_DTYPES, TOKEN_KINDS, kind_shape, read_manifest, to_numpy
from saevctl.store.writer import ShardStream
from saevctl.vit import Backbone, Preprocess, load_backbone

__all__ = ["Config", "Result", "run"]  # Config lives in extract/config.py (torch-free); kept importable from here
log = logging.getLogger(__name__)
Progress = Callable[[int], None]
# The Config spells the store's dtypes and token kinds itself, to stay free of numpy; they must agree.
assert set(typing.get_args(config.StoreDtype)) == set(NP_DTYPES) and config.TOKEN_KINDS == TOKEN_KINDS


@dataclass(frozen=True)
class Result:
    out: Path
    manifest: dict[str, Any]
    resumed_shards: int
    already_complete: bool
    labels: dict[str, Any] | None = None
    """The store's labels header (labels/classes.json) when --masks was given, for the summary."""
    label_sets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Every mask set's labels header, the default set first."""
    compute: dict[str, Any] | None = None
    """With a bfloat16 forward: its relative error against float32 per layer (the store's compute.json)."""


def _decode(
    records: list[ImageRecord], pre: Preprocess, lut: np.ndarray | None
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Open and transform a batch; unreadable images become table rows with status 'unreadable'.
    With `lut` (CPU runs) the batch comes back normalised, float32 (b, 3, h, w), so the forward pass's
    thread does nothing but the forward; without it (CUDA) as uint8 (b, h, w, 3), a quarter of the bytes
    to copy to the device, normalised there."""
    arrays, rows = [], []
    for rec in records:
        row: dict[str, Any] = {"id": rec.id, "path": rec.path, "label": rec.label}
        try:
            img = open_image(rec.path)
            row.update(width=img.width, height=img.height, status="ok")
            arrays.append(pre.to_uint8(img))
        except SaevctlError as e:
            # info, not warning: the summary counts them and images.jsonl lists each with its error
            log.info("skipping %s: %s", rec.path, e.message)
            row.update(width=None, height=None, status="unreadable", error=e.message)
        rows.append(row)
    size = pre.size
    if lut is None:
        batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
        return batch, rows
    batch = np.empty((len(arrays), 3, size, size), np.float32)
    for i, u8 in enumerate(arrays):
        pre.normalize_into(u8, batch[i], lut)
    return batch, rows


def _check_range(x: torch.Tensor, dtype: str, layer: int, kind: str) -> None:
    if dtype != "float16":
        return
    if not x.numel():
        return
    lo, hi = torch.aminmax(x)  # no |x| temporary: this runs on every batch
    peak = max(-float(lo), float(hi))
    if not peak <= FLOAT16_MAX:  # also catches NaN
        raise StoreError(
            f"layer {layer} {kind} activations reach {peak:.4g}, beyond float16's range ({FLOAT16_MAX:.0f})",
            "re-run with --dtype bfloat16 (same size, wider range) or --dtype float32, into a new --out",
        )


def _background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread) so that decoding and writing yield to the
    forward pass's compute threads, whose barriers stall when one of them is preempted."""
    if os.environ.get("SAEVCTL_DECODE_NICE", "5") == "0" or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):  # not permitted here: run at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(os.environ.get("SAEVCTL_DECODE_NICE", "5")))


class _ShardSink:
    """Streams one shard to disk from the background thread: the cast to the store dtype, the range check and
    the write of each batch overlap the next forward pass, and the shard's end leaves one batch to flush."""

    MAX_QUEUED = 2  # batches of outputs waiting for the writer (bounds memory)

    def __init__(self, writer: StoreWriter, index: int, bb: Backbone, layers: list[int], cfg: Config,
                 io: ThreadPoolExecutor) -> None:
        self.bb, self.tokens, self.dtype, self.io = bb, cfg.tokens, cfg.dtype, io
        lay = bb.layout
        spec = {(layer, kind): (NP_DTYPES[cfg.dtype], kind_shape(kind, lay.n_patches, lay.n_reg, bb.d_model))
                for layer in layers for kind in cfg.tokens}
        self.rows: list[dict[str, Any]] = []
        self.stream: Future[ShardStream] = io.submit(ShardStream, writer, index, spec)
        self.queued: list[Future[ShardStream] | Future[None]] = [self.stream]

    def _wait(self, keep: int) -> None:
        while len(self.queued) > keep:
            self.queued.pop(0).result()  # surfaces write errors (disk full, overflow) in the main thread

    def add(self, outs: dict[int, torch.Tensor], rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self._wait(self.MAX_QUEUED)
        self.queued.append(self.io.submit(self._write, outs))

    def _write(self, outs: dict[int, torch.Tensor]) -> None:
        arrays = {}
        for layer, x_btd in outs.items():
            parts = self.bb.layout.split(x_btd)
            for kind in self.tokens:
                _check_range(parts[kind], self.dtype, layer, kind)
                arrays[(layer, kind)] = to_numpy(parts[kind], self.dtype)
        self.stream.result().append(arrays)

    def close(self) -> Future[None]:
        """Queue the shard's completion (header counts, fsync, rename); the future fails if any write did."""
        rows, queued = list(self.rows), list(self.queued)

        def finish() -> None:
            for fut in queued:  # all done: the writer is one thread, first in first out
                err = fut.exception()
                if err is not None:
                    self.abort()
                    raise err
            self.stream.result().close(rows)

        return self.io.submit(finish)

    def abort(self) -> None:
        for fut in self.queued:
            with contextlib.suppress(Exception):
                fut.result()
        if self.stream.done() and self.stream.exception() is None:
            self.stream.result().abort()


def _store_config(cfg: Config, bb: Backbone, layers: list[int], src: ImageSource, per_shard: int) -> dict[str, Any]:
    return labels.masks_config(cfg.masks) | {
        "model": bb.describe(),
        "images": {"spec": src.spec, "kind": src.kind, "n": len(src.records), "fingerprint": src.fingerprint()},
        "layers": layers,
        "tokens": list(cfg.tokens),
        "dtype": cfg.dtype,
        "images_per_shard": per_shard,
    } | ({"compute": cfg.compute} if cfg.compute != "auto" else {})  # auto stays resumable across devices


def _batches(
    records: list[ImageRecord],
    ranges: list[tuple[int, tuple[int, int]]],
    bs: int,
    pool: ThreadPoolExecutor,
    pre: Preprocess,
    lut: np.ndarray | None,
) -> Iterator[tuple[int, bool, Future[tuple[np.ndarray, list[dict[str, Any]]]]]]:
    """Yield (shard index, last batch of shard, decode future), keeping a few decodes in flight."""
    plan = [(s, lo, min(lo + bs, hi)) for s, (a, hi) in ranges for lo in range(a, hi, bs)]
    ends = {s: hi for s, (_, hi) in ranges}
    ahead = max(2, pool._max_workers)  # the pool's size bounds the decode look-ahead
    futures: list[Future[Any]] = []
    for i in range(len(plan)):
        while len(futures) < min(ahead, len(plan) - i):
            _, lo, hi = plan[i + len(futures)]
            futures.append(pool.submit(_decode, records[lo:hi], pre, lut))
        s, _, hi = plan[i]
        yield s, hi == ends[s], futures.pop(0)


def _layers_and_tokens(cfg: Config, bb: Backbone) -> list[int]:
    layers = sorted({bb.check_layer(layer) for layer in cfg.layers})
    missing = [t for t in cfg.tokens if t not in bb.layout.kinds()]
    if missing:
        raise InputError(
            f"{cfg.model} has no {', '.join(missing)} tokens (it has {', '.join(bb.layout.kinds())})",
            "drop them from --tokens",
        )
    return layers


def run(
    cfg: Config,
    progress: Progress | None = None,
    backbone: Backbone | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Result:
    """Extract (or resume extracting) the store described by `cfg`; `backbone` skips loading cfg.model.
    `on_total(n)` is told the number of images once the source is listed (for a progress bar)."""
    assert cfg.images is not None  # Config.check refuses a Config without images
    src = resolve_images(cfg.images, cfg.max_images)
    labels.before_extract(cfg.masks, src.records)  # mask errors come before any compute
    single = dist.dist_info().world_size == 1  # under torchrun/srun each rank extracts its share of shards
    if on_total and single:
        on_total(len(src.records) * (1 + len(cfg.masks)))  # --masks: each set's mask pass advances the bar again
    device = dist.rank_device(resolve_device(cfg.device))
    dist.init_process_group(device)
    bb = backbone if backbone is not None else load_backbone(cfg.model, device)
    if not cfg.tokens:
        cfg = dataclasses.replace(cfg, tokens=tuple(k for k in ("patches", "cls") if k in bb.layout.kinds()))
    layers = _layers_and_tokens(cfg, bb)
    available, where = device_memory(device)
    check_memory(bb.forward_bytes(min(cfg.batch_size, len(src.records)), len(layers)), f"--batch-size {cfg.batch_size}",
                 "pass a smaller --batch-size", available=available, where=where)
    per_shard = -(-cfg.images_per_shard // cfg.batch_size) * cfg.batch_size
    with contextlib.ExitStack() as held:  # rank 0 holds the store's write lock until the store is finished
        plan = ranks.plan_shards(cfg.out, _store_config(cfg, bb, layers, src, per_shard), len(src.records), held)
        result = _write_store(cfg, bb, layers, list(src.records), plan, device, progress, on_total)
    return dataclasses.replace(result, compute=precision.read(cfg.out))


def _write_store(cfg: Config, bb: Backbone, layers: list[int], records: list[ImageRecord], plan: ranks.Plan,
                 device: str, progress: Progress | None, on_total: Callable[[int], None] | None) -> Result:
    """Extract this rank's unfinished shards of `plan`, then finish the store (or only its labels, when complete)."""
    single = dist.dist_info().world_size == 1
    if plan.complete:
        # Nothing is rewritten: a complete store stays byte for byte what it was.
        return labels.after_extract(
            cfg, bb, Result(cfg.out, read_manifest(cfg.out), len(plan.writer.shard_ranges), True)
        )
    todo = list(plan.mine)
    per_image = sum(
        int(np.prod(kind_shape(k, bb.layout.n_patches, bb.layout.n_reg, bb.d_model))) for k in cfg.tokens
    ) * len(layers) * NP_DTYPES[cfg.dtype].itemsize
    atomic.check_free_space(cfg.out, per_image * sum(hi - lo for _, (lo, hi) in todo))
    if progress and plan.done and single:
        progress(sum(hi - lo for s, (lo, hi) in enumerate(plan.writer.shard_ranges) if s in plan.done))
    if on_total and not single:
        on_total(sum(hi - lo for _, (lo, hi) in todo))
    _extract_shards(cfg, bb, layers, records, todo, plan.writer, device, progress)
    result = Result(cfg.out, ranks.finish(plan.writer), len(plan.done), False)
    return labels.after_extract(cfg, bb, result, progress if single else None)


def _extract_shards(
    cfg: Config,
    bb: Backbone,
    layers: list[int],
    records: list[ImageRecord],
    todo: list[tuple[int, tuple[int, int]]],
    writer: StoreWriter,
    device: str,
    progress: Progress | None,
) -> None:
    on_cuda = device.startswith("cuda")
    compute = precision.resolve_compute(cfg.compute, device, cfg.dtype)
    measure = compute == "bfloat16" and dist.is_main() and precision.read(cfg.out) is None
    pending: Future[None] | None = None
    sink: _ShardSink | None = None
    with ThreadPoolExecutor(cfg.n_workers, initializer=_background_priority) as decoders, \
            ThreadPoolExecutor(1, initializer=_background_priority) as io:
        try:
            lut = None if on_cuda else bb.preprocess.lookup_table()
            for shard, last, fut in _batches(records, todo, cfg.batch_size, decoders, bb.preprocess, lut):
                if sink is None:
                    sink = _ShardSink(writer, shard, bb, layers, cfg, io)
                pixels, rows = fut.result()
                if len(pixels):
                    x = torch.from_numpy(pixels)
                    if on_cuda:
                        x = bb.preprocess.normalize(x.pin_memory().to(device, non_blocking=True))
                    if measure:
                        precision.record(cfg.out, precision.measure(bb, x[: precision.MEASURE_IMAGES], layers, device))
                        measure = False
                    with precision.autocast(device, compute):
                        outs = bb.forward_to(x, layers)
                    sink.add(outs, rows)
                else:
                    sink.rows.extend(rows)
                if progress:
                    progress(len(rows))
                if last:
                    if pending is not None:
                        pending.result()  # the previous shard is complete before this one is queued to close
                    pending, sink = sink.close(), None
            if pending is not None:
                pending.result()
        except BaseException:
            if sink is not None:
                sink.abort()  # no half shard is left behind; the shard is redone on resume
            raise
