"""Report throughput (feature pages/s, pictures included) next to the bare PIL work its pictures need, in the same
run, and the ratio; plus the same report as JPEG (full mode).

Usage: python benchmarks/report.py [--quick] [--json OUT] [--workers N]
The index is mined from a synthetic store (benchmarks/mine.py's) with a random SAE where about 1.5% of codes
fire, 16x16 patches, top 25 exemplars per feature; every exemplar is a crop of one demo photo.
Ceiling (PIL only, no saevctl code): for every page the report drew, paste as many photo tiles as it has
exemplars into a white sheet of the same size, and write that sheet and a 64 px thumbnail in the same format
and compression, in a pool of as many processes (the photo decoded once per process). No heat overlay, captions,
SQL, HTML or folder swap. Report and ceiling are timed interleaved over several repeats; figures are
min / median / max with the load average.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image

from saevctl.mine import Config as MineConfig
from saevctl.mine import Index
from saevctl.mine import run as mine
from saevctl.report import Config, data, run

from _timing import Report, interleave, section
from mine import sparse_sae, synthetic_store  # benchmarks/mine.py

TILE_PX, CELL_W, CELL_H, HEAD_PX, COLS = 160, 166, 184, 24, 5  # the grid's geometry (saevctl/mine/figures.py)
Page = tuple[str, str, int, tuple[int, int]]  # grid file, thumbnail file, tiles, grid size


def build_index(root: Path, n_images: int, n_latents: int) -> Path:
    store = synthetic_store(root / "store", n_images, p=256, d=64)
    sae = sparse_sae(store, n_latents, root / "sae")
    index = root / "ix.duckdb"
    mine(MineConfig(sae=sae, store=store, index=index, top_k=25, device="cpu", set_defaults=False))
    return index


@lru_cache(maxsize=1)
def _photo_tiles() -> list[Image.Image]:
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut())
    return [photo.crop((x, y, x + 200, y + 200)).resize((TILE_PX, TILE_PX), Image.Resampling.BICUBIC)
            for x in range(0, 300, 60) for y in range(0, 300, 60)]


def draw_pages(pages: list[Page], fmt: str) -> int:
    """The ceiling's work for a batch of pages (runs in a pool process)."""
    tiles = _photo_tiles()
    kw: dict[str, Any] = {"quality": 88} if fmt == "JPEG" else {"compress_level": 1}
    for grid_fpath, thumb_fpath, n_tiles, size in pages:
        sheet = Image.new("RGB", size, "white")
        for i in range(n_tiles):
            sheet.paste(tiles[i % len(tiles)], ((i % COLS) * CELL_W + 3, HEAD_PX + (i // COLS) * CELL_H))
        sheet.save(grid_fpath, format=fmt, **kw)
        tiles[0].resize((64, 64)).save(thumb_fpath, format=fmt, **kw)
    return len(pages)


def pages_of(site: Path, index: Path) -> list[tuple[int, tuple[int, int]]]:
    """(tiles, grid size) of every grid the report drew (read from its files and the index)."""
    with Index.open(index) as idx:
        sae_id = idx.sae_ids()[0]
        info = idx.sae_info(sae_id)
        grid = (int(info["grid_h"]), int(info["grid_w"]))
        exs = data.exemplars(idx, sae_id, "patches", 0, idx.n_features(sae_id) - 1, 25, grid)
    out = []
    for f in sorted(site.rglob("grid-*.*")):
        with Image.open(f) as img:
            out.append((len(exs[int(f.stem.split("-")[1])]), img.size))
    return out


def ceiling_fn(pages: list[tuple[int, tuple[int, int]]], root: Path, workers: int, fmt: str) -> Callable[[], float]:
    ext = "jpg" if fmt == "JPEG" else "png"

    def go() -> float:
        out = root / "bare"
        out.mkdir()
        jobs = [(str(out / f"grid-{i}.{ext}"), str(out / f"thumb-{i}.{ext}"), n, size)
                for i, (n, size) in enumerate(pages)]
        batches = [jobs[i : i + 16] for i in range(0, len(jobs), 16)]
        t0 = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            assert sum(pool.map(draw_pages, batches, [fmt] * len(batches))) == len(pages)
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        return dt

    return go


def report_fn(index: Path, root: Path, workers: int, fmt: str, max_features: int | None) -> Callable[[], float]:
    def go() -> float:
        out = root / f"site-{fmt}"
        t0 = time.perf_counter()
        run(Config(index=index, out=out, workers=workers, image_format=fmt, max_features=max_features))
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        return dt

    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small index, 32 pages, PNG only (about a minute)")
    ap.add_argument("--workers", type=int, default=None, help="drawing processes (default: one per core up to 8)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, quick 3)")
    ap.add_argument("--formats", default=None, help="png,jpeg (default; quick: png)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n_images, n_latents, max_features = (300, 192, 32) if args.quick else (2000, 1024, None)
    repeats = args.repeats or (3 if args.quick else 5)
    workers = args.workers if args.workers is not None else max(1, min(8, os.cpu_count() or 1))
    formats = (args.formats or ("png" if args.quick else "png,jpeg")).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        index = build_index(root, n_images, n_latents)
        print(f"index: {n_images} images, {n_latents} features, mined in {time.perf_counter() - t0:.1f} s", flush=True)
        res = run(Config(index=index, out=root / "warm", workers=workers, max_features=max_features))  # warm-up
        n_pages, pages = res.saes[0]["n_pages"], pages_of(root / "warm", index)
        assert len(pages) == n_pages, (len(pages), n_pages)
        mb_per_page = sum(f.stat().st_size for f in (root / "warm").rglob("*") if f.is_file()) / n_pages / 1e6
        fns: dict[str, Callable[[], float | None]] = {}
        for fmt in formats:
            fns[f"ceiling_{fmt}"] = ceiling_fn(pages, root, workers, "JPEG" if fmt == "jpeg" else "PNG")
            fns[f"report_{fmt}"] = report_fn(index, root, workers, fmt, max_features)
        times = interleave(fns, repeats, warmup=0)
    rep = Report("report", args.quick, images=n_images, features=n_latents, pages=n_pages, workers=workers,
                 repeats=repeats, formats=formats)
    rep.note("mb_per_page_png", mb_per_page)
    section(f"report: {n_pages} pages, {workers} drawing processes, {repeats} repeats")
    for fmt in formats:
        rep.rate(f"report_{fmt}", f"report, {fmt} (pages/s)", times[f"report_{fmt}"], n_pages, "pages/s")
        rep.rate(f"ceiling_{fmt}", f"ceiling: bare PIL sheets + thumbnails, {fmt}", times[f"ceiling_{fmt}"], n_pages,
                 "pages/s")
        rep.series_ratio(f"ratio_{fmt}", f"ratio, {fmt}", times[f"report_{fmt}"], times[f"ceiling_{fmt}"],
                         n_pages, n_pages)
    rep.headline("report feature pages/s (png)", "report_png", "ceiling_png", "ratio_png")
    rep.write(args.json)


if __name__ == "__main__":
    main()
