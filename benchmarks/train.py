"""Training-step throughput next to the bare GEMM ceilings of the same shapes and dtype, at SAE widths 6,144 and
24,576 (d = 768), in float32 and in bfloat16 autocast; and the loader next to a bare read of the same rows.

Usage: python benchmarks/train.py [--quick] [--widths 6144,24576] [--batch 4096] [--json OUT]
Ceilings (no saevctl code; float32 weights, bf16 through torch.autocast as the step runs it):
- ReLU: the 5 GEMMs of a dense SAE step, (b, d) @ (d, s) @ (s, d) forward and backward through autograd.
- TopK and BatchTopK (k per token on average): the encoder GEMM `x @ W_enc` plus the sparse decoder's minimum
  work (b*k*d multiply-adds to decode and b*k*d for each of its gradients, dL/dW_dec and dL/dcodes) counted at
  that GEMM's measured rate.
- Loader: casting the same number of float16 rows from the store's memory maps, in order, into a reused float32
  batch.
Paths: one whole `fast` step of one SAE (encode, decode, losses, gradients, decoder constraint, Adam); no AuxK;
steps and ceilings alike run inside `saevctl.train.heap.kept()`, as `saevctl train` runs its steps.
Equal work: the ReLU step counts firing (L0, dead, dense) on every row here, as the TopK step and the reference
step do (the shipped step samples 512 rows; that figure is printed beside it, not as the ratio).
Everything of one width and precision is timed interleaved over several repeats; figures are min / median / max
with the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saevctl.store import open_store
from saevctl.train import heap
from saevctl.train import synthetic as syn
from saevctl.train.config import RunSpec
from saevctl.train.group import SAEGroup
from saevctl.train.loader import ActivationLoader, Prefetcher

from _bare import encoder_step_gemm, step_gemms, sync, topk_min_work_factor
from _timing import Report, Series, interleave, section


def sae_step(act: str, b: int, d: int, s: int, k: int, bf16: bool, device: str,
             count_all: bool = True) -> Callable[[], None]:
    """One training step of one SAE; `count_all` counts ReLU firing on every row (equal work, see the docstring)."""
    group = SAEGroup([RunSpec("bench", act, s, 1e-4, 5e-4, k, ())], d, 0, 1 / 32, device)
    if count_all:
        group.hp = dataclasses.replace(group.hp, count_rows=b)
    x = torch.randn(b, d, device=device)
    state = {"t": 0}

    def step() -> None:
        out = group.compute(x, 1.0, 10**12, "fast", bf16)
        group.apply(out, state["t"], 1.0)
        state["t"] += 1

    return step


def steps(args: argparse.Namespace, b: int, s: int, prec: str, rep: Report) -> dict[str, Series]:
    """Time the ReLU, TopK and BatchTopK steps of one width and precision with their ceilings, interleaved."""
    d, dev, bf16 = args.d, args.device, prec == "bf16"
    fns: dict[str, Callable[[], None]] = {
        "relu_ceiling": step_gemms(b, d, s, bf16, dev),
        "relu": sae_step("relu", b, d, s, 0, bf16, dev),
        "topk_gemm": encoder_step_gemm(b, d, s, bf16, dev),
        "topk": sae_step("topk", b, d, s, args.k, bf16, dev),
        "batchtopk": sae_step("batchtopk", b, d, s, args.k, bf16, dev),
    }
    if not args.quick:
        fns["relu_shipped"] = sae_step("relu", b, d, s, 0, bf16, dev, count_all=False)
    times = interleave(fns, args.reps, warmup=1, sync=sync(dev))
    flop = 10 * b * d * s  # the 5 GEMMs
    key = f"{prec}_{s}"
    section(f"train {prec}, width {s:,}: batch {b:,}, d {d}, k {args.k}, {args.reps} repeats")
    gf = {n: [flop / t / 1e9 for t in times[n].seconds] for n in ("relu", "relu_ceiling")}
    rep.rate(f"relu_{key}", "ReLU + L1 step (activations/s)", times["relu"], b, "act/s", ",.0f", gflops=gf["relu"])
    rep.rate(f"relu_ceiling_{key}", "ceiling: the 5 GEMMs (activations/s)", times["relu_ceiling"], b, "act/s",
             ",.0f", gflops=gf["relu_ceiling"])
    rep.series_ratio(f"relu_ratio_{key}", "ratio ReLU / 5 GEMMs", times["relu"], times["relu_ceiling"], b, b)
    if "relu_shipped" in times:
        rep.rate(f"relu_shipped_{key}", "ReLU step as shipped (firing counted on 512 rows)", times["relu_shipped"],
                 b, "act/s", ",.0f")
    factor = topk_min_work_factor(s, args.k)
    ceil = Series("topk_ceiling", [t * factor for t in times["topk_gemm"].seconds], times["topk_gemm"].loads)
    rep.rate(f"topk_{key}", f"TopK k={args.k} step (activations/s)", times["topk"], b, "act/s", ",.0f")
    rep.rate(f"topk_ceiling_{key}", "ceiling: x @ W_enc + sparse decode minimum", ceil, b, "act/s", ",.0f",
             min_work_factor=factor)
    rep.series_ratio(f"topk_ratio_{key}", "ratio TopK / its ceiling", times["topk"], ceil, b, b)
    # BatchTopK selects b * k entries of the whole batch: the same minimum work, the same ceiling
    rep.rate(f"batchtopk_{key}", f"BatchTopK k={args.k} step (activations/s)", times["batchtopk"], b, "act/s", ",.0f")
    rep.series_ratio(f"batchtopk_ratio_{key}", "ratio BatchTopK / its ceiling", times["batchtopk"], ceil, b, b)
    return times


def loader_fns(d: int, n_rows: int, batch: int) -> tuple[dict[str, Callable[[], float]], Callable[[], None], int]:
    """The background-prefetched loader and the bare read over one float16 store; returns (fns, clean-up, rows)."""
    tmp = tempfile.TemporaryDirectory()
    x = np.random.default_rng(0).standard_normal((n_rows, d)).astype(np.float32)
    store = syn.write_store(Path(tmp.name) / "store", x, n_patches=256, dtype="float16", images_per_shard=256)
    arrays = {"patches": open_store(store).layer(0).patches}
    n_batches = max(4, 2 * n_rows // batch)

    def loader() -> float:
        pf = Prefetcher(ActivationLoader(arrays, batch, seed=0).batches())
        next(pf)  # thread start and the first buffer fill are not part of the rate
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(pf)
        dt = time.perf_counter() - t0
        pf.close()
        return dt

    parts = arrays["patches"].parts
    per = max(1, batch // 256)  # images per batch
    out = torch.empty(per * 256, d)

    def bare() -> float:
        """Cast straight from the memory maps into one reused float32 batch, on one thread: a fresh 50 MB tensor
        per batch costs more in page faults than the cast, and on shared cores a two-thread copy stalls at its
        OpenMP barrier (measured 0.13 to 7.5 M rows/s for the same copy; one thread: 9 to 12 M)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        left = n_batches * batch
        try:
            with warnings.catch_warnings():  # the maps are read-only; nothing writes through the tensor
                warnings.simplefilter("ignore", UserWarning)
                while left > 0:
                    for part in parts:
                        for lo in range(0, len(part), per):
                            if left <= 0:
                                break
                            rows = torch.from_numpy(part[lo : lo + per]).reshape(-1, d)
                            out[: len(rows)].copy_(rows)
                            left -= len(rows)
        finally:
            torch.set_num_threads(threads)
        return time.perf_counter() - t0

    return {"loader": loader, "bare": bare}, tmp.cleanup, n_batches * batch


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1024, 3 repeats (about a minute on 2 cores)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--widths", default="6144,24576", help="SAE widths (latents), comma-separated")
    ap.add_argument("--batch", type=int, default=None, help="default 4096 (quick: 1024)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=None, help="interleaved repeats (default 5, quick 3)")
    ap.add_argument("--precisions", default=None, help="fp32,bf16 (default; CUDA: bf16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def main() -> None:
    args = parse()
    b = args.batch or (1024 if args.quick else 4096)
    args.reps = args.reps or (3 if args.quick else 5)
    widths = [int(x) for x in args.widths.split(",")]
    precs = (args.precisions or ("bf16" if args.device.startswith("cuda") else "fp32,bf16")).split(",")
    rep = Report("train", args.quick, batch=b, d=args.d, widths=widths, k=args.k, precisions=precs, reps=args.reps,
                 device=args.device)
    relu_s: dict[str, float] = {}
    # as `saevctl train` runs its steps (saevctl.train.heap): big blocks stay mapped, for the ceilings too
    with heap.kept(not args.device.startswith("cuda")):
        for prec in precs:
            for s in widths:
                times = steps(args, b, s, prec, rep)
                relu_s[f"{prec}_{s}"] = float(np.median(times["relu"].seconds))
    fns, cleanup, rows = loader_fns(args.d, 65536 if args.quick else 262144, b)
    try:
        times = interleave(fns, args.reps, warmup=1)
    finally:
        cleanup()
    section(f"loader: float16 store, d {args.d}, batch {b:,}, {rows:,} rows per repeat")
    rep.rate("loader", "loader, background prefetch (rows/s)", times["loader"], rows, "rows/s", ",.0f")
    rep.rate("loader_ceiling", "ceiling: read in order + cast to float32", times["bare"], rows, "rows/s", ",.0f")
    rep.series_ratio("loader_ratio", "ratio loader / bare read", times["loader"], times["bare"], rows, rows)
    slowest = max(relu_s.values())
    rep.note("loader_vs_slowest_relu_step", rep.data["figures"]["loader"]["median"] * slowest / b)
    main_key = f"{precs[0]}_{widths[0]}"
    rep.headline(f"relu step activations/s ({main_key})", f"relu_{main_key}", f"relu_ceiling_{main_key}",
                 f"relu_ratio_{main_key}")
    rep.write(args.json)


if __name__ == "__main__":
    main()
