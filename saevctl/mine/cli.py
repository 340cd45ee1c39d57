"""`saevctl mine`, `saevctl sql` and the `saevctl features` commands: options from each Config, call the library,
print. Heavy imports (torch, duckdb, faiss) happen inside the commands, so `saevctl --help` stays fast.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from rich.console import Console

    from saevctl.config import IndexQuery
    from saevctl.mine.config import Config, LabelConfig
    from saevctl.mine.index import Index
    from saevctl.mine.queries import (
        ListQuery,
        MatchQuery,
        PickQuery,
        SearchQuery,
        ShowQuery,
        SimilarQuery,
        SqlQuery,
        TopQuery,
    )

app = typer.Typer()
features_app = typer.Typer(
    name="features",
    help="Browse mined features: top images, statistics, neighbours, cross-SAE matches, image search.",
    no_args_is_help=True,
)


def _configs() -> ModuleType:
    """Mining's Config module, imported only when `mine` or `features label` is built (see saevctl.cliconfig)."""
    from saevctl.mine import config

    return config


def _queries() -> ModuleType:
    """The query Configs, imported only when a `features` command or `sql` is built."""
    from saevctl.mine import queries

    return queries


def _open(q: IndexQuery, quiet: bool = False) -> tuple[Index, str]:
    """The query's index and SAE (workspace defaults resolved by the library); says which ones unless quiet."""
    from saevctl.console import console
    from saevctl.mine.queries import open_query

    idx, sae_id = open_query(q)
    if not quiet:
        console.print(f"[dim]index {idx.fpath} · SAE {sae_id}[/]")
    return idx, sae_id


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@config_command(app, "mine", lambda: _configs().Config)
def mine(cfg: Config) -> None:
    """Scan a store through an SAE once into a DuckDB index: feature statistics, top images with per-patch
    activations, per-image top features, and a faiss index of decoder directions; records it as this workspace's
    default."""
    from rich.table import Table

    from saevctl.console import console, progress_bar, say_path
    from saevctl.mine import run

    with progress_bar("mine", None, "img") as advance:
        result = run(cfg, progress=advance, on_total=advance.set_total)
    t = Table(title="mined" + (" (inputs unchanged: kept)" if result.unchanged else ""), show_header=False)
    t.add_row("SAE", result.sae_id)
    t.add_row("images", f"{result.n_images:,}")
    t.add_row("features", f"{result.n_features:,} ({result.alive:,} fire, {result.n_features - result.alive:,} never)")
    t.add_row("tokens", ", ".join(result.tokens))
    if cfg.max_per_source is not None:
        t.add_row("exemplars", f"top {cfg.top_k} by {cfg.by}, at most {cfg.max_per_source} per source photo")
    if (c := result.compute)["compute"] == "bfloat16":
        t.add_row("compute", f"bfloat16 encoder; on {c['rows_measured']:,} tokens against float32: "
                  f"{c['firing_kept']:.2%} of its firing codes fire, with {c['rel_error_shared']:.2%} relative error "
                  f"({c['rel_error_vs_float32']:.2%} over all codes, swaps at near-ties included)")
    t.add_row("time", f"{result.seconds:.1f} s" + (" (when mined)" if result.unchanged else ""))
    console.print(t)
    if result.unchanged:
        console.print("unchanged: the index holds this SAE mined from the same checkpoint, store and options "
                      "(--force mines it again)")
    say_path("index", result.index.resolve())
    console.print("next: saevctl features list --sort freq   ·   saevctl features top --id 0")


@config_command(features_app, "top", lambda: _queries().TopQuery)
def top(cfg: TopQuery) -> None:
    """The feature's top images as a table, and a PNG grid with the firing patches highlighted."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures

    idx, sae_id = _open(cfg)
    with idx:
        exemplars = idx.top_exemplars(sae_id, cfg.id, cfg.k, cfg.token)
        info = idx.sae_info(sae_id)
        t = Table(title=f"feature {cfg.id}: top {len(exemplars)} images by {info['rank_by']}")
        for col in ("rank", "image", "label", "value", "patches fired"):
            t.add_column(col, justify="right" if col in ("rank", "value", "patches fired") else "left")
        for ex in exemplars:
            fired = f"{ex['n_fired']}/{len(ex['acts'])}" if len(ex["acts"]) else "cls"
            t.add_row(str(ex["rank"] + 1), f"{ex['image_id']}: {ex['path']}", str(ex["label"] or ""),
                      f"{ex['value']:.4g}", fired)
        console.print(t)
        fpath = cfg.out or layout.feature_grid_fpath(idx.fpath, sae_id, cfg.id, cfg.token or "patches")
        say_path("grid", figures.feature_grid(idx, sae_id, cfg.id, fpath, cfg.k, cfg.token))


@config_command(features_app, "show", lambda: _queries().ShowQuery)
def show(cfg: ShowQuery) -> None:
    """Statistics, an activation histogram (sparkline here, PNG on disk) and the most similar features."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures, query

    idx, sae_id = _open(cfg)
    with idx:
        st = idx.feature_stats(sae_id, cfg.id, cfg.token)
        t = Table(title=f"feature {cfg.id}", show_header=False)
        kind = "patch" if st["token"] == "patches" else st["token"]
        t.add_row("fires on", f"{st['freq']:.3g} of {kind} tokens, {st['img_freq']:.3g} of images")
        t.add_row("mean when firing", _fmt(st["mean"]))
        t.add_row("max", _fmt(st["max"]))
        t.add_row("mean image score", _fmt(st["img_mean"]))
        bins = idx.histogram(sae_id, cfg.id, cfg.token)
        nz = [b for b in bins if b["count"]]
        rng = f"  ({nz[0]['lo']:.2g} .. {nz[-1]['hi']:.2g})" if nz else ""
        t.add_row("histogram", figures.sparkline([b["count"] for b in bins]) + rng)
        for lab in idx.feature_label(sae_id, cfg.id) if st["token"] == "patches" else []:
            t.add_row(f"label ({lab['level']})", _label_text(lab))
        console.print(t)
        hpath = figures.histogram_png(bins, f"{sae_id} feature {cfg.id} ({st['token']})",
                                      layout.feature_hist_fpath(idx.fpath, sae_id, cfg.id, st["token"]))
        pairs = query.similar(idx, sae_id, cfg.id, cfg.n_similar)
        _similar_table(console, idx, sae_id, pairs, f"similar to {cfg.id} (decoder cosine)")
        say_path("histogram", hpath)


def _label_text(lab: dict[str, Any]) -> str:
    if lab["class_name"] is None:
        return "none (never fires on labelled data)"
    thr = f" at > {lab['threshold']:.3g}" if lab["threshold"] is not None else ""
    return f"{lab['class_name']}  AUROC {lab['auroc']:.3f}, F1 {lab['f1']:.3f}{thr}"


def _similar_table(console: Console, idx: Index, sae_id: str, pairs: list[tuple[int, float]], title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("feature", "cosine", "freq", "max"):
        t.add_column(col, justify="right")
    for f, sim in pairs:
        st = idx.feature_stats(sae_id, f)
        t.add_row(str(f), f"{sim:.3f}", _fmt(st["freq"]), _fmt(st["max"]))
    console.print(t)


@config_command(features_app, "similar", lambda: _queries().SimilarQuery)
def similar(cfg: SimilarQuery) -> None:
    """The nearest features of the same SAE by decoder-direction cosine (faiss)."""
    from saevctl.console import console
    from saevctl.mine import query

    idx, sae_id = _open(cfg)
    with idx:
        pairs = query.similar(idx, sae_id, cfg.id, cfg.n)
        _similar_table(console, idx, sae_id, pairs, f"features similar to {cfg.id}")


@config_command(features_app, "list", lambda: _queries().ListQuery)
def list_(cfg: ListQuery, *, plain: bool = typer.Option(
        False, "--plain", help="Print only the feature ids, one per line (for scripts).")) -> None:
    """Features sorted by a statistic, optionally filtered; with labels (features label), their best class and AUROC."""
    from rich.table import Table

    from saevctl.console import console

    idx, sae_id = _open(cfg, quiet=plain)
    with idx:
        rows = idx.list_features(sae_id, cfg.sort, cfg.where, cfg.limit, cfg.token, descending=not cfg.ascending,
                                 label=cfg.label)
        counts = idx.feature_count(sae_id, cfg.token)
        level = idx.primary_label_level(sae_id)
    if plain:
        for r in rows:
            typer.echo(str(r["feature"]))
        return
    cols: tuple[str, ...] = ("feature", "freq", "img_freq", "mean", "max", "img_mean", "n_fired")
    if rows and "label" in rows[0]:
        cols += ("label", "auroc")
    t = Table(title=f"features by {cfg.sort}" + (f" where {cfg.where}" if cfg.where else "")
              + (f" labelled {cfg.label!r} ({level} level)" if cfg.label else "")
              + f"  ({counts['alive']:,} of {counts['total']:,} ever fire)")
    for c in cols:
        t.add_column(c, justify="left" if c == "label" else "right")
    for r in rows:
        t.add_row(*("" if r[c] is None else f"{r[c]:.3f}" if c == "auroc" else _fmt(r[c]) for c in cols))
    console.print(t)


@config_command(features_app, "pick", lambda: _queries().PickQuery)
def pick(cfg: PickQuery) -> None:
    """Features that look like concepts, by a stated rule: sparse, spatially coherent, off borders and padding, and
    spread over source photos; each with an image where it fires and a comparable one where it does not."""
    from rich.table import Table

    from saevctl.console import console
    from saevctl.mine.pick import pick as run_pick
    from saevctl.mine.pick import rule_text

    idx, sae_id = _open(cfg, quiet=cfg.plain)
    with idx:
        picks, n_passed = run_pick(idx, sae_id, cfg)
    if cfg.plain:
        for p in picks:
            typer.echo(f"{p.feature}\t{p.present}\t{p.absent or ''}")
        return
    console.print(f"rule: {rule_text(cfg)}")
    t = Table(title=f"{n_passed:,} features pass the rule" + (f"; the first {len(picks)}" if n_passed > len(picks)
                                                                  else ""))
    cols = ("feature", "img_freq", "max", "coherent", "border", "padding", "photos", "label")
    for c in cols:
        t.add_column(c, justify="left" if c == "label" else "right", no_wrap=True)
    for p in picks:
        t.add_row(str(p.feature), _fmt(p.img_freq), _fmt(p.max), f"{p.coherence:.2f}", f"{p.border:.2f}",
                  f"{p.padding:.2f}", str(p.sources), p.label or "")
    console.print(t)
    if not picks:
        console.print("no feature passes: loosen the rule (e.g. --min-coherence, --max-border, --min-sources)")
        return
    first = picks[0]
    console.print(f"picked: feature {first.feature}\n  fires on: {first.present}\n  not on:   {first.absent or '-'}")
    console.print(f"next: saevctl features top --id {first.feature}   ·   saevctl probe --image "
                  f"'{first.present}' --clamp {first.feature}=0")


@config_command(features_app, "label", lambda: _configs().LabelConfig)
def label_(cfg: LabelConfig, *, top: int = typer.Option(20, "--top", help="Classes to show (best AUROC first).")
           ) -> None:
    """Name features: for every feature and class, the AUROC and best F1 of the feature's patch (or image: max over
    patches) activations for 'this is class c'; writes each feature's best class and each class's best feature to
    the index."""
    from saevctl.config import check_finite
    from saevctl.console import console, progress_bar, say_path
    from saevctl.mine import label as labelling

    check_finite("top", top, low=1)
    with progress_bar("label", None, "img") as advance:
        result = labelling.run(cfg, progress=advance, on_total=advance.set_total)
    console.print(f"[dim]index {result.index} · SAE {result.sae_id}[/]")
    if result.unchanged:
        console.print("unchanged: labelled before from the same SAE, store labels and options (--force labels "
                      "again); the recorded result:")
    for lv in result.levels.values():
        _label_table(console, lv, top)
    say_path("index", result.index.resolve())
    console.print(f"next: saevctl features list --label \"{_example_class(result)}\"   ·   "
                  "saevctl sql \"SELECT * FROM class_features\"")


def _label_table(console: Console, lv: Any, top: int) -> None:
    from rich.table import Table

    unit = "patches" if lv.level.startswith("patch") else "images"
    t = Table(title=f"{lv.level} level: best feature per class ({lv.n_items:,} {unit} scored)")
    for col in ("class", "positives", "feature", "AUROC", "F1", "threshold"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in lv.classes[:top]:
        t.add_row(str(r["class_name"]), f"{r['n_positive']:,}", str(r["feature"]), f"{r['auroc']:.3f}",
                  f"{r['f1']:.3f}", _fmt(r["threshold"]))
    console.print(t)
    cov = " · ".join(f"AUROC >= {k:g}: {v:.0%}" for k, v in lv.coverage.items())
    console.print(f"{lv.level} level, {min(top, len(lv.classes))} of {lv.n_classes} classes shown; "
                  f"classes with a feature at {cov}; AUROC binning error <= {lv.max_error:.1e}", highlight=False)
    if lv.negatives:
        console.print(f"{lv.level} level: each class is ranked against {lv.negatives}", highlight=False)


def _example_class(result: Any) -> str:
    for lv in result.levels.values():
        if lv.classes:
            return str(lv.classes[0]["class_name"]).replace('"', "")
    return "CLASS"


@config_command(features_app, "match", lambda: _queries().MatchQuery)
def match(cfg: MatchQuery) -> None:
    """The closest features in another SAE: decoder cosine for the same model and layer; otherwise the features of
    B that fire most on A's top images versus all other images (both sides' exemplars in the PNG)."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures, query

    idx, sae_a = _open(cfg)
    with idx:
        sae_b = idx.resolve_sae(cfg.to)
        res = query.match(idx, sae_a, cfg.id, sae_b, cfg.n)
        shared = f", over {res.n_shared_images} shared exemplar images" if res.n_shared_images else ""
        console.print(f"{sae_a} feature {cfg.id} matched in {sae_b} by {res.method}{shared}")
        t = Table(title=f"closest in {sae_b}")
        t.add_column("feature", justify="right")
        t.add_column("score", justify="right")
        t.add_column("max", justify="right")
        for m in res.matches:
            t.add_row(str(m["feature"]), f"{m['score']:.3f}", _fmt(idx.feature_stats(sae_b, m["feature"])["max"]))
        console.print(t)
        best = res.matches[0]["feature"] if res.matches else None
        fpath = layout.match_fpath(idx.fpath, sae_a, cfg.id, sae_b)
        say_path("match", figures.match_figure(idx, sae_a, cfg.id, sae_b, best, fpath))


@config_command(features_app, "search", lambda: _queries().SearchQuery)
def search(cfg: SearchQuery) -> None:
    """Which features fire on (part of) an image, each with its exemplars: the paper's Figure 2."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures, query

    idx, sae_id = _open(cfg)
    with idx:
        res = query.search_image(idx, sae_id, str(cfg.image), cfg.patches, cfg.box, cfg.n)
        t = Table(title=f"top features on {len(res.selected)} patch(es) of {cfg.image}")
        for col in ("feature", "sum", "patches fired", "freq", "max"):
            t.add_column(col, justify="right")
        for f, v in res.features:
            st = idx.feature_stats(sae_id, f)
            fired = int((res.codes_ps[res.selected, f] > 0).sum())
            t.add_row(str(f), f"{v:.4g}", f"{fired}/{len(res.selected)}", _fmt(st["freq"]), _fmt(st["max"]))
        console.print(t)
        fpath = layout.search_fpath(idx.fpath, sae_id, cfg.image.stem)
        say_path("search", figures.search_figure(idx, res, fpath))


@config_command(app, "sql", lambda: _queries().SqlQuery)
def sql(cfg: SqlQuery) -> None:
    """Read-only SQL on the index, printed as a table; writes and file access are refused."""
    from rich.table import Table

    from saevctl.console import console
    from saevctl.mine.queries import open_index

    with open_index(cfg) as idx:
        console.print(f"[dim]index {idx.fpath}[/]")
        cols, rows, truncated = idx.query(cfg.query, cfg.max_rows)
    t = Table(caption=f"first {cfg.max_rows} rows shown" if truncated else f"{len(rows)} rows")
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(_fmt(v) if not isinstance(v, bytes) else f"<{len(v)} bytes>" for v in r))
    console.print(t)


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
    root.add_typer(features_app, name="features")
