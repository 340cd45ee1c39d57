"""The cost of `mine --max-per-source` in the scan: `FeatureScanner.update` over mining's chunks (10 images x 256
patches x 6,144 features, 1.5% of codes firing) without a cap and with one, interleaved, in CPU seconds on one
torch thread as mining runs it (CPU time, not wall time: the test machine's 2 cores are shared).

Usage: python benchmarks/mine_scan.py [--chunks 64] [--repeats 5] [--cap 3] [--sources 11]
A comparison of two paths of our own code, not a ceiling (benchmarks/mine.py has mining against the GEMM).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saevctl.mine.scan import FeatureScanner

S, B, P, K = 6144, 10, 256, 25


def scan(chunks: list[torch.Tensor], n_chunks: int, cap: int | None, n_sources: int) -> float:
    sc = FeatureScanner(S, K, P, "max", 32, keep_patches=True, max_per_source=cap)
    t0 = time.process_time()
    for i in range(n_chunks):
        ids = torch.arange(i * B, (i + 1) * B)
        sc.update(chunks[i % len(chunks)], ids, ids % n_sources if cap is not None else None)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cap", type=int, default=3, help="--max-per-source of the capped scan")
    ap.add_argument("--sources", type=int, default=11, help="source photos, images dealt round-robin")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    chunks = []
    for _ in range(8):
        x = torch.rand((B, P, S), generator=g)
        chunks.append(torch.where(x < 0.015, x * 10, torch.zeros(())))
    times: dict[str, list[float]] = {"uncapped": [], f"cap {args.cap}, {args.sources} sources": []}
    for _ in range(args.repeats):
        times["uncapped"].append(scan(chunks, args.chunks, None, 1))
        times[f"cap {args.cap}, {args.sources} sources"].append(scan(chunks, args.chunks, args.cap, args.sources))
    print(f"FeatureScanner.update, {args.chunks} chunks of {B} x {P} x {S:,}, k = {K}: CPU s (min / median / max)")
    for name, ts in times.items():
        print(f"  {name:28s} {min(ts):.3f} / {statistics.median(ts):.3f} / {max(ts):.3f}")


if __name__ == "__main__":
    main()
