"""`saevctl report`: parse options (or --config x.toml), build the Config, run with a progress bar, print where
the site is. Heavy imports happen inside the command, so `saevctl --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def report(
    index: Path = typer.Option(None, "--index", help="DuckDB index to report on (default: the one last mined in this workspace, recorded in ./saevctl.toml, else in $SAEVCTL_HOME/last.toml)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder of the site; an earlier report there is replaced as a whole (default ./report)."),
    sae: list[str] = typer.Option(None, "--sae", metavar="SAE", help="Only this SAE (id, id prefix or checkpoint path); repeat for several (default: every SAE in the index)."),
    k: int = typer.Option(None, "--k", help="Exemplars per feature grid (default: all the index keeps)."),
    cols: int = typer.Option(None, "--cols", help="Tiles per grid row (default 5)."),
    neighbours: int = typer.Option(None, "--neighbours", help="Nearest features by decoder cosine listed per page (default 10)."),
    workers: int = typer.Option(None, "--workers", help="Drawing processes; 0 draws in this process (default: one per core up to 8, none for small reports)."),
    max_features: int = typer.Option(None, "--max-features", help="Pages only for the N most frequent live features per SAE (default: every live feature)."),
    image_format: str = typer.Option(None, "--format", help="png (default) or jpeg (much smaller for large SAEs)."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options (command-line values win)."),
) -> None:
    """Write a static HTML feature browser that opens from disk with no server: an index page with a sortable, filterable table of every feature that fired (per SAE), and one page per feature with its exemplar grid, activation histogram and nearest features."""
    from saevctl.config import load_toml, merge_config
    from saevctl.console import console, progress_bar, say_path
    from saevctl.report import Config, count_pages, run
    from saevctl.report.pipeline import resolve_index

    given: dict[str, Any] = {
        "index": index, "out": out, "saes": tuple(sae) if sae else None, "k": k, "cols": cols,
        "neighbours": neighbours, "workers": workers, "image_format": image_format, "max_features": max_features,
    }
    cfg = merge_config(Config, load_toml(config) if config else {}, given)
    from rich.markup import escape

    console.print(f"[dim]index {escape(str(resolve_index(cfg.index)))}[/]")
    total = count_pages(cfg)
    if total > 5000 and cfg.image_format == "png":
        console.print(f"[dim]{total:,} pages to draw; --format jpeg draws them about 4x faster and 5x smaller[/]")
    with progress_bar("report", total, "page") as advance:
        result = run(cfg, progress=advance)
    _summary(console, result)
    say_path("report", result.index_html)


def _summary(console: Any, result: Any) -> None:
    from rich.table import Table

    t = Table(title=f"feature report ({result.seconds:.1f} s)")
    for name in ("SAE", "features", "pages", "never fired (skipped)"):
        t.add_column(name, justify="left" if name == "SAE" else "right")
    for s in result.saes:
        t.add_row(s["sae_id"], f"{s['n_latents']:,}", f"{s['n_pages']:,}", f"{s['n_skipped']:,}")
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
