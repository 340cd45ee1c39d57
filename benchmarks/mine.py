"""Mining throughput next to the bare SAE encode of the same activations, peak memory at 24,576 features,
and the latency of `features top` / `features similar` on an index of 100k images.

Usage: python benchmarks/mine.py [--quick] [--json OUT]
The ceiling is `sae.encode` over the same store chunks (read from the same memory maps) in the same
process; the ratio is mining activations/s (scan, index write and faiss build included) over it.
Activations are synthetic (a store written directly), the SAE is random with its biases set so that
about 1.5% of codes fire, as in a trained SAE; timings do not depend on what the values mean.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saevctl.mine import Config, Index, run
from saevctl.mine.pipeline import CHUNK_CODES, _chunks
from saevctl.sae import SAE, SAEConfig
from saevctl.store import StoreWriter, open_store


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


def sparse_sae(store_dpath: Path, n_latents: int, out: Path, density: float = 0.015) -> Path:
    store = open_store(store_dpath)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=store.d, n_latents=n_latents, model=store.model, layer=6, tokens=("patches",)))
    sample = store.layer(6).patches.torch(slice(0, min(32, store.n_images))).float().reshape(-1, store.d)
    sae.set_normalization(sample)
    with torch.no_grad():
        pre = sae.pre_acts(sae.normalize(sample))
        sae.b_enc -= torch.quantile(pre[:4096], 1 - density, dim=0)
    sae.save(out)
    return out


def bare_encode(sae: SAE, store_dpath: Path, fused: bool = False) -> float:
    """Seconds for sae.encode (or mining's fused encoder) over the store in mining's chunks."""
    from saevctl.mine.encode import make_encoder

    store = open_store(store_dpath)
    arrays = {"patches": store.layer(6).patches}
    per = max(1, min(1024, CHUNK_CODES // (sae.cfg.n_latents * store.layout.n_patches)))
    encode = make_encoder(sae) if fused else sae.encode
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, rows in _chunks(arrays, per):
            encode(rows["patches"].reshape(-1, store.d))
    return time.perf_counter() - t0


def throughput(root: Path, n: int, repeats: int) -> dict:
    store = synthetic_store(root / "store", n, 256, 384)
    ckpt = sparse_sae(store, 6144, root / "sae6k")
    sae = SAE.load(ckpt)
    n_acts = n * 256
    bare_encode(sae, store)  # warm-up: page cache and allocator
    bare, fused, full = [], [], []
    for r in range(repeats):  # interleaved, so that load from other processes hits all three alike
        bare.append(bare_encode(sae, store))
        fused.append(bare_encode(sae, store, fused=True))
        t0 = time.perf_counter()
        run(Config(sae=ckpt, store=store, index=root / f"ix{r}.duckdb", device="cpu", set_defaults=False))
        full.append(time.perf_counter() - t0)
    b, fu, f = statistics.median(bare), statistics.median(fused), statistics.median(full)
    return {"n_images": n, "n_acts": n_acts, "bare_s": b, "fused_encode_s": fu, "mine_s": f, "ceiling": n_acts / b,
            "value": n_acts / f, "ratio_vs_fused_encode": fu / f}


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
        "encode_only": f"b.bare_encode(SAE.load({str(ckpt)!r}), Path({str(store)!r}))",
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


def latency(root: Path, n_images: int, s: int, repeats: int) -> dict:
    from saevctl.mine import figures, query

    t0 = time.perf_counter()
    fpath, _ = synthetic_index(root, n_images, s)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    top_q, top_png, sim = [], [], []
    for f in rng.integers(0, s, repeats).tolist():
        t0 = time.perf_counter()  # what `features top` does after start-up: open, resolve, query
        with Index.open(fpath) as idx:
            sae_id = idx.resolve_sae(None)
            idx.top_exemplars(sae_id, f)
            t1 = time.perf_counter()
            figures.feature_grid(idx, sae_id, f, root / "grid.png")
        t2 = time.perf_counter()
        top_q.append(t1 - t0)
        top_png.append(t2 - t0)
        t0 = time.perf_counter()  # `features similar`: open, resolve, load faiss from disk, search
        with Index.open(fpath) as idx:
            query.similar(idx, idx.resolve_sae(None), f, 10)
        sim.append(time.perf_counter() - t0)
    def ms(xs: list[float]) -> float:
        return 1000 * statistics.median(xs)

    return {"latency_images": n_images, "latency_features": s, "index_build_s": build_s,
            "index_mib": fpath.stat().st_size / 2**20, "top_query_ms": ms(top_q), "top_with_png_ms": ms(top_png),
            "similar_ms": ms(sim)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats (a few minutes on 2 cores)")
    ap.add_argument("--images", type=int, default=None, help="images in the throughput store (default 1024, quick 512)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (512 if args.quick else 1024)
    repeats = 1 if args.quick else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="saevctl-bench-mine-") as tmp:
        root = Path(tmp)
        tp = throughput(root, n, repeats)
        print(f"mine:        {tp['value']:,.0f} activations/s  ({tp['n_acts']:,} patch activations, 6,144 features, "
              f"{tp['mine_s']:.2f} s)")
        print(f"bare encode: {tp['ceiling']:,.0f} activations/s  ({tp['bare_s']:.2f} s)")
        print(f"ratio:       {tp['value'] / tp['ceiling']:.2f}  (target >= 0.8; vs mining's own fused encode "
              f"{tp['ratio_vs_fused_encode']:.2f}, {tp['fused_encode_s']:.2f} s)")
        mem = peak_memory(root, 64 if args.quick else 256)
        print(f"peak RSS at 24,576 features: mine {mem['mine_peak_mib']:,.0f} MiB, "
              f"encode only {mem['encode_only_peak_mib']:,.0f} MiB (exemplar state {mem['topk_state_mib']:.0f} MiB)")
        lat = latency(root, 100_000, 24576, 5 if args.quick else 15)
        print(f"index of {lat['latency_images']:,} images, {lat['latency_features']:,} features "
              f"({lat['index_mib']:.0f} MiB): features top {lat['top_query_ms']:.1f} ms "
              f"(with PNG {lat['top_with_png_ms']:.0f} ms), "
              f"features similar {lat['similar_ms']:.1f} ms (median, excluding Python start-up)")
    result = {"metric": "mine activations/s", "value": tp["value"], "ceiling": tp["ceiling"],
              "ratio": tp["value"] / tp["ceiling"], **{k: v for k, v in tp.items() if k not in ("value", "ceiling")},
              **mem, **lat, "quick": args.quick, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
