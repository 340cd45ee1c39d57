"""Report throughput (feature pages/s, pictures included) next to the bare drawing of the same exemplar grids in
the same run, and the ratio; plus the same report as JPEG.

Usage: python benchmarks/report.py [--quick] [--json OUT] [--workers N]
The index is mined from a synthetic store (benchmarks/mine.py's) with a random SAE where about 1.5% of
codes fire, 16x16 patches, top 25 exemplars per feature; every exemplar is a crop of one demo photo.
The ceiling draws exactly the pictures the report draws (same painter, same processes, PNG), with no
SQL, no HTML and no folder swap; the ratio is what the rest of the report costs on top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from saevctl.mine import Config as MineConfig
from saevctl.mine import Index
from saevctl.mine import run as mine
from saevctl.report import Config, data, pictures, run

from mine import sparse_sae, synthetic_store  # benchmarks/mine.py


def build_index(root: Path, n_images: int, n_latents: int) -> Path:
    store = synthetic_store(root / "store", n_images, p=256, d=64)
    sae = sparse_sae(store, n_latents, root / "sae")
    index = root / "ix.duckdb"
    mine(MineConfig(sae=sae, store=store, index=index, top_k=25, device="cpu", set_defaults=False))
    return index


def bare_drawing(index: Path, out: Path, workers: int) -> tuple[int, float]:
    """Draw every live feature's grid and thumbnail as the report does, and nothing else."""
    out.mkdir(parents=True)
    with Index.open(index) as idx:
        sae_id = idx.sae_ids()[0]
        info = idx.sae_info(sae_id)
        grid = (int(info["grid_h"]), int(info["grid_w"]))
        exs = data.exemplars(idx, sae_id, "patches", 0, idx.n_features(sae_id) - 1, 25, grid)
    jobs = [pictures.Job(f, [pictures.Grid(f"feature {f}", e, out / f"grid-{f}.png", out / f"thumb-{f}.png", 5)])
            for f, e in sorted(exs.items())]
    done = []
    t0 = time.perf_counter()
    painter = pictures.Painter(workers, json.dumps(info["model"]["preprocess"]), "png", done.append)
    try:
        for batch in pictures.batched(jobs, 16):
            painter.submit(batch)
        painter.finish()
    finally:
        painter.close()
    return sum(done), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small index (about a minute on 2 cores)")
    ap.add_argument("--workers", type=int, default=None, help="drawing processes (default: one per core up to 8)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n_images, n_latents = (300, 192) if args.quick else (2000, 1024)
    workers = args.workers if args.workers is not None else max(1, min(8, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        index = build_index(root, n_images, n_latents)
        print(f"index: {n_images} images, {n_latents} features, mined in {time.perf_counter() - t0:.1f} s", flush=True)
        n_drawn, t_bare = bare_drawing(index, root / "bare", workers)
        t0 = time.perf_counter()
        res = run(Config(index=index, out=root / "site", workers=workers))
        t_png = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(Config(index=index, out=root / "site-jpeg", workers=workers, image_format="jpeg"))
        t_jpeg = time.perf_counter() - t0
        n_pages = res.saes[0]["n_pages"]
        size_png = sum(f.stat().st_size for f in (root / "site").rglob("*") if f.is_file())
        size_jpeg = sum(f.stat().st_size for f in (root / "site-jpeg").rglob("*") if f.is_file())
    assert n_drawn == n_pages, (n_drawn, n_pages)
    value, ceiling = n_pages / t_png, n_drawn / t_bare
    result = {"metric": "report feature pages/s (png)", "value": value, "ceiling": ceiling, "ratio": value / ceiling,
              "pages": n_pages, "skipped": res.saes[0]["n_skipped"], "workers": workers,
              "jpeg_pages_per_s": n_pages / t_jpeg, "mb_per_page_png": size_png / n_pages / 1e6,
              "mb_per_page_jpeg": size_jpeg / n_pages / 1e6, "n_images": n_images, "n_latents": n_latents,
              "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()}
    print(f"report: {value:.1f} pages/s (png) vs bare drawing {ceiling:.1f} pages/s: ratio {value / ceiling:.2f}; "
          f"jpeg {n_pages / t_jpeg:.1f} pages/s; {result['mb_per_page_png']:.2f} MB/page png, "
          f"{result['mb_per_page_jpeg']:.2f} MB/page jpeg; {workers} workers, load {result['load_avg_1m']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
