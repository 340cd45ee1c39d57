"""`saevctl serve`: options (or --config x.toml) fill the Config; load once, print where to point the browser, serve
until Ctrl-C. Heavy imports happen inside the command, so `saevctl --help` stays fast.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from saevctl.serve.config import Config

app = typer.Typer()


def _configs() -> ModuleType:
    """The stage's Config module, imported only when its command is built (see saevctl.cliconfig)."""
    from saevctl.serve import config

    return config


@config_command(app, "serve", lambda: _configs().Config)
def serve(cfg: Config) -> None:
    """Explore an SAE in the browser: pick or upload an image, select patches to list the features that fire there
    (the paper's Figure 2), open a feature's page, clamp features and compare the head's output before and after,
    with controls. Every view has a permalink and a copy-as-CLI command."""
    from rich.markup import escape

    from saevctl.console import console
    from saevctl.serve.server import run

    def on_status(text: str) -> None:
        console.print(f"[dim]loading {escape(text)}[/]")

    def on_ready(url: str, who: str) -> None:
        console.print(f"serving [bold]{escape(url)}[/]", soft_wrap=True)
        console.print(f"{escape(who)}. Ctrl-C stops it.", soft_wrap=True)

    run(cfg, on_status=on_status, on_ready=on_ready)


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
