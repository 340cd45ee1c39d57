"""Terminal output shared by the CLI modules only (library code never imports this): console, progress bars.

Keeps rich imports and styling in one place so every command looks and behaves the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second with the unit name."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class Advance:
    """`advance(n)` moves a bar on; `advance.set_total(n)` sets its total, for a library call that learns the
    total only after listing its input (pass both to `run(cfg, progress=advance, on_total=advance.set_total)`)."""

    def __init__(self, prog: Progress, task: TaskID) -> None:
        self.prog, self.task = prog, task

    def __call__(self, n: int) -> None:
        if not self.prog.live.is_started:
            self.prog.start()
        self.prog.advance(self.task, n)

    def set_total(self, n: int) -> None:
        self.prog.update(self.task, total=n)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str) -> Iterator[Advance]:
    """A rich progress bar with a rate; yields an `Advance`. It appears at the first advance, so set-up
    errors (bad model, bad folder) print alone."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeRemainingColumn(),
    ]
    prog = Progress(*columns, console=err_console, transient=False)
    task = prog.add_task(description, total=total)
    try:
        yield Advance(prog, task)
    except BaseException:
        # On failure the bar vanishes so the error is the only thing left on stderr.
        if prog.live.is_started:
            prog.live.transient = True
            prog.live.stop()  # not prog.stop(): piped, that adds a blank line before the one-line error
        raise
    if prog.live.is_started:
        prog.stop()


def say_path(label: str, path: object) -> None:
    """Print where an artifact was written, in one recognisable style."""
    # soft_wrap keeps a long path on one line, so it can be copied even from a narrow or piped terminal.
    console.print(f"[bold green]{label}:[/] {path}", soft_wrap=True, highlight=False)
