"""Mining throughput next to the bare encoder GEMM of the same activations at SAE widths 6,144 and 24,576, peak
memory at 24,576 features, and the latency of `features top` / `features similar` on an index of 100k images.

Usage: python benchmarks/mine.py [--quick] [--images N] [--widths 6144,24576] [--repeats R] [--ab-scan-threads]
       [--topk K] [--json OUT]
Ceiling: `x @ W_enc` (torch.mm into a reused output, float32 as the SAE) over exactly the chunk shapes mining
encodes (images per chunk x 256 patches, d = 384), nothing else: no store read, no bias, no nonlinearity, no
scan. Mining is `run(Config)` end to end; two ratios against that ceiling, both from the same interleaved runs:
  (a) steady scan: mining's wall time from the end of its first chunk to the end of its last (chunks 2..N: store
      read, fused encode, statistics, streaming top-k with per-patch codes, per-image top features: the part
      that grows with the images) over the GEMM of chunks 2..N;
  (b) end to end: the whole `run` (also SAE load, store open, index open, the first chunk with the top-k's
      fill-in, the DuckDB write with the exemplars' per-patch BLOBs, the faiss build) over the GEMM of all
      chunks; its fixed seconds (set-up, first chunk, write) are printed beside it.
Figures are min / median / max over interleaved repeats, with the load average. Activations are synthetic (a store
written directly), the SAE is random with its biases set so that about 1.5% of codes fire, as in a trained SAE.
Full mode mines 2,048 images (a real store's size: the demo's), --quick 64 (a check of the code paths; its
fixed costs weigh far more than in a real run).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saevctl.mine import Config, Index, pipeline, run
from saevctl.mine.pipeline import CHUNK_CODES, _chunks
from saevctl.sae import SAE, SAEConfig
from saevctl.store import StoreWriter, open_store

from _bare import encoder_gemm, sync
from _timing import Report, Series, Timed, interleave, load_1m, section

D, P = 384, 256


def synthetic_store(dpath: Path, n: int, p: int, d: int, seed: int = 0) -> Path:
    side = round(p**0.5)
    model = {"spec": "synthetic", "arch": "none", "weights_sha256": "0" * 64, "n_blocks": 12, "d_model": d,
             "patch_size": 14, "layout": {"n_cls": 1, "n_reg": 0, "grid_h": side, "grid_w": side},
             "preprocess": {"size": 14 * side, "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "squash"}}
    config = {"model": model, "images": {"spec": "demo", "kind": "demo", "n": n, "fingerprint": "bench"},
              "layers": [6], "tokens": ["patches"], "dtype": "float16", "images_per_shard": 512}
    w = StoreWriter(dpath, config, n)
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(64, d)).astype(np.float32)
    for s, (lo, hi) in enumerate(w.shard_ranges):
        m = hi - lo
        # Low-rank structure plus noise, so that some features fire far more often than others.
        x = rng.normal(size=(m * p, 64)).astype(np.float32) @ basis + rng.normal(size=(m * p, d)).astype(np.float32)
        rows = [{"id": i, "path": f"skimage:astronaut#{i % 300},{i % 200},200,{i % 2}", "label": None,
                 "width": 200, "height": 200, "status": "ok"} for i in range(lo, hi)]
        w.write_shard(s, {(6, "patches"): x.reshape(m, p, d).astype(np.float16)}, rows)
    w.finalize()
    return dpath


def sparse_sae(store_dpath: Path, n_latents: int, out: Path, density: float = 0.015, k: int = 0) -> Path:
    """A random SAE, ReLU (k = 0) or TopK with k active latents per token (`density` still sets its biases)."""
    store = open_store(store_dpath)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=store.d, n_latents=n_latents, model=store.model, layer=6, tokens=("patches",),
                        activation="topk" if k else "relu", k=k))
    sample = store.layer(6).patches.torch(slice(0, min(32, store.n_images))).float().reshape(-1, store.d)
    sae.set_normalization(sample)
    with torch.no_grad():
        pre = sae.pre_acts(sae.normalize(sample))
        sae.b_enc -= torch.quantile(pre[:4096], 1 - density, dim=0)
    sae.save(out)
    return out


def encode_pass(sae: SAE, store_dpath: Path) -> float:
    """Seconds for mining's fused encoder over the store in mining's chunks: the peak-memory comparison's
    "encoding only" process."""
    from saevctl.mine.encode import make_encoder

    store = open_store(store_dpath)
    per = max(1, min(1024, CHUNK_CODES // (sae.cfg.n_latents * store.layout.n_patches)))
    encode = make_encoder(sae)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, rows in _chunks({"patches": store.layer(6).patches}, per):
            encode(rows["patches"].reshape(-1, store.d).to(sae.W_enc.device))
    return time.perf_counter() - t0


def chunk_rows(store_dpath: Path, n_latents: int) -> list[int]:
    """Rows of every chunk mining encodes (per shard, `per` images at a time), for the GEMM ceiling."""
    store = open_store(store_dpath)
    p = store.layout.n_patches
    per = max(1, min(1024, CHUNK_CODES // (n_latents * p)))
    return [min(per, len(part) - lo) * p for part in store.layer(6).patches.parts for lo in range(0, len(part), per)]


@dataclass
class Spans:
    """Where one mining run's seconds went, from its own callbacks (`on_total` before the scan, `progress` after
    every chunk): set-up (SAE load, store open, checks), the first chunk (index open, read, encode, scan, the
    top-k's fill-in), the steady scan (chunks 2..N: read, encode, scan: what grows with the data) and the write
    (tables, the DuckDB write with the exemplars' per-patch BLOBs, decoder, faiss, rename)."""

    setup: float
    first: float
    steady: float
    write: float


def mine_fn(ckpt: Path, store: Path, root: Path, s: int, spans: list[Spans], device: str = "cpu",
            one_thread_scan: bool = True, compute: str = "float32") -> Timed:
    """`saevctl mine` end to end into a fresh index each call (making the path and deleting the index afterwards
    are not timed); appends each call's Spans to `spans`. `one_thread_scan=False` lets the scan use every torch
    thread (pipeline.ONE_THREAD_SCAN)."""
    calls = [0]

    def go() -> float:
        calls[0] += 1
        index = root / f"ix{s}-{int(one_thread_scan)}-{calls[0]}.duckdb"
        pipeline.ONE_THREAD_SCAN = one_thread_scan
        marks: list[float] = []

        def mark(_n: int) -> None:
            marks.append(time.perf_counter())

        t0 = time.perf_counter()
        try:
            run(Config(sae=ckpt, store=store, index=index, device=device, set_defaults=False,
                       compute="bfloat16" if compute == "bfloat16" else "float32"), progress=mark, on_total=mark)
        finally:
            pipeline.ONE_THREAD_SCAN = True
        t1 = time.perf_counter()
        spans.append(Spans(marks[0] - t0, marks[1] - marks[0], marks[-1] - marks[1], t1 - marks[-1]))
        for f in index.parent.glob(f"{index.name}*"):  # the index and its decoder / faiss files
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        return t1 - t0

    return go


def gemm_fn(rows: list[int], s: int, steady: list[float], device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> Timed:
    """The ceiling: the encoder GEMM of every chunk mining encodes, in mining's precision; also records the seconds
    of chunks 2..N alone (the steady scan's ceiling) in `steady`."""
    first = encoder_gemm(rows[:1], D, s, dtype, device=device)
    rest = encoder_gemm(rows[1:], D, s, dtype, device=device)
    wait = sync(device)

    def go() -> float:
        t0 = time.perf_counter()
        first()
        wait()
        t1 = time.perf_counter()
        rest()
        wait()
        t2 = time.perf_counter()
        steady.append(t2 - t1)
        return t2 - t0

    return go


def throughput(root: Path, n: int, widths: list[int], repeats: int, rep: Report, device: str = "cpu",
               ab_threads: bool = False, k: int = 0, compute: str = "float32") -> None:
    """Mining at each width, interleaved with the encoder GEMM of the same chunks: end to end with its fixed
    seconds broken out, and the steady scan (chunks 2..N) against the GEMM of those chunks. `ab_threads` adds
    mining with the scan on every torch thread, interleaved too (an A/B of our own code, same ceiling)."""
    store = synthetic_store(root / "store", n, P, D)
    fns: dict[str, Timed] = {}
    spans: dict[str, list[Spans]] = {}
    steady: dict[int, list[float]] = {s: [] for s in widths}
    rows: dict[int, list[int]] = {}
    for s in widths:
        ckpt = sparse_sae(store, s, root / f"sae{s}", k=k)
        rows[s] = chunk_rows(store, s)
        fns[f"gemm_{s}"] = gemm_fn(rows[s], s, steady[s], device,
                                   torch.bfloat16 if compute == "bfloat16" else torch.float32)
        for tag in ("", "_all_threads")[: 2 if ab_threads else 1]:
            spans[f"mine{tag}_{s}"] = []
            fns[f"mine{tag}_{s}"] = mine_fn(ckpt, store, root, s, spans[f"mine{tag}_{s}"], device, tag == "",
                                            compute)
    times = interleave(fns, repeats, warmup=1, sync=sync(device))
    kind = f"TopK k={k}" if k else "ReLU"
    section(f"mine on {device}: {n:,} images x {P} patches, d = {D}, {kind} SAE, encoder in {compute}, "
            f"{repeats} repeats")
    for key in spans:
        s = int(key.rsplit("_", 1)[1])
        if key != f"mine_{s}":
            print(f"  -- the scan on all {torch.get_num_threads()} torch threads (pipeline.ONE_THREAD_SCAN = False):")
        mine, gemm = times[key], times[f"gemm_{s}"]
        sp = spans[key][-repeats:]  # the warm-up round's are dropped, as interleave drops its times
        tag = key.removeprefix("mine")  # "_1234" or "_all_threads_1234": the figures' keys
        # (a) what grows with the data: chunks 2..N, read + encode + scan, against the GEMM of those chunks
        acts = (sum(rows[s]) - rows[s][0])
        scan = Series(f"scan{tag}", [x.steady for x in sp], mine.loads)
        ceil = Series(f"gemm_steady_{s}", steady[s][-repeats:], gemm.loads)
        rep.rate(f"scan{tag}", f"steady scan, width {s:,} (activations/s)", scan, acts, "act/s", ",.0f")
        rep.rate(f"scan_ceiling{tag}", f"ceiling: x @ W_enc, chunks 2..N, {s:,}", ceil, acts, "act/s", ",.0f")
        rep.series_ratio(f"scan_ratio{tag}", f"(a) steady scan ratio, width {s:,}", scan, ceil)
        # (b) end to end, fixed seconds beside it
        rep.rate(f"mine{tag}", f"end to end, width {s:,} (activations/s)", mine, n * P, "act/s", ",.0f")
        rep.rate(f"ceiling{tag}", f"ceiling: x @ W_enc, all chunks, {s:,}", gemm, n * P, "act/s", ",.0f")
        rep.series_ratio(f"ratio{tag}", f"(b) end-to-end ratio, width {s:,}", mine, gemm)
        for part in ("setup", "first", "write"):
            rep.figure(f"{part}_s{tag}", f"  {SPAN_LABELS[part]}", [getattr(x, part) for x in sp], "s",
                       mine.loads, ".2f")


SPAN_LABELS = {"setup": "set-up: SAE load, store open", "first": "first chunk: index open, fill-in",
               "write": "write: DuckDB, BLOBs, faiss"}


def peak_memory(root: Path, n: int) -> dict:
    """Max RSS of a fresh process mining with 24,576 features, next to one that only encodes."""
    store = synthetic_store(root / "store24k", n, 256, 384, seed=1)
    ckpt = sparse_sae(store, 24576, root / "sae24k")
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark over fork + exec into ru_maxrss.
    code = ("import re, sys, torch; from pathlib import Path; from saevctl.sae import SAE; "
            "sys.path.insert(0, {here!r}); import mine as b; {body}; "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    here = str(Path(__file__).parent)
    bodies = {
        "encode_only": f"b.encode_pass(SAE.load({str(ckpt)!r}), Path({str(store)!r}))",
        "mine": "from saevctl.mine import Config, run; "
        f"run(Config(sae=Path({str(ckpt)!r}), store=Path({str(store)!r}), "
        f"index=Path({str(root / 'ix24k.duckdb')!r}), device='cpu', set_defaults=False))",
    }
    out = {}
    for name, body in bodies.items():
        res = subprocess.run(
            [sys.executable, "-c", code.format(here=here, body=body)], capture_output=True, text=True, check=True
        )
        out[f"{name}_peak_mib"] = int(res.stdout.strip().splitlines()[-1]) / 1024
    out["topk_state_mib"] = 24576 * 25 * 256 * 2 / 2**20  # float16 per-patch codes of the exemplars
    return out


def synthetic_index(
    root: Path, n_images: int, s: int, k: int = 25, top_n: int = 32, p: int = 256, d: int = 384
) -> tuple[Path, str]:
    """An index of n_images with s features, written through the same writer mine uses (no scan)."""
    from saevctl.mine import vectors, writer
    from saevctl.mine.schema import N_HIST

    rng = np.random.default_rng(0)
    fpath = root / "big.duckdb"
    sae_id = "synthetic-00000000"
    with writer.staged_index(fpath) as idx:
        model = {
            "spec": "synthetic",
            "weights_sha256": "0" * 64,
            "layout": {"n_cls": 1, "n_reg": 0, "grid_h": 16, "grid_w": 16},
            "preprocess": {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "squash"},
        }
        images = [{"id": i, "row": i, "path": f"skimage:astronaut#{i % 300},{i % 200},200,{i % 2}", "label": None,
                   "width": 200, "height": 200} for i in range(n_images)]
        writer.put_store(idx, "bigstore", {"path": "/synthetic", "fingerprint": "x", "model_spec": "synthetic",
                                           "model_sha256": "0" * 64, "model": model, "n_images": n_images,
                                           "grid_h": 16, "grid_w": 16}, images)
        writer.put_sae_row(
            idx,
            {
                "sae_id": sae_id,
                "name": "synthetic",
                "ckpt_path": "/none",
                "weights_sha256": "1" * 64,
                "store_id": "bigstore",
                "model_spec": "synthetic",
                "model_sha256": "0" * 64,
                "layer": 6,
                "d": d,
                "n_latents": s,
                "activation": "relu",
                "tokens": json.dumps(["patches"]),
                "top_k": k,
                "top_n": top_n,
                "rank_by": "max",
                "n_images": n_images,
                "n_patches": p,
                "grid_h": 16,
                "grid_w": 16,
                "seconds": 0.0,
                "config": "{}",
            },
        )
        f = np.arange(s, dtype=np.int32)
        feats = {
            "feature": f,
            "freq": rng.random(s) * 1e-2,
            "img_freq": rng.random(s),
            "mean": rng.random(s),
            "mean_all": rng.random(s),
            "max": rng.random(s) * 10,
            "img_mean": rng.random(s),
            "n_fired": rng.integers(0, 10**6, s),
        }
        hf = np.repeat(f, 10)
        hist = {"feature": hf, "bin": np.tile(np.arange(10, 20, dtype=np.int16), s), "lo": np.zeros(s * 10),
                "hi": np.ones(s * 10), "count": rng.integers(1, 1000, s * 10)}
        acts = (rng.random((s * k // 100 + 1, p)) * (rng.random((s * k // 100 + 1, p)) < 0.05)).astype("<f2")
        blobs = np.array([acts[i % len(acts)].tobytes() for i in range(s * k)], dtype=object)
        ex = {
            "feature": np.repeat(f, k),
            "rank": np.tile(np.arange(k, dtype=np.int16), s),
            "image_id": rng.integers(0, n_images, s * k).astype(np.int32),
            "value": np.sort(rng.random((s, k)).astype(np.float32), 1)[:, ::-1].reshape(-1),
            "n_fired": np.full(s * k, 12, np.int16),
            "acts": blobs,
        }
        imf = {"image_id": np.repeat(np.arange(n_images, dtype=np.int32), top_n),
               "rank": np.tile(np.arange(top_n, dtype=np.int16), n_images),
               "feature": rng.integers(0, s, n_images * top_n).astype(np.int32),
               "value": rng.random(n_images * top_n).astype(np.float32)}
        writer.put_token_results(idx, sae_id, "patches", {"features": feats, "histograms": hist, "image_features": imf})
        writer.put_exemplars(idx, sae_id, "patches", ex)
        vectors.save_decoder(fpath, sae_id, rng.normal(size=(s, d)).astype(np.float32), "1" * 64)
        vectors.build(fpath, sae_id, "1" * 64)
    assert N_HIST >= 20
    return fpath, sae_id


def latency(root: Path, n_images: int, s: int, repeats: int, rep: Report) -> None:
    """`features top` (open, resolve, query; then the 25-tile PNG) and `features similar` (open, faiss load,
    search) on a synthetic index, after Python start-up. Latencies against targets, so no ceiling."""
    from saevctl.mine import figures, query

    t0 = time.perf_counter()
    fpath, _ = synthetic_index(root, n_images, s)
    rep.note("latency_index", {"images": n_images, "features": s, "build_s": time.perf_counter() - t0,
                               "mib": fpath.stat().st_size / 2**20})
    rng = np.random.default_rng(1)
    top_q: list[float] = []
    top_png: list[float] = []
    sim: list[float] = []
    loads: list[float] = []
    for f in rng.integers(0, s, repeats).tolist():
        t0 = time.perf_counter()
        with Index.open(fpath) as idx:
            sae_id = idx.resolve_sae(None)
            idx.top_exemplars(sae_id, f)
            t1 = time.perf_counter()
            figures.feature_grid(idx, sae_id, f, root / "grid.png")
        t2 = time.perf_counter()
        top_q.append(1000 * (t1 - t0))
        top_png.append(1000 * (t2 - t0))
        t0 = time.perf_counter()
        with Index.open(fpath) as idx:
            query.similar(idx, idx.resolve_sae(None), f, 10)
        sim.append(1000 * (time.perf_counter() - t0))
        loads.append(load_1m())
    section(f"latency: index of {n_images:,} images, {s:,} features, {repeats} queries (target 200 ms)")
    rep.figure("top_ms", "features top: open + query", top_q, "ms", loads)
    rep.figure("top_png_ms", "features top with the 25-tile PNG", top_png, "ms", loads)
    rep.figure("similar_ms", "features similar: open + faiss load + search", sim, "ms", loads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="64 images, 3 repeats, a 20k-image latency index, no peak-memory runs (about a minute)")
    ap.add_argument("--images", type=int, default=None, help="images in the throughput store (default 2048, quick 64)")
    ap.add_argument("--widths", default="6144,24576", help="SAE widths (latents), comma-separated")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (mining and its GEMM ceiling on that device)")
    ap.add_argument("--ab-scan-threads", action="store_true",
                    help="also mine with the scan on every torch thread, interleaved (to choose ONE_THREAD_SCAN)")
    ap.add_argument("--topk", type=int, default=0, metavar="K",
                    help="mine TopK SAEs with K active latents per token instead of ReLU ones (default: ReLU)")
    ap.add_argument("--compute", choices=("float32", "bfloat16"), default="float32",
                    help="mine --compute: the encoder's precision, and the ceiling GEMM's dtype")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (64 if args.quick else 2048)
    repeats = args.repeats or 3
    widths = [int(x) for x in args.widths.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = Report("mine", args.quick, images=n, patches=P, d=D, widths=widths, repeats=repeats, device=args.device,
                 activation=f"topk{args.topk}" if args.topk else "relu", compute=args.compute)
    with tempfile.TemporaryDirectory(prefix="saevctl-bench-mine-") as tmp:
        root = Path(tmp)
        throughput(root, n, widths, repeats, rep=rep, device=args.device, ab_threads=args.ab_scan_threads,
                   k=args.topk, compute=args.compute)
        if not args.quick and args.device == "cpu":
            mem = peak_memory(root, 256)
            rep.note("peak_memory_24576", mem)
            print(f"peak RSS at 24,576 features: mine {mem['mine_peak_mib']:,.0f} MiB, encode only "
                  f"{mem['encode_only_peak_mib']:,.0f} MiB (exemplar state {mem['topk_state_mib']:.0f} MiB; "
                  f"load {load_1m():.1f})")
        latency(root, 20_000 if args.quick else 100_000, 6144 if args.quick else 24576, 5 if args.quick else 15, rep)
    rep.headline("mine activations/s", f"mine_{widths[0]}", f"ceiling_{widths[0]}", f"ratio_{widths[0]}")
    rep.write(args.json)


if __name__ == "__main__":
    main()
