"""Terminal output shared by the CLI modules only (library code never imports this): console, progress bars.

Keeps rich imports and styling in one place so every command looks and behaves the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import ProgressColumn, Task
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


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with a rate; yields `advance(n)`. It appears at the first advance, so set-up
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

    def advance(n: int) -> None:
        if not prog.live.is_started:
            prog.start()
        prog.advance(task, n)

    # A library call that learns the total only after listing its input sets it here.
    advance.set_total = lambda n: prog.update(task, total=n)  # type: ignore[attr-defined]

    try:
        yield advance
    except BaseException:
        # On failure the bar vanishes so the error is the only thing left on stderr.
        if prog.live.is_started:
            prog.live.transient = True
            prog.stop()
        raise
    if prog.live.is_started:
        prog.stop()


def say_path(label: str, path: object) -> None:
    """Print where an artifact was written, in one recognisable style."""
    # soft_wrap keeps a long path on one line, so it can be copied even from a narrow or piped terminal.
    console.print(f"[bold green]{label}:[/] {path}", soft_wrap=True, highlight=False)
