"""`report`: a static HTML feature browser of a mined index (index page + one page per feature that fired),
built in a staged folder with the pictures drawn in a process pool.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl import atomic, layout, rerun, workspace
from saevctl.errors import IndexError_
from saevctl.mine.schema import hist_edges
from saevctl.report import config, data, pages, pictures, select, site
from saevctl.report.assets import CSS
from saevctl.report.config import Config

if TYPE_CHECKING:
    from saevctl.mine.index import Index

__all__ = ["Config", "Result", "count_pages", "run"]
log = logging.getLogger(__name__)
Progress = Callable[[int], None]
# Features whose exemplars are read per query, and per batch handed to a drawing process.
CHUNK_FEATURES = 256
BATCH_FEATURES = 16


# The Config (torch- and numpy-free, for --help) lives in report/config.py; kept importable from here.
assert set(config.IMAGE_FORMATS) == set(pictures.FORMATS)


@dataclass(frozen=True)
class Result:
    out: Path
    index: Path
    saes: list[dict[str, Any]] = field(default_factory=list)
    """Per SAE: sae_id, dname, n_latents, n_pages, n_skipped."""
    seconds: float = 0.0
    unchanged: bool = False
    """The site in `out` was built from the same index content, report cards and options: kept as it is."""

    @property
    def index_html(self) -> Path:
        return layout.report_index_fpath(self.out)


def resolve_index(index: Path | None) -> Path:
    """The given index, else the workspace's last mined one."""
    return workspace.index_or_default(index)


def _sae_ids(idx: Index, refs: tuple[str, ...]) -> list[str]:
    ids = [idx.resolve_sae(r) for r in refs] if refs else idx.sae_ids()
    if not ids:
        raise IndexError_(f"the index {idx.fpath} holds no mined SAE", "run saevctl mine --sae CKPT --store DIR")
    return list(dict.fromkeys(ids))


def count_pages(cfg: Config) -> int:
    """How many feature pages `run(cfg)` will write."""
    from saevctl.mine import Index

    with Index.open(resolve_index(cfg.index)) as idx:
        return _count_pages(idx, cfg)


def _count_pages(idx: Index, cfg: Config) -> int:
    return sum(len(idx.fired_features(s, idx.tokens(s), cfg.max_features)) for s in _sae_ids(idx, cfg.saes))


def _summary(info: dict[str, Any]) -> str:
    return (f"model {info['model_spec']}, layer {info['layer']}, {info['n_latents']:,} features, "
            f"mined on {info['n_images']:,} images ({', '.join(info['tokens'])} tokens, "
            f"top {info['top_k']} by {info['rank_by']})")


@dataclass
class _SaeContext:
    """What every page of one SAE needs, read once."""

    sae: dict[str, Any]
    info: dict[str, Any]
    tokens: tuple[str, ...]
    grid: tuple[int, int]
    dpath: Path
    stats: dict[str, dict[str, np.ndarray]]
    hists: dict[str, dict[int, np.ndarray]]
    near: dict[int, list[tuple[int, float]]] | None
    page_names: dict[int, str]
    edges: list[tuple[float, float]]
    ext: str
    cols: int
    live: set[int] = field(default_factory=set)
    """Every feature that fired, page or not (a neighbour without a page is 'left out', not 'never fired')."""
    labels: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """Each feature's rows of features label (patch level first)."""


def _pages(idx: Index, sae_id: str, info: dict[str, Any], live: np.ndarray, stats: dict[str, np.ndarray],
           cfg: Config) -> np.ndarray:
    """The live features that get pages (ascending): all, or --max-features of them chosen by --pick."""
    if cfg.max_features is None or cfg.max_features >= len(live):
        return live
    if cfg.pick == "freq":
        return idx.fired_features(sae_id, info["tokens"], cfg.max_features)
    t0 = info["tokens"][0]
    return select.pick(live, stats, int(info["n_images"]), t0 == "patches", cfg.max_features)


def _context(idx: Index, sae_id: str, position: int, root: Path, cfg: Config) -> tuple[_SaeContext, np.ndarray]:
    info = idx.sae_info(sae_id)
    tokens = info["tokens"]
    dname = layout.report_sae_dname(sae_id, position)
    stats = {t: data.feature_table(idx, sae_id, t) for t in tokens}
    live = idx.fired_features(sae_id, tokens)
    fired = _pages(idx, sae_id, info, live, stats[tokens[0]], cfg)
    sae = {"sae_id": sae_id, "dname": dname, "anchor": f"sae-{position}", "summary": _summary(info),
           "model_spec": info["model_spec"], "layer": info["layer"], "n_latents": int(info["n_latents"]),
           "n_images": int(info["n_images"]), "n_pages": len(fired), "n_skipped": int(info["n_latents"]) - len(live),
           "n_unlisted": len(live) - len(fired), "max_features": cfg.max_features, "pick": cfg.pick}
    ctx = _SaeContext(
        sae, info, tokens, (int(info["grid_h"]), int(info["grid_w"])), layout.report_sae_dpath(root, dname),
        stats, {t: data.histograms(idx, sae_id, t) for t in tokens},
        data.neighbours(idx, sae_id, fired, cfg.neighbours),
        {int(f): layout.report_feature_name(int(f)) for f in fired}, hist_edges(),
        "jpg" if cfg.image_format == "jpeg" else "png", cfg.cols, live={int(f) for f in live})
    ctx.labels = data.feature_labels(idx, sae_id)
    sae["label_level"] = idx.primary_label_level(sae_id)
    ctx.dpath.mkdir(parents=True)
    return ctx, fired


def _feature(ctx: _SaeContext, f: int, exs: dict[str, dict[int, list[data.Exemplar]]],
             prev_next: tuple[int | None, int | None]) -> tuple[pictures.Job, list[Any]]:
    """Write one feature's page; return the job that draws its pictures and its index-table row."""
    sections, grids = [], []
    for t in ctx.tokens:
        t_exs = exs[t].get(f, [])
        grid_name = layout.report_feature_name(f, "grid", t, ctx.ext) if t_exs else None
        if grid_name:
            thumb = ctx.dpath / layout.report_feature_name(f, "thumb", t, ctx.ext) if t == ctx.tokens[0] else None
            title = f"{ctx.sae['sae_id']}  feature {f}  {t}  top {len(t_exs)} by {ctx.info['rank_by']}"
            grids.append(pictures.Grid(title, t_exs, ctx.dpath / grid_name, thumb, ctx.cols))
        f_stats = {c: ctx.stats[t][c][f] for c in data.STAT_COLUMNS}
        sections.append(pages.token_section(t, f_stats, t_exs, grid_name, ctx.hists[t].get(f), ctx.edges,
                                            ctx.grid[0] * ctx.grid[1], f))
    sections.insert(0, pages.labels_html(ctx.labels.get(f, [])))
    near_html = pages.neighbours_html(None if ctx.near is None else ctx.near.get(f, []), ctx.page_names, ctx.live,
                                      ctx.sae["max_features"])
    text = pages.feature_page(ctx.sae, f, sections, near_html, prev_next, ctx.page_names)
    (ctx.dpath / ctx.page_names[f]).write_text(text, encoding="utf-8")
    t0 = ctx.tokens[0]
    row = _table_row(f, t0, ctx.stats[t0], exs[t0].get(f, []), ctx.sae["dname"], ctx.ext, ctx.page_names[f])
    primary = next((r for r in ctx.labels.get(f, []) if r["level"] == ctx.sae["label_level"]), None)
    row += [primary["class_name"], pages.num(primary["auroc"])] if primary else [None, None]
    return pictures.Job(f, grids), row


def _write_sae(idx: Index, sae_id: str, position: int, root: Path, cfg: Config,
               progress: Progress | None) -> tuple[dict[str, Any], list[list[Any]]]:
    """Pages and pictures of one SAE, a chunk of features at a time; returns its summary and table rows."""
    ctx, fired = _context(idx, sae_id, position, root, cfg)
    k = min(cfg.k or int(ctx.info["top_k"]), int(ctx.info["top_k"]))
    rows: list[list[Any]] = []
    painter = pictures.Painter(_workers(cfg, len(fired) * k), json.dumps(ctx.info["model"]["preprocess"]),
                               cfg.image_format, progress or (lambda n: None))
    try:
        for lo in range(0, len(fired), CHUNK_FEATURES):
            chunk = [int(x) for x in fired[lo : lo + CHUNK_FEATURES]]
            exs = {t: data.exemplars(idx, sae_id, t, chunk[0], chunk[-1], k, ctx.grid) for t in ctx.tokens}
            jobs = []
            for j, f in enumerate(chunk, start=lo):
                prev_next = (int(fired[j - 1]) if j else None, int(fired[j + 1]) if j + 1 < len(fired) else None)
                job, row = _feature(ctx, f, exs, prev_next)
                jobs.append(job)
                rows.append(row)
            for batch in pictures.batched(jobs, BATCH_FEATURES):
                painter.submit(batch)
        painter.finish()
    finally:
        painter.close()
    return ctx.sae, rows


def _table_row(f: int, token: str, stats: dict[str, np.ndarray], exs: list[data.Exemplar], dname: str, ext: str,
               page: str) -> list[Any]:
    """One row of the index table (columns: pages.TABLE_COLS), statistics of the SAE's first token kind."""
    label = data.majority_label(exs)
    base = f"saes/{dname}/"
    thumb = base + layout.report_feature_name(f, "thumb", token, ext) if exs else None
    return [f, pages.num(stats["freq"][f]), pages.num(stats["img_freq"][f]), pages.num(stats["mean"][f]),
            pages.num(stats["max"][f]), label[0] if label else None, round(label[1], 3) if label else None,
            base + page, thumb]


def _workers(cfg: Config, n_tiles: int) -> int:
    return pictures.auto_workers(n_tiles) if cfg.workers is None else cfg.workers


def _copy_eval_card(index_fpath: Path, sae: dict[str, Any], root: Path) -> None:
    """Copy the SAE's report card (saevctl eval all, written beside the index) into its folder, for the index
    page's link."""
    card = layout.eval_card_fpath(layout.eval_dpath(index_fpath, sae["sae_id"]))
    if card.is_file():
        name = layout.report_eval_card_name()
        shutil.copyfile(card, layout.report_sae_dpath(root, sae["dname"]) / name)
        sae["card"] = f"saes/{sae['dname']}/{name}"


def run(cfg: Config, progress: Progress | None = None, on_total: Callable[[Path, int], None] | None = None) -> Result:
    """Write the report of `cfg.index` into `cfg.out` (atomically, as a whole folder); progress counts pages, and
    `on_total(index path, pages)` is called once the index is open, before the first page."""
    from saevctl.mine import Index

    t0 = time.perf_counter()
    index_fpath = resolve_index(cfg.index)
    site.check_target(cfg.out.absolute())  # before any work: a wrong --out fails at once
    with Index.open(index_fpath) as idx:
        inputs = _inputs(idx, index_fpath, cfg)
    if (kept := _kept(cfg, inputs)) is not None:
        return Result(cfg.out.absolute(), index_fpath, kept["saes"], float(kept.get("seconds", 0.0)), unchanged=True)
    saes, sections = [], []
    with Index.open(index_fpath) as idx, site.staged_site(cfg.out) as root:
        if on_total is not None:
            on_total(index_fpath, _count_pages(idx, cfg))
        for position, sae_id in enumerate(_sae_ids(idx, cfg.saes)):
            sae, rows = _write_sae(idx, sae_id, position, root, cfg, progress)
            _copy_eval_card(index_fpath, sae, root)
            saes.append(sae)
            sections.append(pages.sae_section(sae, rows))
            log.info("report: %s, %d pages, %d features never fired", sae_id, sae["n_pages"], sae["n_skipped"])
        created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        layout.report_css_fpath(root).write_text(CSS, encoding="utf-8")
        index_html = pages.index_page(str(index_fpath.resolve()), saes, sections, created)
        layout.report_index_fpath(root).write_text(index_html, encoding="utf-8")
        summary = [{k: s[k] for k in ("sae_id", "dname", "n_latents", "n_pages", "n_skipped")} for s in saes]
        meta = {"format": site.FORMAT, "schema_version": layout.REPORT_SCHEMA, "index": str(index_fpath.resolve()),
                "created": created, "image_format": cfg.image_format, "saes": summary,
                "seconds": time.perf_counter() - t0, rerun.KEY: inputs, "files": _files(root)}
        atomic.write_json(layout.report_meta_fpath(root), meta)  # last: marks the folder complete
    out = cfg.out.absolute()
    return Result(out, index_fpath, summary, time.perf_counter() - t0)


def _inputs(idx: Index, index_fpath: Path, cfg: Config) -> str:
    """What the site is made from (saevctl.rerun): the index's content, the SAEs' report cards, the options."""
    cards = {s: rerun.file_part(layout.eval_card_fpath(layout.eval_dpath(index_fpath, s))) for s in idx.sae_ids()}
    return rerun.digest({"index": [str(index_fpath.resolve()), idx.fingerprint()], "cards": cards,
                         "config": rerun.config_part(cfg, drop=("workers", "out", "index"))})


def _kept(cfg: Config, inputs: str) -> dict[str, Any] | None:
    """The site's meta when `cfg.out` holds a complete site built from these inputs (else None: build it)."""
    if cfg.force or not layout.report_index_fpath(cfg.out).is_file():
        return None
    try:
        meta = json.loads(layout.report_meta_fpath(cfg.out).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get(rerun.KEY) != inputs or "saes" not in meta:
        return None
    return meta if meta.get("files") == _files(cfg.out) else None  # a file added, removed or changed: rebuild


def _files(root: Path) -> str:
    return rerun.listing(root, skip=(layout.report_meta_fpath(root).name,))
