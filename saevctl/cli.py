"""The root `saevctl` command: registers each stage's CLI and turns user errors into one line and exit 2.

Importing this module must stay cheap: stage CLIs import torch only inside their commands.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors click

import saevctl
from saevctl.cliconfig import reflow
from saevctl.errors import SaevctlError, from_os_error
from saevctl.eval import cli as eval_cli
from saevctl.extract import cli as extract_cli
from saevctl.mine import cli as mine_cli
from saevctl.probe import cli as probe_cli
from saevctl.report import cli as report_cli
from saevctl.sae import cli as sae_cli
from saevctl.serve import cli as serve_cli
from saevctl.train import cli as train_cli

if TYPE_CHECKING:
    # typer vendors click; TyperGroup's methods receive its plain Context, Command and HelpFormatter
    from typer._click.core import Command, Context
    from typer._click.formatting import HelpFormatter


# The stages' commands, in the pipeline's order (each stage CLI adds its commands and groups here). They are built
# into click commands one at a time, on demand, so `saevctl X` loads only X's Config and options.
STAGES = typer.Typer()
for stage_cli in (extract_cli, train_cli, sae_cli, mine_cli, report_cli, probe_cli, eval_cli, serve_cli):
    stage_cli.register(STAGES)


class _Group(typer.core.TyperGroup):
    """The root command: builds a stage's command only when it is run (a light stand-in lists it in --help), and
    turns SaevctlError (and any OSError: disk full, read-only, permissions) into one stderr line and exit 2
    (tracebacks with --debug)."""

    _listing = False
    _built: dict[str, Command] | None = None

    def list_commands(self, ctx: Context) -> list[str]:
        return [*(str(c.name) for c in STAGES.registered_commands), *(str(g.name) for g in STAGES.registered_groups)]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if self._listing:
            return _stand_in(cmd_name)
        self._built = self._built if self._built is not None else {}
        if cmd_name not in self._built:
            built = _build(cmd_name)
            if built is None:
                return None
            self._built[cmd_name] = built
        return self._built[cmd_name]

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            _usage_exit(e, ctx)
            raise  # not reached: --help for no arguments

    def invoke(self, ctx: Context) -> object:
        try:
            return super().invoke(ctx)
        except UsageError as e:  # an unknown option or command, a value click itself cannot parse
            _usage_exit(e, ctx)
            raise
        except SaevctlError as e:
            if ctx.params.get("debug") or os.environ.get("SAEVCTL_DEBUG") == "1":
                raise
            typer.echo(f"error: {e.one_line()}", err=True)
            _error_exit(ctx)
        except MemoryError:
            if ctx.params.get("debug"):
                raise
            typer.echo("error: out of memory. Use a smaller --batch-size or fewer images per step.", err=True)
            _error_exit(ctx)
        except OSError as e:  # disk full, read-only, permissions, I/O errors: one line naming the path and the fix
            if ctx.params.get("debug") or os.environ.get("SAEVCTL_DEBUG") == "1":
                raise
            typer.echo(f"error: {from_os_error(e).one_line()}", err=True)
            _error_exit(ctx)
        return None


def _error_exit(ctx: Context) -> None:
    """Exit 2 after a one-line error; a rank of a multi-process run exits at once (saevctl.dist)."""
    from saevctl.dist import exit_now_if_grouped

    exit_now_if_grouped(2)
    ctx.exit(2)


def _usage_exit(e: UsageError, ctx: Context) -> None:
    """Click's own usage errors as one line and exit 2, like every other bad input (no-arguments help is kept)."""
    if isinstance(e, NoArgsIsHelpError):
        return
    where = e.ctx.command_path if e.ctx is not None else "saevctl"
    message = " ".join(e.format_message().split()).rstrip(".")
    typer.echo(f"error: {message}. Run '{where} --help' for the options.", err=True)
    ctx.exit(2)


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


def _version(value: bool) -> bool:
    if value:
        typer.echo(f"saevctl {saevctl.__version__}")
        raise typer.Exit()
    return value  # what `root` receives as `version`


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


def _build(name: str) -> Command | None:
    """The click command (or group) of one stage command, with its options."""
    for info in STAGES.registered_commands:
        if info.name == name:
            return typer.main.get_command_from_info(info, pretty_exceptions_short=app.pretty_exceptions_short,
                                                    rich_markup_mode=app.rich_markup_mode)
    for group in STAGES.registered_groups:
        if group.name == name:
            return typer.main.get_group_from_info(group, pretty_exceptions_short=app.pretty_exceptions_short,
                                                  suggest_commands=True, rich_markup_mode=app.rich_markup_mode)
    return None


def _stand_in(name: str) -> Command | None:
    """A command with only its name and help, for the root's --help list (no options built)."""
    for info in STAGES.registered_commands:
        if info.name == name:
            doc = info.help or getattr(info.callback, "__doc__", None) or ""
            return typer.core.TyperCommand(name=name, help=reflow(doc), hidden=info.hidden)
    for group in STAGES.registered_groups:
        if group.name == name:
            return typer.core.TyperGroup(name=name, help=typer.main.solve_typer_info_help(group))
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point (the group itself maps user errors to exit 2)."""
    command = typer.main.get_command(app)
    command.main(args=sys.argv[1:] if argv is None else argv, prog_name="saevctl")
