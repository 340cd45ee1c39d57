"""Render docs/cli.md from the CLI's own `--help` output, so the reference cannot drift from the code.

`python -m saevctl.clidoc > docs/cli.md` regenerates it; tests/test_cli_docs.py checks it is current.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


def _walk(cmd: Any, path: list[str]) -> Iterator[list[str]]:
    import typer

    yield path
    if hasattr(cmd, "list_commands"):  # a group (typer vendors its own click, so no isinstance check)
        ctx = typer.Context(cmd)
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, [*path, name])


def render() -> str:
    """Markdown with one section per command, each holding its plain-text --help."""
    os.environ["TERMINAL_WIDTH"] = "100"
    os.environ["NO_COLOR"] = "1"
    import typer.main
    from typer.testing import CliRunner

    from saevctl.cli import app

    root = typer.main.get_command(app)
    runner = CliRunner()
    out = ["# saevctl command reference", "", "Generated from `--help` by `python -m saevctl.clidoc`; do not edit.", ""]
    for path in _walk(root, []):
        res = runner.invoke(app, [*path, "--help"], env={"TERMINAL_WIDTH": "100", "NO_COLOR": "1", "COLUMNS": "100"})
        assert res.exit_code == 0, (path, res.output)
        title = " ".join(["saevctl", *path])
        text = "\n".join(line.rstrip() for line in res.output.strip("\n").splitlines())
        out += [f"## `{title}`", "", "```text", text, "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
