"""`features label` throughput next to the bare SAE encode of the same activations, and its peak memory.

Usage: python benchmarks/label.py [--quick] [--json OUT]
The ceiling is mining's fused encoder over the same store chunks (read from the same memory maps) in the same
process: labelling cannot be faster than encoding every patch once. The ratio is labelling activations/s
(histograms, AUROC/F1 and the index write included) over it. The store is synthetic (benchmarks/mine.py's), with
ADE20K-like labels: 150 classes in rectangular regions of each image's 16x16 patch grid; the SAE is a random
TopK SAE with k = 32 (what the demo trains). Timings do not depend on what the values mean.
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

sys.path.insert(0, str(Path(__file__).parent))
from saevctl import atomic, layout
from saevctl.mine import Config as MineConfig
from saevctl.mine import run as mine
from saevctl.mine.label import Config, run
from saevctl.sae import SAE

import mine as mine_bench  # benchmarks/mine.py: synthetic store, sparse SAE, bare encode

N_CLASSES = 150


def add_labels(store_dpath: Path, n: int, seed: int = 0) -> None:
    """ADE-like per-patch labels: each image split into a few rectangles of random classes (0 = unlabelled)."""
    rng = np.random.default_rng(seed)
    lab = np.empty((n, 16, 16), dtype=np.int16)
    for i in range(n):
        r, c = rng.integers(3, 13, 2)
        ids = rng.integers(0, N_CLASSES + 1, 4)
        lab[i, :r, :c], lab[i, :r, c:], lab[i, r:, :c], lab[i, r:, c:] = ids
    lab[lab == 0] = -1
    layout.store_labels_dpath(store_dpath).mkdir(exist_ok=True)
    np.save(layout.store_patch_labels_fpath(store_dpath), lab.reshape(n, 256), allow_pickle=False)
    atomic.write_json(layout.store_classes_fpath(store_dpath), {
        "schema": layout.LABELS_SCHEMA, "classes": ["other"] + [f"class{k}" for k in range(1, N_CLASSES + 1)],
        "source": "synthetic", "n_labelled_rows": n, "n_unreadable_masks": 0})


def topk_sae(store_dpath: Path, n_latents: int, out: Path, k: int = 32) -> Path:
    """A random TopK SAE (k = 32, as the demo trains) fitted to the store's normalisation."""
    from saevctl.sae import SAEConfig
    from saevctl.store import open_store

    store = open_store(store_dpath)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=store.d, n_latents=n_latents, model=store.model, layer=6, tokens=("patches",),
                        activation="topk", k=k))
    sae.set_normalization(store.layer(6).patches.torch(slice(0, min(32, store.n_images))).float().reshape(-1, store.d))
    sae.save(out)
    return out


def throughput(root: Path, n: int, s: int, repeats: int) -> dict:
    store = mine_bench.synthetic_store(root / "store", n, 256, 384)
    add_labels(store, n)
    ckpt = topk_sae(store, s, root / "sae")
    index = root / "ix.duckdb"
    mine(MineConfig(sae=ckpt, store=store, index=index, device="cpu", set_defaults=False))
    sae = SAE.load(ckpt)
    n_acts = n * 256
    mine_bench.bare_encode(sae, store, fused=True)  # warm-up: page cache and allocator
    bare, full, passes = [], [], 0
    for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
        bare.append(mine_bench.bare_encode(sae, store, fused=True))
        t0 = time.perf_counter()
        res = run(Config(sae=ckpt, store=store, index=index, level="patch", device="cpu"))
        full.append(time.perf_counter() - t0)
        passes = res.n_passes
    b, f = statistics.median(bare), statistics.median(full)
    return {"n_images": n, "n_features": s, "n_classes": N_CLASSES, "n_acts": n_acts, "bare_encode_s": b,
            "label_s": f, "n_passes": passes, "ceiling": n_acts / b, "value": n_acts / f}


def peak_memory(root: Path) -> dict:
    """Max RSS of a fresh process labelling the benchmark's store (histograms: features x 151 x 256 int32)."""
    code = ("import re; from pathlib import Path; from saevctl.mine.label import Config, run; "
            f"run(Config(sae=Path({str(root / 'sae')!r}), store=Path({str(root / 'store')!r}), "
            f"index=Path({str(root / 'ix.duckdb')!r}), level='patch', device='cpu')); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"label_peak_mib": int(res.stdout.strip().splitlines()[-1]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="fewer images, features and repeats (about a minute on 2 cores)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n, s, repeats = (128, 1536, 1) if args.quick else (512, 6144, 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="saevctl-bench-label-") as tmp:
        root = Path(tmp)
        tp = throughput(root, n, s, repeats)
        print(f"label:       {tp['value']:,.0f} activations/s  ({tp['n_acts']:,} patch activations, {s:,} features, "
              f"{N_CLASSES} classes, {tp['n_passes']} pass(es), {tp['label_s']:.2f} s)")
        print(f"bare encode: {tp['ceiling']:,.0f} activations/s  ({tp['bare_encode_s']:.2f} s, fused encoder)")
        print(f"ratio:       {tp['value'] / tp['ceiling']:.2f}")
        mem = peak_memory(root)
        hist_mib = s * (N_CLASSES + 2) * 256 * 4 / 2**20
        print(f"peak RSS: {mem['label_peak_mib']:,.0f} MiB (histograms {hist_mib:,.0f} MiB)")
    result = {"metric": "label activations/s", "value": tp["value"], "ceiling": tp["ceiling"],
              "ratio": tp["value"] / tp["ceiling"], **{k: v for k, v in tp.items() if k not in ("value", "ceiling")},
              **mem, "quick": args.quick, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
