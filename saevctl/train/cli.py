"""`saevctl train`: parse options (or --config sweep.toml), build the Config, run, print a table and plot paths."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from saevctl.train.config import Config
    from saevctl.train.loop import Result


app = typer.Typer()


def _configs() -> ModuleType:
    """The stage's Config module, imported only when one of its commands is built (see saevctl.cliconfig)."""
    from saevctl.train import config

    return config


@config_command(app, "train", lambda: _configs().Config)
def train(cfg: Config) -> None:
    """Train sparse autoencoders on a stored layer; every combination of the listed values in one data pass.
    Multi-process: torchrun --nproc-per-node N -m saevctl train ... (see docs/train.md)."""
    from saevctl.console import say_path
    from saevctl.dist import is_main, shutdown

    if not is_main():  # under torchrun only rank 0 shows the bar and the summary
        from saevctl.train import run

        run(cfg)
        shutdown()
        return
    result = _run_with_bar(cfg)
    shutdown()
    _summary(result)
    for png in result.plots:
        say_path("plot", png)
    say_path("sweep", cfg.out / "sweep.json")
    for r in result.runs:
        say_path("sae", r["path"])


def _run_with_bar(cfg: Config) -> Result:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from saevctl.console import RateColumn, err_console
    from saevctl.train import run

    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), RateColumn("step"),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}")]
    prog = Progress(*cols, console=err_console)
    task = prog.add_task("train", total=None, metrics="")

    def on_total(n_steps: int, n_saes: int) -> None:
        # The bar appears only once the data is open, so a set-up error is the first and only line on stderr.
        prog.update(task, total=n_steps, metrics=f"{n_saes} SAE(s)")
        prog.start()

    def progress(n: int, records: list[dict[str, Any]] | None) -> None:
        if not records:
            prog.update(task, advance=n)
            return
        r = records[0]
        more = f" (+{len(records) - 1} more)" if len(records) > 1 else ""
        prog.update(task, advance=n, metrics=f"{r['run']}: fvu {r['fvu']:.3f} L0 {r['l0']:.1f} "
                                             f"dead {r['dead']:.1%} dense {r['dense']:.1%}{more}")

    try:
        result = run(cfg, progress=progress, on_total=on_total)
    except BaseException:
        if prog.live.is_started:
            prog.live.transient = True  # the error, not a half bar, is what stays on the screen
            prog.stop()
        raise
    if result.resumed_from == result.n_steps:
        prog.update(task, total=result.n_steps, completed=result.n_steps, metrics="already complete")
    if prog.live.is_started:
        prog.stop()
    return result


def _num(final: dict[str, Any], key: str, fmt: str) -> str:
    return format(final[key], fmt) if key in final else "-"


def _summary(result: Result) -> None:
    from rich.table import Table

    from saevctl.console import console

    t = Table(title=f"SAEs trained ({result.n_steps:,} steps" + (
        f", resumed at {result.resumed_from:,})" if result.resumed_from else ")"))
    for col in ("run", "width", "lr", "L1 / k", "MSE", "FVU", "L0", "dead", "dense"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in result.runs:
        f = r.get("final") or {}
        knob = f"{r['sparsity']:g}" if r["activation"] == "relu" else f"k={r['k']}"
        t.add_row(r["name"], f"{r['n_latents']:,}", f"{r['lr']:g}", knob, _num(f, "mse", ".4f"),
                  _num(f, "fvu", ".4f"), _num(f, "l0", ".1f"), _num(f, "dead", ".1%"), _num(f, "dense", ".1%"))
    console.print(t)


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
