"""`features label` throughput next to the bare encoder GEMM of the same activations at SAE widths 6,144 and
24,576, and its peak memory.

Usage: python benchmarks/label.py [--quick] [--widths 6144,24576] [--json OUT]
Ceiling: `x @ W_enc` (torch.mm into a reused output, float32) over the chunk shapes labelling encodes, once:
labelling cannot beat encoding every patch once (when the histograms need several passes over the store, each
pass encodes again, and that shows in the ratio). Labelling (histograms, AUROC/F1 and the index write included)
and the GEMM are timed interleaved over several repeats; figures are min / median / max with the load average.
The store is synthetic (benchmarks/mine.py's), with ADE20K-like labels: 150 classes in rectangular regions of each
image's 16x16 patch grid; the SAE is a random TopK SAE with k = 32 (what the demo trains).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saevctl import atomic, layout
from saevctl.mine import Config as MineConfig
from saevctl.mine import run as mine
from saevctl.mine.label import Config, run
from saevctl.sae import SAE

import mine as mine_bench  # benchmarks/mine.py: synthetic store, chunk shapes
from _bare import encoder_gemm
from _timing import Report, interleave, load_1m, section

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


def label_fn(ckpt: Path, store: Path, index: Path, passes: list[int]) -> Callable[[], float]:
    def go() -> float:
        t0 = time.perf_counter()
        res = run(Config(sae=ckpt, store=store, index=index, level="patch", device="cpu"))
        passes.append(res.n_passes)
        return time.perf_counter() - t0

    return go


def throughput(root: Path, n: int, widths: list[int], repeats: int, rep: Report) -> None:
    store = mine_bench.synthetic_store(root / "store", n, 256, 384)
    add_labels(store, n)
    fns: dict[str, Callable[[], float | None]] = {}
    passes: dict[int, list[int]] = {}
    for s in widths:
        ckpt = topk_sae(store, s, root / f"sae{s}")
        index = root / f"ix{s}.duckdb"
        mine(MineConfig(sae=ckpt, store=store, index=index, device="cpu", set_defaults=False))
        fns[f"gemm_{s}"] = encoder_gemm(mine_bench.chunk_rows(store, s), 384, s)
        fns[f"label_{s}"] = label_fn(ckpt, store, index, passes.setdefault(s, []))
    for s in widths:  # warm-up: the GEMMs' allocator and threads (mining above warmed the page cache and imports)
        fns[f"gemm_{s}"]()
    times = interleave(fns, repeats, warmup=0)
    n_acts = n * 256
    section(f"label: {n:,} images x 256 patches, {N_CLASSES} classes, TopK k=32, patch level, {repeats} repeats")
    for s in widths:
        rep.rate(f"label_{s}", f"label, width {s:,} ({passes[s][-1]} pass(es)) (activations/s)",
                 times[f"label_{s}"], n_acts, "act/s", ",.0f", n_passes=passes[s][-1])
        rep.rate(f"ceiling_{s}", f"ceiling: x @ W_enc once, width {s:,} (activations/s)", times[f"gemm_{s}"],
                 n_acts, "act/s", ",.0f")
        rep.series_ratio(f"ratio_{s}", f"ratio, width {s:,}", times[f"label_{s}"], times[f"gemm_{s}"])


def peak_memory(root: Path, s: int) -> dict[str, float]:
    """Max RSS of a fresh process labelling the benchmark's store (histograms: features x 151 x 256 int32)."""
    code = ("import re; from pathlib import Path; from saevctl.mine.label import Config, run; "
            f"run(Config(sae=Path({str(root / f'sae{s}')!r}), store=Path({str(root / 'store')!r}), "
            f"index=Path({str(root / f'ix{s}.duckdb')!r}), level='patch', device='cpu')); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"label_peak_mib": int(res.stdout.strip().splitlines()[-1]) / 1024,
            "histograms_mib": s * (N_CLASSES + 2) * 256 * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 images, 3 repeats, no peak-memory run (about a minute)")
    ap.add_argument("--images", type=int, default=None, help="default 512, quick 64")
    ap.add_argument("--widths", default="6144,24576", help="SAE widths (latents), comma-separated")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (64 if args.quick else 512)
    repeats = args.repeats or (3 if args.quick else 5)
    widths = [int(x) for x in args.widths.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = Report("label", args.quick, images=n, widths=widths, classes=N_CLASSES, k=32, bins=256, repeats=repeats)
    with tempfile.TemporaryDirectory(prefix="saevctl-bench-label-") as tmp:
        root = Path(tmp)
        throughput(root, n, widths, repeats, rep)
        if not args.quick:
            mem = peak_memory(root, widths[0])
            rep.note(f"peak_memory_{widths[0]}", mem)
            print(f"peak RSS at width {widths[0]:,}: {mem['label_peak_mib']:,.0f} MiB (histograms "
                  f"{mem['histograms_mib']:,.0f} MiB; load {load_1m():.1f})")
    rep.headline("label activations/s", f"label_{widths[0]}", f"ceiling_{widths[0]}", f"ratio_{widths[0]}")
    rep.write(args.json)


if __name__ == "__main__":
    main()
