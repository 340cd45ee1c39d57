"""The root `saevctl` command: registers each stage's CLI and turns user errors into one line and exit 2.

Importing this module must stay cheap: stage CLIs import torch only inside their commands.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

import saevctl
from saevctl.errors import SaevctlError
from saevctl.eval import cli as eval_cli
from saevctl.extract import cli as extract_cli
from saevctl.mine import cli as mine_cli
from saevctl.probe import cli as probe_cli
from saevctl.report import cli as report_cli
from saevctl.sae import cli as sae_cli
from saevctl.train import cli as train_cli

class _Group(typer.core.TyperGroup):
    """Runs subcommands, turning SaevctlError into one stderr line and exit 2 (tracebacks with --debug)."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except SaevctlError as e:
            if ctx.params.get("debug") or os.environ.get("SAEVCTL_DEBUG") == "1":
                raise
            typer.echo(f"error: {e.one_line()}", err=True)
            ctx.exit(2)
        except MemoryError:
            if ctx.params.get("debug"):
                raise
            typer.echo("error: out of memory. Use a smaller --batch-size or fewer images per step.", err=True)
            ctx.exit(2)
        return None


app = typer.Typer(
    cls=_Group,
    name="saevctl",
    help=(
        "Make vision transformers interpretable and testable with sparse autoencoders: "
        "extract activations, train SAEs, mine features, and test them with causal probes."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"saevctl {saevctl.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
) -> None:
    """saevctl: sparse autoencoders for vision transformers."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


# The stages' command-line faces, in the pipeline's order; each adds its commands to the root.
for stage_cli in (extract_cli, train_cli, sae_cli, mine_cli, report_cli, probe_cli, eval_cli):
    stage_cli.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (the group itself maps user errors to exit 2)."""
    command = typer.main.get_command(app)
    command.main(args=sys.argv[1:] if argv is None else argv, prog_name="saevctl")
