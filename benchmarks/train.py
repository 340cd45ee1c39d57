"""Training throughput next to the bare matmul ceiling at the same shapes, measured in the same process.

Usage: python benchmarks/train.py [--quick] [--json OUT] [--d 768] [--width 16] [--batch 4096]
Ceiling: plain torch.mm forward+backward of (b, d) @ (d, s) then (b, s) @ (s, d) with autograd: the 5 GEMMs a
dense SAE step needs (2 forward, 3 backward), nothing else. The ReLU step is the whole `fast` training step
(encode, decode, losses, gradients, decoder constraint, Adam). TopK (sparse decoder) is compared with the dense
ReLU step at the same width. bf16 repeats both with bfloat16 matmuls (AMX on this CPU class). The loader is
timed alone on a float16 store of the same d.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saevctl.store import open_store
from saevctl.train import synthetic as syn
from saevctl.train.config import RunSpec
from saevctl.train.group import SAEGroup
from saevctl.train.loader import ActivationLoader, Prefetcher


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict[str, object], reps: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, after a warm-up call; calls are interleaved round-robin so
    that load from other processes on a shared machine hits every measurement alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    _sync(device)
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def ceiling(b: int, d: int, s: int, dtype: torch.dtype, device: str):
    x = torch.randn(b, d, device=device, dtype=dtype)
    w1 = torch.randn(d, s, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(s, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(b, d, device=device, dtype=dtype)

    def step() -> None:
        w1.grad = w2.grad = None
        (x.mm(w1).mm(w2)).backward(g)

    return step


def sae_step(act: str, b: int, d: int, s: int, k: int, bf16: bool, device: str):
    group = SAEGroup([RunSpec("bench", act, s, 1e-4, 5e-4, k, ())], d, 0, 1 / 32, device)
    x = torch.randn(b, d, device=device)
    state = {"t": 0}

    def step() -> None:
        out = group.compute(x, 1.0, 10**12, "fast", bf16)
        group.apply(out, state["t"], 1.0)
        state["t"] += 1

    return step


def loader_rate(d: int, n_rows: int, batch: int) -> float:
    """Rows/s of the background-prefetched loader alone over a float16 store on local disk."""
    with tempfile.TemporaryDirectory() as tmp:
        x = np.random.default_rng(0).standard_normal((n_rows, d)).astype(np.float32)
        store = syn.write_store(Path(tmp) / "store", x, n_patches=256, dtype="float16", images_per_shard=256)
        arrays = {"patches": open_store(store).layer(0).patches}
        pf = Prefetcher(ActivationLoader(arrays, batch, seed=0).batches())
        next(pf)
        n = max(4, 2 * n_rows // batch)
        t0 = time.perf_counter()
        for _ in range(n):
            next(pf)
        dt = time.perf_counter() - t0
        pf.close()
    return n * batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1024 and 2 repeats (about a minute on 2 cores)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--width", type=int, default=16, help="latents as a multiple of d")
    ap.add_argument("--batch", type=int, default=None, help="default 4096 (quick: 1024)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    b = args.batch or (1024 if args.quick else 4096)
    reps = args.reps or (2 if args.quick else 3)
    d, s, dev = args.d, args.d * args.width, args.device
    flop = 5 * 2 * b * d * s
    gpu = dev.startswith("cuda")
    res: dict[str, float] = {}
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if gpu and prec == "fp32":
            continue
        fns = {f"ceil_{prec}_s": ceiling(b, d, s, dtype, dev),
               f"relu_{prec}_s": sae_step("relu", b, d, s, 0, prec == "bf16", dev),
               f"topk_{prec}_s": sae_step("topk", b, d, s, args.k, prec == "bf16", dev)}
        res |= timed(fns, reps, dev)
        del fns
    res["loader_rows_per_s"] = loader_rate(d, 65536 if args.quick else 262144, b)
    main_key = "bf16" if gpu else "fp32"
    value, ceil = flop / res[f"relu_{main_key}_s"] / 1e9, flop / res[f"ceil_{main_key}_s"] / 1e9
    report = {
        "metric": f"relu_sae_train_step_gemm_gflops_{main_key}",
        "value": round(value, 2),
        "ceiling": round(ceil, 2),
        "ratio": round(value / ceil, 3),
        "shape": {"batch": b, "d": d, "latents": s, "k": args.k},
        "device": (torch.cuda.get_device_name() if gpu
                   else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"),
        **{k: round(v, 4) for k, v in res.items()},
    }
    for prec in ("fp32", "bf16"):
        if f"relu_{prec}_s" in res:
            report[f"relu_{prec}_acts_per_s"] = round(b / res[f"relu_{prec}_s"])
            report[f"relu_{prec}_ratio"] = round(res[f"ceil_{prec}_s"] / res[f"relu_{prec}_s"], 3)
            report[f"ceil_{prec}_gflops"] = round(flop / res[f"ceil_{prec}_s"] / 1e9, 1)
            report[f"topk_{prec}_speedup_vs_relu"] = round(res[f"relu_{prec}_s"] / res[f"topk_{prec}_s"], 2)
    report["loader_vs_relu_step"] = round(res["loader_rows_per_s"] / report[f"relu_{main_key}_acts_per_s"], 1)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
