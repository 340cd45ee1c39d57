"""`saevctl mine`, `saevctl sql` and the `saevctl features` commands: parse options, call the library, print.

Heavy imports (torch, duckdb, faiss) happen inside the commands, so `saevctl --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from saevctl import workspace

features_app = typer.Typer(
    name="features",
    help="Browse mined features: top images, statistics, neighbours, cross-SAE matches, image search.",
    no_args_is_help=True,
)


# Static text (docs/cli.md is generated from --help); each command prints the index and SAE it used.
INDEX_HELP = ("DuckDB index to read (default: the one last mined in this workspace, recorded in ./saevctl.toml, "
              "else in $SAEVCTL_HOME/last.toml).")
SAE_HELP = ("SAE in the index: a checkpoint path or an SAE id (default: the workspace's last mined SAE when it is "
            "in the index, else the index's last mined SAE).")


def _open(index: Path | None, sae: str | None, quiet: bool = False) -> tuple[Any, str]:
    """Open the index read-only and resolve the SAE; print which ones are used (unless quiet)."""
    from saevctl.console import console
    from saevctl.errors import IndexError_
    from saevctl.mine.index import Index

    idx = Index.open(workspace.index_or_default(index))
    if sae is not None:
        sae_id = idx.resolve_sae(sae)
    else:
        try:  # the workspace's SAE, when it was mined into this index; else the index's last one
            sae_id = idx.resolve_sae(workspace.get_default("sae"))
        except IndexError_:
            sae_id = idx.resolve_sae(None)
    if not quiet:
        console.print(f"[dim]index {idx.fpath} · SAE {sae_id}[/]")
    return idx, sae_id


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def mine(
    sae: Path = typer.Option(None, "--sae", help="SAE checkpoint folder (default: the workspace's last SAE)."),
    store: Path = typer.Option(None, "--store", help="Activation store of the same model and layer (default: the workspace's last store)."),
    index: Path = typer.Option(None, "--index", help="DuckDB index to create or add this SAE to (default: the workspace's index, else ./index.duckdb)."),
    top_k: int = typer.Option(None, "--top-k", help="Exemplar images kept per feature (default 25)."),
    by: str = typer.Option(None, "--by", help="Rank images per feature by the max or mean over patches (default max)."),
    top_n: int = typer.Option(None, "--top-n", help="Features kept per image for image -> feature queries (default 32)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    name: str = typer.Option(None, "--name", help="Readable SAE name (default: the checkpoint folder's name)."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options (command-line values win)."),
) -> None:
    """Scan a store through an SAE once into a DuckDB index: feature statistics, top images with per-patch activations, per-image top features, and a faiss index of decoder directions; records it as this workspace's default."""
    from saevctl import layout
    from saevctl.config import load_toml, merge_config
    from saevctl.console import console, progress_bar, say_path
    from saevctl.errors import InputError
    from saevctl.mine import Config, run

    file_values = load_toml(config) if config else {}
    given = {"sae": sae or (None if "sae" in file_values else workspace.get_default("sae")),
             "store": store or (None if "store" in file_values else workspace.get_default("store")),
             "index": index, "top_k": top_k, "by": by, "top_n": top_n, "device": device, "name": name}
    merged = {**file_values, **{k: v for k, v in given.items() if v is not None}}
    for key in ("sae", "store"):
        if key not in merged:
            raise InputError(f"no --{key} given and none recorded in this workspace", f"pass --{key}")
    if "index" not in merged:
        given["index"] = workspace.get_default("index") or layout.default_index_fpath()
    cfg = merge_config(Config, file_values, given)
    from saevctl.store import open_store

    total = open_store(cfg.store).n_images
    with progress_bar("mine", total, "img") as advance:
        result = run(cfg, progress=advance)
    from rich.table import Table

    t = Table(title="mined", show_header=False)
    t.add_row("SAE", result.sae_id)
    t.add_row("images", f"{result.n_images:,}")
    t.add_row("features", f"{result.n_features:,} ({result.alive:,} fire, {result.n_features - result.alive:,} never)")
    t.add_row("tokens", ", ".join(result.tokens))
    t.add_row("time", f"{result.seconds:.1f} s")
    console.print(t)
    say_path("index", result.index.resolve())
    console.print("next: saevctl features list --sort freq   ·   saevctl features top --id 0")


@features_app.command("top")
def top(
    id: int = typer.Option(..., "--id", help="Feature id."),
    k: int = typer.Option(None, "--k", help="How many images (default: all stored, --top-k at mining)."),
    sae: str = typer.Option(None, "--sae", help=SAE_HELP),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
    token: str = typer.Option(None, "--token", help="patches or cls (default: the SAE's first token kind)."),
    out: Path = typer.Option(None, "--out", help="PNG to write (default: beside the index, in INDEX.figures/)."),
) -> None:
    """The feature's top images as a table, and a PNG grid with the firing patches highlighted."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures

    idx, sae_id = _open(index, sae)
    with idx:
        exemplars = idx.top_exemplars(sae_id, id, k, token)
        info = idx.sae_info(sae_id)
        t = Table(title=f"feature {id}: top {len(exemplars)} images by {info['rank_by']}")
        for col in ("rank", "image", "label", "value", "patches fired"):
            t.add_column(col, justify="right" if col in ("rank", "value", "patches fired") else "left")
        for ex in exemplars:
            fired = f"{ex['n_fired']}/{len(ex['acts'])}" if len(ex["acts"]) else "cls"
            t.add_row(str(ex["rank"] + 1), f"{ex['image_id']}: {ex['path']}", str(ex["label"] or ""), f"{ex['value']:.4g}", fired)
        console.print(t)
        fpath = out or layout.feature_grid_fpath(idx.fpath, sae_id, id, token or "patches")
        say_path("grid", figures.feature_grid(idx, sae_id, id, fpath, k, token))


@features_app.command("show")
def show(
    id: int = typer.Option(..., "--id", help="Feature id."),
    sae: str = typer.Option(None, "--sae", help=SAE_HELP),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
    token: str = typer.Option(None, "--token", help="patches or cls (default: the SAE's first token kind)."),
    n_similar: int = typer.Option(5, "--similar", help="How many similar features to list."),
) -> None:
    """Statistics, an activation histogram (sparkline here, PNG on disk) and the most similar features."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures, query

    idx, sae_id = _open(index, sae)
    with idx:
        st = idx.feature_stats(sae_id, id, token)
        t = Table(title=f"feature {id}", show_header=False)
        kind = "patch" if st["token"] == "patches" else st["token"]
        t.add_row("fires on", f"{st['freq']:.3g} of {kind} tokens, {st['img_freq']:.3g} of images")
        t.add_row("mean when firing", _fmt(st["mean"]))
        t.add_row("max", _fmt(st["max"]))
        t.add_row("mean image score", _fmt(st["img_mean"]))
        bins = idx.histogram(sae_id, id, token)
        nz = [b for b in bins if b["count"]]
        rng = f"  ({nz[0]['lo']:.2g} .. {nz[-1]['hi']:.2g})" if nz else ""
        t.add_row("histogram", figures.sparkline([b["count"] for b in bins]) + rng)
        for lab in idx.feature_label(sae_id, id) if st["token"] == "patches" else []:
            t.add_row(f"label ({lab['level']})", _label_text(lab))
        console.print(t)
        hpath = figures.histogram_png(bins, f"{sae_id} feature {id} ({st['token']})",
                                      layout.feature_hist_fpath(idx.fpath, sae_id, id, st["token"]))
        _similar_table(console, idx, sae_id, query.similar(idx, sae_id, id, n_similar), f"similar to {id} (decoder cosine)")
        say_path("histogram", hpath)


def _label_text(lab: dict[str, Any]) -> str:
    if lab["class_name"] is None:
        return "none (never fires on labelled data)"
    thr = f" at > {lab['threshold']:.3g}" if lab["threshold"] is not None else ""
    return f"{lab['class_name']}  AUROC {lab['auroc']:.3f}, F1 {lab['f1']:.3f}{thr}"


def _similar_table(console: Any, idx: Any, sae_id: str, pairs: list[tuple[int, float]], title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("feature", "cosine", "freq", "max"):
        t.add_column(col, justify="right")
    for f, sim in pairs:
        st = idx.feature_stats(sae_id, f)
        t.add_row(str(f), f"{sim:.3f}", _fmt(st["freq"]), _fmt(st["max"]))
    console.print(t)


@features_app.command("similar")
def similar(
    id: int = typer.Option(..., "--id", help="Feature id."),
    n: int = typer.Option(10, "--n", help="How many neighbours."),
    sae: str = typer.Option(None, "--sae", help=SAE_HELP),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
) -> None:
    """The nearest features of the same SAE by decoder-direction cosine (faiss)."""
    from saevctl.console import console
    from saevctl.mine import query

    idx, sae_id = _open(index, sae)
    with idx:
        _similar_table(console, idx, sae_id, query.similar(idx, sae_id, id, n), f"features similar to {id}")


@features_app.command("list")
def list_(
    sort: str = typer.Option("freq", "--sort", help="freq, img_freq, mean, mean_all, max, img_mean, n_fired or feature; auroc or f1 once labelled (features label)."),
    where: str = typer.Option(None, "--where", help="SQL condition on those columns, e.g. \"freq > 1e-4 AND max > 2\"."),
    limit: int = typer.Option(20, "--limit", help="Rows to show."),
    ascending: bool = typer.Option(False, "--asc", help="Smallest first."),
    sae: str = typer.Option(None, "--sae", help=SAE_HELP),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
    token: str = typer.Option(None, "--token", help="patches or cls (default: the SAE's first token kind)."),
    plain: bool = typer.Option(False, "--plain", help="Print only the feature ids, one per line (for scripts)."),
    label: str = typer.Option(None, "--label", help="Only features whose best class (from features label) is this name, case-insensitive."),
) -> None:
    """Features sorted by a statistic, optionally filtered; with labels (features label), their best class and AUROC."""
    from rich.table import Table

    from saevctl.console import console

    idx, sae_id = _open(index, sae, quiet=plain)
    with idx:
        rows = idx.list_features(sae_id, sort, where, limit, token, descending=not ascending, label=label)
        counts = idx.feature_count(sae_id, token)
        level = idx.primary_label_level(sae_id)
    if plain:
        for r in rows:
            typer.echo(str(r["feature"]))
        return
    cols: tuple[str, ...] = ("feature", "freq", "img_freq", "mean", "max", "img_mean", "n_fired")
    if rows and "label" in rows[0]:
        cols += ("label", "auroc")
    t = Table(title=f"features by {sort}" + (f" where {where}" if where else "")
              + (f" labelled {label!r} ({level} level)" if label else "")
              + f"  ({counts['alive']:,} of {counts['total']:,} ever fire)")
    for c in cols:
        t.add_column(c, justify="left" if c == "label" else "right")
    for r in rows:
        t.add_row(*("" if r[c] is None else f"{r[c]:.3f}" if c == "auroc" else _fmt(r[c]) for c in cols))
    console.print(t)


@features_app.command("label")
def label_(
    sae: str = typer.Option(None, "--sae", help=SAE_HELP),
    store: Path = typer.Option(None, "--store", help="Store with labels, of the SAE's model and layer (default: the store the SAE was mined on)."),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
    level: str = typer.Option(None, "--level", help="patch (extract --masks labels), image (ImageFolder labels, else mask classes present), or auto: every level the store has labels for (default auto)."),
    thresholds: str = typer.Option(None, "--thresholds", help="F1 thresholds as fractions of each feature's max (default 0,0.1,0.2,0.3,0.5)."),
    bins: int = typer.Option(None, "--bins", help="Histogram bins per feature for the streaming AUROC (default 256)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per chunk (default: about 16M codes)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    top: int = typer.Option(20, "--top", help="Classes to show (best AUROC first)."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options (command-line values win)."),
) -> None:
    """Name features: for every feature and class, the AUROC and best F1 of the feature's patch (or image: max over patches) activations for 'this is class c'; writes each feature's best class and each class's best feature to the index."""
    from saevctl.config import load_toml, merge_config
    from saevctl.console import console, progress_bar, say_path
    from saevctl.mine import label as labelling

    labelling.upgrade_index(workspace.index_or_default(index))  # an index mined before labels existed
    idx, sae_id = _open(index, sae)
    idx.close()
    given = {"sae": sae or sae_id, "store": store, "index": idx.fpath, "level": level, "n_bins": bins,
             "thresholds": tuple(_floats(thresholds)) if thresholds else None, "batch_size": batch_size, "device": device}
    cfg = merge_config(labelling.Config, load_toml(config) if config else {}, given)
    with progress_bar("label", None, "img") as advance:
        result = labelling.run(cfg, progress=advance, on_total=advance.set_total)
    for lv in result.levels.values():
        _label_table(console, lv, top)
    say_path("index", result.index.resolve())
    console.print(f"next: saevctl features list --label \"{_example_class(result)}\"   ·   saevctl sql \"SELECT * FROM class_features\"")


def _floats(text: str) -> list[float]:
    from saevctl.errors import InputError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise InputError(f"bad --thresholds {text!r}", "write fractions of the max separated by commas, e.g. 0,0.1,0.3") from e


def _label_table(console: Any, lv: Any, top: int) -> None:
    from rich.table import Table

    unit = "patches" if lv.level == "patch" else "images"
    t = Table(title=f"{lv.level} level: best feature per class ({lv.n_items:,} labelled {unit})")
    for col in ("class", "positives", "feature", "AUROC", "F1", "threshold"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in lv.classes[:top]:
        t.add_row(str(r["class_name"]), f"{r['n_positive']:,}", str(r["feature"]), f"{r['auroc']:.3f}",
                  f"{r['f1']:.3f}", _fmt(r["threshold"]))
    console.print(t)
    cov = " · ".join(f"AUROC >= {k:g}: {v:.0%}" for k, v in lv.coverage.items())
    console.print(f"{lv.level} level, {min(top, len(lv.classes))} of {lv.n_classes} classes shown; "
                  f"classes with a feature at {cov}; AUROC binning error <= {lv.max_error:.1e}", highlight=False)


def _example_class(result: Any) -> str:
    for lv in result.levels.values():
        if lv.classes:
            return str(lv.classes[0]["class_name"]).replace('"', "")
    return "CLASS"


@features_app.command("match")
def match(
    id: int = typer.Option(..., "--id", help="Feature id in the --from SAE."),
    from_: str = typer.Option(None, "--from", help="SAE the feature belongs to (default: the workspace's SAE)."),
    to: str = typer.Option(..., "--to", help="SAE to search in (id or checkpoint path)."),
    n: int = typer.Option(10, "--n", help="How many matches."),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
) -> None:
    """The closest features in another SAE: decoder cosine for the same model and layer; otherwise the features of B that fire most on A's top images versus all other images (both sides' exemplars in the PNG)."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures, query

    idx, sae_a = _open(index, from_)
    with idx:
        sae_b = idx.resolve_sae(to)
        res = query.match(idx, sae_a, id, sae_b, n)
        shared = f", over {res.n_shared_images} shared exemplar images" if res.n_shared_images else ""
        console.print(f"{sae_a} feature {id} matched in {sae_b} by {res.method}{shared}")
        t = Table(title=f"closest in {sae_b}")
        t.add_column("feature", justify="right")
        t.add_column("score", justify="right")
        t.add_column("max", justify="right")
        for m in res.matches:
            t.add_row(str(m["feature"]), f"{m['score']:.3f}", _fmt(idx.feature_stats(sae_b, m["feature"])["max"]))
        console.print(t)
        best = res.matches[0]["feature"] if res.matches else None
        say_path("match", figures.match_figure(idx, sae_a, id, sae_b, best, layout.match_fpath(idx.fpath, sae_a, id, sae_b)))


@features_app.command("search")
def search(
    image: str = typer.Option(..., "--image", help="Image file to run through the model and the SAE."),
    patches: str = typer.Option(None, "--patches", help="Patches to sum over as row,col pairs: \"3,4;3,5\" (default: all)."),
    box: str = typer.Option(None, "--box", help="Box x0,y0,x1,y1 in pixels of the model's square input (see the PNG)."),
    n: int = typer.Option(8, "--n", help="How many features."),
    sae: str = typer.Option(None, "--sae", help=SAE_HELP),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
) -> None:
    """Which features fire on (part of) an image, each with its exemplars: the paper's Figure 2."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.mine import figures, query

    idx, sae_id = _open(index, sae)
    with idx:
        res = query.search_image(idx, sae_id, image, patches, box, n)
        t = Table(title=f"top features on {len(res.selected)} patch(es) of {image}")
        for col in ("feature", "sum", "patches fired", "freq", "max"):
            t.add_column(col, justify="right")
        for f, v in res.features:
            st = idx.feature_stats(sae_id, f)
            fired = int((res.codes_ps[res.selected, f] > 0).sum())
            t.add_row(str(f), f"{v:.4g}", f"{fired}/{len(res.selected)}", _fmt(st["freq"]), _fmt(st["max"]))
        console.print(t)
        say_path("search", figures.search_figure(idx, res, layout.search_fpath(idx.fpath, sae_id, Path(image).stem)))


def sql(
    query: str = typer.Argument(..., help="One SELECT statement over the index's tables (see docs/disk-layout.md)."),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
    max_rows: int = typer.Option(100, "--max-rows", help="Rows to print."),
) -> None:
    """Read-only SQL on the index, printed as a table; writes and file access are refused."""
    from rich.table import Table

    from saevctl.console import console
    from saevctl.mine.index import Index

    with Index.open(workspace.index_or_default(index)) as idx:
        console.print(f"[dim]index {idx.fpath}[/]")
        cols, rows, truncated = idx.query(query, max_rows)
    t = Table(caption=f"first {max_rows} rows shown" if truncated else f"{len(rows)} rows")
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(_fmt(v) if not isinstance(v, bytes) else f"<{len(v)} bytes>" for v in r))
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("mine")(mine)
    app.add_typer(features_app, name="features")
    app.command("sql")(sql)
