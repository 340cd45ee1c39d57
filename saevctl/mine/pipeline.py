"""`mine`: one pass of a store through an SAE into the index (stats, exemplars, image -> features) + faiss.

Chunks of images are read in a background thread while the previous chunk is encoded and folded in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saevctl import lock, rerun, workspace
from saevctl.config import resolve_device
from saevctl.data.images import source_of
from saevctl.errors import CheckpointError
from saevctl.hardware import bf16_if_fast
from saevctl.memory import device_memory
from saevctl.mine import codes as codecache
from saevctl.mine import fresh, scan, vectors, writer
from saevctl.mine.config import Config, check_exemplar_memory
from saevctl.mine.encode import MEASURE_ROWS, agreement, make_encoder
from saevctl.mine.scan import FeatureScanner, TopKCodes
from saevctl.mine.schema import hist_edges
from saevctl.sae import SAE
from saevctl.sae.compat import check_compatible
from saevctl.store import ShardedArray, Store, open_store
from saevctl.store.format import from_numpy

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
MINABLE = ("patches", "cls")
# Codes materialised per chunk (floats); bounds the working set whatever the store size.
CHUNK_CODES = 1 << 24
# Switch: False makes a TopK SAE's codes dense before the scan (the reference; a test checks equal indexes).
SPARSE_TOPK = True
# Switch: False lets the scan use torch's threads (benchmarks/mine.py --ab-scan-threads compares both).
ONE_THREAD_SCAN = True


@dataclass(frozen=True)
class Result:
    index: Path
    sae_id: str
    n_images: int
    n_features: int
    tokens: tuple[str, ...]
    alive: int
    seconds: float
    unchanged: bool = False
    """The index already held this SAE mined from the same inputs: nothing was done (`seconds` is that run's)."""
    compute: dict[str, Any] = dataclasses.field(default_factory=lambda: {"compute": "float32"})
    """The encoder's precision, with bfloat16's measured agreement with float32 (`encode.agreement`)."""


def recorded_compute(info: dict[str, Any]) -> dict[str, Any]:
    """How an index's SAE was encoded (`sae_info(...)`'s row): {"compute": "float32"} or bfloat16's figures. An
    index mined before the option existed was mined in float32."""
    got = info["config"].get("compute")
    return dict(got) if isinstance(got, dict) else {"compute": "float32"}


def mined_kinds(sae: SAE) -> tuple[str, ...]:
    """The token kinds mined for an SAE: those of MINABLE it was trained on, patches first (the default)."""
    return tuple(k for k in MINABLE if k in sae.cfg.tokens) or ("patches",)


def check_match(sae: SAE, store: Store, sae_dpath: Path) -> int:
    """The store layer the SAE reads; a one-line error when model, layer, token kinds or width differ."""
    if not sae.cfg.model.get("weights_sha256"):
        # the index files features under the model's weights, so an SAE of unknown provenance cannot be mined
        raise CheckpointError(f"the SAE at {sae_dpath} does not record which model it was trained on",
                              "re-train it with saevctl train, or import it with saevctl sae import --model")
    return check_compatible(sae.cfg, store=store, kinds=mined_kinds(sae), sae_path=sae_dpath)


def _chunks(arrays: dict[str, ShardedArray], per: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first row, {kind: rows}) shard by shard, straight from each shard's memory map."""
    first = next(iter(arrays.values()))
    for s, part in enumerate(first.parts):
        for lo in range(0, len(part), per):
            # np.array copies here, in the prefetch thread, so the disk read overlaps the previous chunk's encode.
            rows = {k: from_numpy(np.array(a.parts[s][lo : lo + per]), a.dtype) for k, a in arrays.items()}
            yield first.offsets[s] + lo, rows


def _prefetched(it: Iterator[Any]) -> Iterator[Any]:
    """Read the next chunk from disk while the current one is encoded."""
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(next, it, None)
        while (item := fut.result()) is not None:
            fut = pool.submit(next, it, None)
            yield item


@contextlib.contextmanager
def _one_thread(device: str) -> Iterator[None]:
    """The scanner's and the index tables' many small ops run faster on one CPU thread: with two, each op waits
    at an OpenMP barrier, which costs more than the op itself when the cores are shared (measured:
    docs/performance.md)."""
    n = torch.get_num_threads()
    if device != "cpu" or n == 1 or not ONE_THREAD_SCAN:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def source_numbers(store: Store) -> torch.Tensor | None:
    """Each stored row's source photo as a number (saevctl.data.images.source_of), or None when every row is its
    own source: then --max-per-source cannot bind and the scan takes the uncapped path."""
    numbers: dict[str, int] = {}
    src = [numbers.setdefault(source_of(im["path"]), len(numbers)) for im in store.images if im["row"] >= 0]
    return torch.tensor(src, dtype=torch.int64) if len(numbers) < len(src) else None


def scan_store(
    sae: SAE, store: Store, layer: int, kinds: tuple[str, ...], cfg: Config, device: str,
    progress: Progress | None = None, keep: list[tuple[int, TopKCodes]] | None = None, compute: str = "float32",
) -> dict[str, FeatureScanner]:
    """One pass over the store: encode each chunk (in `compute` precision) and fold it into one scanner per token
    kind. With `keep` (a list), a TopK SAE's sparse patch codes are also appended to it as (first row, codes), to
    be kept for `features label` (saevctl/mine/codes.py)."""
    view = store.layer(layer)
    arrays = {k: view.kind(k) for k in kinds}
    s, p = sae.cfg.n_latents, store.layout.n_patches
    per = cfg.chunk_images or max(1, min(1024, CHUNK_CODES // (s * p)))
    src_n = source_numbers(store) if cfg.max_per_source is not None else None
    cap = cfg.max_per_source if src_n is not None else None
    # With fewer sources than top_k / cap, no feature can have top_k exemplars: fewer slots let them fill, so a
    # chunk's merge again skips the features none of its images beats.
    top_k = min(cfg.top_k, (int(src_n.max()) + 1) * cap) if src_n is not None and cap is not None else cfg.top_k
    scanners = {k: FeatureScanner(s, top_k, p if k == "patches" else 1, cfg.by, cfg.top_n,
                                  keep_patches=k == "patches", device=device, max_per_source=cap) for k in kinds}
    ids_n = torch.from_numpy(store.row_image_ids())
    # the scanner reads only the codes > 0, except its reference form that copies entering rows' codes from the
    # dense chunk (scan.SPARSE_PATCHES off)
    encode = make_encoder(sae, sparse_topk=SPARSE_TOPK, positive_only=scan.SPARSE_PATCHES, compute=compute)
    bufs = {k: torch.empty(per * (p if k == "patches" else 1) * s, device=device) for k in kinds}
    with torch.inference_mode():
        for row0, rows in _prefetched(_chunks(arrays, per)):
            ids_b = ids_n[row0 : row0 + len(next(iter(rows.values())))].to(device)
            src_b = src_n[row0 : row0 + len(ids_b)].to(device) if src_n is not None else None
            for kind, x in rows.items():
                x_bpd = x.to(device).reshape(len(ids_b), -1, sae.cfg.d)
                b, t, d = x_bpd.shape
                out = bufs[kind][: b * t * s].view(b * t, s)
                codes = encode(x_bpd.reshape(b * t, d), out=out)
                codes_bps = (codes.reshape(b, t, s) if isinstance(codes, torch.Tensor)
                             else replace(codes, shape=(b, t, s)))
                with _one_thread(device):
                    scanners[kind].update(codes_bps, ids_b, src_b)
                if keep is not None and kind == "patches" and isinstance(codes_bps, TopKCodes):
                    keep.append((row0, codes_bps))
            if progress:
                progress(len(ids_b))
    return scanners


def token_tables(sc: FeatureScanner) -> dict[str, dict[str, np.ndarray]]:
    """A scanner's results as numpy columns of the features, histograms and image_features tables."""
    st = sc.stats()
    feat = np.arange(sc.s, dtype=np.int32)
    features = {"feature": feat, "freq": st.freq.cpu().numpy(), "img_freq": st.img_freq.cpu().numpy(),
                "mean": st.mean.cpu().numpy(), "mean_all": st.mean_all.cpu().numpy(),
                "max": st.max.double().cpu().numpy(), "img_mean": st.img_mean.cpu().numpy(),
                "n_fired": st.n_fired.cpu().numpy()}
    hist = st.hist_sb.cpu().numpy()
    hf, hb = np.nonzero(hist)
    edges = np.array(hist_edges())
    histograms = {"feature": hf.astype(np.int32), "bin": hb.astype(np.int16), "lo": edges[hb, 0],
                  "hi": edges[hb, 1], "count": hist[hf, hb]}
    img, rank, f, v = (t.cpu().numpy() for t in sc.image_features())
    image_features = {"image_id": img.astype(np.int32), "rank": rank.astype(np.int16),
                      "feature": f.astype(np.int32), "value": v.astype(np.float32)}
    return {"features": features, "histograms": histograms, "image_features": image_features}


def exemplar_blocks(sc: FeatureScanner, block: int = 2048) -> Iterator[dict[str, np.ndarray]]:
    """Exemplars table columns, a block of features at a time (bounds the memory the BLOBs take), in
    feature-major order so each feature's rows sit together and DuckDB's zone maps find them fast."""
    vals_ks, ids_ks, slot_ks = (t.cpu() for t in sc.topk.ranked())
    patches_skp = sc.topk.patches_skp.cpu() if sc.topk.patches_skp is not None else None
    for lo in range(0, sc.s, block):
        v_kf, i_kf = vals_ks[:, lo : lo + block], ids_ks[:, lo : lo + block]
        keep_fk = ((v_kf > 0) & (i_kf >= 0)).t()
        ex_f, ex_r = keep_fk.nonzero().unbind(1)  # row-major over (feature, rank): already sorted
        ex_f = ex_f + lo
        cols: dict[str, np.ndarray] = {"feature": ex_f.numpy().astype(np.int32), "rank": ex_r.numpy().astype(np.int16),
                "image_id": ids_ks[ex_r, ex_f].numpy().astype(np.int32),
                "value": vals_ks[ex_r, ex_f].numpy().astype(np.float32)}
        if patches_skp is not None:
            acts_ep = patches_skp[ex_f, slot_ks[ex_r, ex_f]].numpy()  # (e, p) float16, little-endian as stored
            cols["n_fired"] = positive_f16(acts_ep).view(np.uint8).sum(1, dtype=np.uint16).astype(np.int16)
            # One bytes object per row straight from a fixed-size view (a Python loop of tobytes is 1.5x slower).
            cols["acts"] = acts_ep.view(f"V{acts_ep.shape[1] * 2}").ravel().astype(object)
        yield cols


def positive_f16(x: np.ndarray) -> np.ndarray:
    """`x > 0` for float16, on the bit patterns (torch's float16 compare on CPU is about 10x slower): the
    positive values, +inf included, are exactly the patterns 0x0001 to 0x7C00."""
    return (x.view(np.uint16) - np.uint16(1)) < np.uint16(0x7C00)


def codes_key(sae: SAE, store: Store, layer: int) -> dict[str, Any]:
    """What kept codes (saevctl/mine/codes.py) were made from: the SAE's weights, the store and the layer."""
    return {"weights_sha256": sae.header["weights_sha256"], "store_id": store_id_of(store), "layer": layer,
            "n_images": store.n_images}


def store_id_of(store: Store) -> str:
    images = store.manifest["config"]["images"]
    key = json.dumps([str(store.dpath.resolve()), images, store.model.get("weights_sha256")])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _store_row(store: Store) -> dict[str, Any]:
    return {"path": str(store.dpath.resolve()), "fingerprint": store.manifest["config"]["images"].get("fingerprint"),
            "model_spec": store.model.get("spec"), "model_sha256": store.model.get("weights_sha256"),
            "model": store.model, "n_images": store.n_images, "grid_h": store.layout.grid_h,
            "grid_w": store.layout.grid_w}


def _sae_row(cfg: Config, sae: SAE, sae_id: str, store: Store, layer: int, kinds: tuple[str, ...],
             secs: float, compute: dict[str, Any]) -> dict[str, Any]:
    sae_dpath = cfg.paths()[0]
    return {"sae_id": sae_id, "name": cfg.name or sae_dpath.resolve().name, "ckpt_path": str(sae_dpath.resolve()),
            "weights_sha256": sae.header["weights_sha256"], "store_id": store_id_of(store),
            "model_spec": store.model.get("spec"), "model_sha256": store.model.get("weights_sha256"),
            "layer": layer, "d": sae.cfg.d, "n_latents": sae.cfg.n_latents, "activation": sae.cfg.activation,
            "tokens": json.dumps(list(kinds)), "top_k": cfg.top_k, "top_n": cfg.top_n, "rank_by": cfg.by,
            "n_images": store.n_images, "n_patches": store.layout.n_patches, "grid_h": store.layout.grid_h,
            "grid_w": store.layout.grid_w, "seconds": secs,
            "config": json.dumps({"sae": sae.cfg.to_dict(), "store": str(store.dpath.resolve()),
                                  rerun.KEY: fresh.mine_inputs(cfg),
                                  "max_per_source": cfg.max_per_source, "compute": compute}, default=str)}


def _check_memory(cfg: Config, sae: SAE, store: Store, kinds: tuple[str, ...], device: str) -> None:
    """A --top-k whose exemplar buffers cannot fit on the device fails here, not after part of the scan."""
    available, where = device_memory(device) if device.startswith("cuda") else (None, "this machine")
    check_exemplar_memory(cfg.top_k, sae.cfg.n_latents, store.layout.n_patches, kinds, available, where=where)


def sae_id_for(cfg: Config, sae: SAE) -> str:
    name = cfg.name or cfg.paths()[0].resolve().name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "sae"
    return f"{safe}-{sae.header['weights_sha256'][:8]}"


def run(cfg: Config, progress: Progress | None = None, on_total: Callable[[int], None] | None = None) -> Result:
    """Mine `cfg.sae` over `cfg.store` into `cfg.index` (atomically), build its faiss index, record defaults.

    Missing paths are the workspace's defaults; `on_total(n)` is told the number of images before the scan. A TopK
    SAE's codes are kept beside the index for features label (saevctl/mine/codes.py)."""
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    index_fpath = cfg.paths()[2]
    # One hold of the index's lock from the freshness check to the last write (the writer re-enters it), so a
    # busy index is refused even when nothing changed, and no other writer slips in between. A new folder gets
    # its lock from the writer, so that bad input leaves no folder behind.
    held = (lock.exclusive(index_fpath, "the index", "--index", make_parent=False) if index_fpath.parent.is_dir()
            else contextlib.nullcontext())
    with held:
        return _run_locked(cfg, t0, progress, on_total)


def _run_locked(cfg: Config, t0: float, progress: Progress | None, on_total: Callable[[int], None] | None) -> Result:
    sae_dpath, store_dpath, index_fpath = cfg.paths()
    kept = fresh.kept_mine(cfg, fresh.mine_inputs(cfg)) if index_fpath.is_file() else None
    if kept is not None:
        if cfg.set_defaults:
            workspace.set_defaults(store=store_dpath.resolve(), sae=sae_dpath.resolve(), index=index_fpath.resolve())
        return Result(index_fpath, kept["sae_id"], kept["n_images"], kept["n_features"], kept["tokens"],
                      kept["alive"], kept["seconds"], unchanged=True, compute=recorded_compute(kept))
    device = resolve_device(cfg.device)
    sae = SAE.load(sae_dpath, device)
    store = open_store(store_dpath)
    layer = check_match(sae, store, sae_dpath)
    kinds = mined_kinds(sae)
    _check_memory(cfg, sae, store, kinds, device)
    sae_id = sae_id_for(cfg, sae)
    compute = _precision(cfg, sae, store, layer, kinds[0], device)
    if on_total:
        on_total(store.n_images)
    keep: list[tuple[int, TopKCodes]] | None = None
    if sae.cfg.activation == "topk" and "patches" in kinds and codecache.fits(
            store.n_images * store.layout.n_patches, sae.cfg.k):
        keep = []  # kept for features label (saevctl/mine/codes.py)
    with writer.staged_index(index_fpath) as idx:  # created first: a locked or corrupt index fails before the scan
        scanners = scan_store(sae, store, layer, kinds, cfg, device, progress, keep, compute["compute"])
        secs = time.perf_counter() - t0
        idx.con.execute("BEGIN TRANSACTION")
        writer.delete_sae(idx, sae_id)
        writer.put_store(idx, store_id_of(store), _store_row(store), store.images)
        writer.put_sae_row(idx, _sae_row(cfg, sae, sae_id, store, layer, kinds, secs, compute))
        with _one_thread(device):  # the tables are built from many small ops too (5x faster on one thread)
            for kind, sc in scanners.items():
                writer.put_token_results(idx, sae_id, kind, token_tables(sc))
                for cols in exemplar_blocks(sc):
                    writer.put_exemplars(idx, sae_id, kind, cols)
        idx.con.execute("COMMIT")
        sha = sae.header["weights_sha256"]
        vectors.save_decoder(index_fpath, sae_id, sae.W_dec.detach().float().cpu().numpy(), sha)
        vectors.build(index_fpath, sae_id, sha)
        if keep:
            codecache.save_codes(index_fpath, sae_id, codes_key(sae, store, layer), keep)
        else:
            codecache.remove(index_fpath, sae_id)
    if cfg.set_defaults:
        workspace.set_defaults(store=store_dpath.resolve(), sae=sae_dpath.resolve(), index=index_fpath.resolve())
    alive = int((scanners[kinds[0]].stats().n_fired > 0).sum())
    log.info("mined %s over %d images in %.1f s", sae_id, store.n_images, time.perf_counter() - t0)
    return Result(index_fpath, sae_id, store.n_images, sae.cfg.n_latents, kinds, alive, time.perf_counter() - t0,
                  compute=compute)


def _precision(cfg: Config, sae: SAE, store: Store, layer: int, kind: str, device: str) -> dict[str, Any]:
    """The encoder's precision for this run (bfloat16 where it is fast, else float32 with a warning, as extract
    --compute), with bfloat16's agreement with float32 measured on the store's first tokens."""
    if cfg.compute != "bfloat16" or not bf16_if_fast("--compute bfloat16", device, "mining"):
        return {"compute": "float32"}
    tokens = store.layer(layer).kind(kind)
    arr = tokens.parts[0]
    per = -(-MEASURE_ROWS // max(1, math.prod(arr.shape[1:-1])))  # images holding the first MEASURE_ROWS tokens
    x = from_numpy(np.array(arr[:per]), tokens.dtype).to(device)
    return agreement(sae, x.reshape(-1, sae.cfg.d)[:MEASURE_ROWS])
