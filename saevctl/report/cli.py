"""`saevctl report`: options (or --config x.toml) fill the Config, run with a progress bar, print where the site is.

Heavy imports happen inside the command, so `saevctl --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from rich.console import Console

    from saevctl.report.config import Config
    from saevctl.report.pipeline import Result

app = typer.Typer()


def _configs() -> ModuleType:
    """The stage's Config module, imported only when one of its commands is built (see saevctl.cliconfig)."""
    from saevctl.report import config

    return config


@config_command(app, "report", lambda: _configs().Config)
def report(cfg: Config) -> None:
    """Write a static HTML feature browser that opens from disk with no server: an index page with a sortable,
    filterable table of every feature that fired (per SAE), and one page per feature with its exemplar grid,
    activation histogram and nearest features."""
    from rich.markup import escape

    from saevctl.console import console, progress_bar, say_path
    from saevctl.report.pipeline import run

    with progress_bar("report", None, "page") as advance:

        def on_total(index: Path, total: int) -> None:
            console.print(f"[dim]index {escape(str(index))}[/]")
            if total > 5000 and cfg.image_format == "png":
                console.print(f"[dim]{total:,} pages to draw; "
                              "--format jpeg draws them about 4x faster and 5x smaller[/]")
            advance.set_total(total)

        result = run(cfg, progress=advance, on_total=on_total)
    if result.unchanged:
        console.print("unchanged: the site was built from the same index content, report cards and options "
                      "(--force builds it again)")
    _summary(console, result)
    say_path("report", result.index_html)


def _summary(console: Console, result: Result) -> None:
    from rich.table import Table

    t = Table(title=f"feature report ({result.seconds:.1f} s)")
    for name in ("SAE", "features", "pages", "never fired (skipped)"):
        t.add_column(name, justify="left" if name == "SAE" else "right")
    for s in result.saes:
        t.add_row(s["sae_id"], f"{s['n_latents']:,}", f"{s['n_pages']:,}", f"{s['n_skipped']:,}")
    console.print(t)


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
