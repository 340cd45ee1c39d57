"""The report's pictures: per feature an exemplar grid (mine's heat-overlay renderer, one colour scale, value
under each tile) and a thumbnail of its best tile, drawn in a pool of worker processes in batches.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from saevctl.report.data import Exemplar

log = logging.getLogger(__name__)
THUMB_PX = 128  # drawn at this size on the index page: a 64 px heat tile was unreadable
FORMATS = {"png": "PNG", "jpeg": "JPEG"}


@dataclass(frozen=True)
class Grid:
    """One exemplar grid (and maybe its thumbnail) of one token kind: plain data, so it crosses processes."""

    title: str
    exemplars: list[Exemplar]
    grid_fpath: Path
    thumb_fpath: Path | None
    cols: int


@dataclass(frozen=True)
class Job:
    """Every picture of one feature."""

    feature: int
    grids: list[Grid]


@lru_cache(maxsize=1024)
def _view(path: str, preprocess_json: str) -> Any:
    # The same image is an exemplar of many features: decode and resize it once per worker.
    from PIL import Image

    from saevctl.mine.figures import TILE_PX, open_model_view

    view = open_model_view(path, json.loads(preprocess_json))
    # Cached at tile size, so heat_tile's own resize is a cheap same-size copy for every further feature.
    return None if view is None else view.resize((TILE_PX, TILE_PX), Image.Resampling.BICUBIC)


def _save(img: Any, fpath: Path, fmt: str) -> None:
    # Plain writes: the whole site folder is staged and renamed at the end, so files need no atomic rename.
    # zlib level 1: a photo grid compresses barely worse than at 6 and encodes ~3x faster.
    kw = {"quality": 88} if fmt == "jpeg" else {"compress_level": 1}
    img.save(fpath, format=FORMATS[fmt], **kw)


def render(job: Grid, preprocess_json: str, fmt: str) -> None:
    """Draw one grid (and thumbnail) with mine's tile and sheet renderers."""
    from PIL import Image

    from saevctl.mine.figures import caption, compose, heat_tile, label_tile

    exs = job.exemplars
    peaks = [float(e.acts_hw.max()) if e.acts_hw is not None else e.value for e in exs]
    vmax = max(peaks, default=0.0)
    tiles = [heat_tile(_view(e.path, preprocess_json), e.acts_hw, vmax) for e in exs]
    caps = [caption(e.rank, e.value, e.image_id) for e in exs]
    # A colour bar only where there is an overlay (CLS exemplars have no per-patch activations).
    has_heat = any(e.acts_hw is not None for e in exs)
    _save(compose(tiles, caps, job.title, job.cols, vmax if has_heat and vmax > 0 else None), job.grid_fpath, fmt)
    if job.thumb_fpath is not None and tiles:
        thumb = tiles[0].resize((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        _save(label_tile(thumb, f"id {exs[0].image_id}"), job.thumb_fpath, fmt)


def render_batch(jobs: list[Job], preprocess_json: str, fmt: str) -> int:
    for job in jobs:
        for grid in job.grids:
            render(grid, preprocess_json, fmt)
    return len(jobs)


def _context() -> Any:
    # forkserver/spawn, never fork: the parent holds DuckDB and torch threads, which a fork can deadlock.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if hasattr(ctx, "set_forkserver_preload"):
        ctx.set_forkserver_preload(["saevctl.mine.figures"])
    return ctx


def auto_workers(n_tiles: int) -> int:
    """Processes to draw with: none for small reports (a pool's start-up costs more than it saves)."""
    if n_tiles < 2000:
        return 0
    return max(1, min(8, (os.cpu_count() or 1)))


class Painter:
    """Draws batches of jobs inline (workers=0) or in a process pool, at most a few batches in flight so
    memory stays bounded; `on_done(n_features)` is called as features finish."""

    def __init__(self, workers: int, preprocess_json: str, fmt: str, on_done: Callable[[int], None]) -> None:
        self.preprocess_json, self.fmt, self.on_done = preprocess_json, fmt, on_done
        self.pool = ProcessPoolExecutor(workers, mp_context=_context()) if workers > 0 else None
        self.max_pending = 3 * workers
        self.pending: dict[Future[int], list[Job]] = {}

    def submit(self, jobs: list[Job]) -> None:
        if self.pool is None:
            self._inline(jobs)
            return
        while len(self.pending) >= self.max_pending:
            self._drain(FIRST_COMPLETED)
        if self.pool is None:  # the pool broke while draining
            self._inline(jobs)
            return
        self.pending[self.pool.submit(render_batch, jobs, self.preprocess_json, self.fmt)] = jobs

    def _inline(self, jobs: list[Job]) -> None:
        for job in jobs:
            render_batch([job], self.preprocess_json, self.fmt)
            self.on_done(1)

    def _drain(self, when: str) -> None:
        done, _ = wait(self.pending, return_when=when)
        for fut in done:
            jobs = self.pending.pop(fut)
            try:
                self.on_done(fut.result())  # re-raises a worker's error here
            except BrokenProcessPool:
                # Workers die at start-up when a script that calls run() lacks `if __name__ == "__main__":`.
                if self.pool is not None:
                    log.warning("the drawing processes stopped; drawing the rest in this process "
                                "(in a script, call run() under `if __name__ == \"__main__\":` to use them)")
                    self.close()
                self._inline(jobs)

    def finish(self) -> None:
        while self.pending:
            self._drain("ALL_COMPLETED")
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
