"""README's demo transcript (written by `python tools/demo.py --readme` from a real run) must show the demo's
commands as tools/demo.py runs them today, with options the CLI has, and tables whose titles, columns and row
names the code still prints (values and timings may differ from run to run)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "saevctl").rglob("*.py")))


def _demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_steps", ROOT / "tools" / "demo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_steps"] = mod
    spec.loader.exec_module(mod)
    return mod


DEMO = _demo()


def transcript() -> list[tuple[list[str], list[str]]]:
    """(command arguments after `saevctl`, output lines) of every command in README's transcript."""
    text = (ROOT / "README.md").read_text()
    body = text.split(DEMO.BEGIN, 1)[1].split(DEMO.END, 1)[0]
    out: list[tuple[list[str], list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ saevctl "):
            out.append((shlex.split(line.removeprefix("$ saevctl ")), []))
        elif out and not line.startswith("```"):
            out[-1][1].append(line)
    return out


def _click_command(args: list[str]) -> tuple[Any, list[str]]:
    """The (sub)command the arguments name, and the arguments after its name."""
    import click
    import typer.main

    from saevctl.cli import app

    cmd = typer.main.get_command(app)
    ctx = click.Context(cmd)
    while hasattr(cmd, "get_command") and args and (sub := cmd.get_command(ctx, args[0])) is not None:
        cmd, args, ctx = sub, args[1:], click.Context(sub)
    return cmd, args


def test_transcript_runs_the_demo_steps_in_order() -> None:
    shown = transcript()
    assert len(shown) == len(DEMO.STEPS), [c for c, _ in shown]
    picked: dict[str, str] = {}
    for (args, _), step in zip(shown, DEMO.STEPS, strict=True):
        tmpl = shlex.split(step)
        assert len(args) == len(tmpl), (args, step)
        for got, want in zip(args, tmpl, strict=True):
            pattern = re.escape(want)
            for key in ("feature", "present", "absent"):
                pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>.+)")
            m = re.fullmatch(pattern, got)
            assert m, (got, want)
            for key, value in m.groupdict().items():
                assert picked.setdefault(key, value) == value, (key, value, picked)
    assert picked["feature"].isdigit() and picked["present"] != picked["absent"]


@pytest.mark.parametrize("index", range(len(DEMO.STEPS)))
def test_every_option_shown_exists(index: int) -> None:
    args, _ = transcript()[index]
    cmd, rest = _click_command(args)
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    used = [a.split("=")[0] for a in rest if a.startswith("-")]
    assert set(used) <= opts, (args, sorted(set(used) - opts))


def _literal(text: str) -> bool:
    """Whether the code holds `text` in a string literal (a column, a row name, a title's words)."""
    return re.search(r"[\"'][^\"'\n]*" + re.escape(text) + r"[^\"'\n]*[\"']", SOURCE) is not None


def _cells(line: str, sep: str) -> list[str]:
    return [c.strip() for c in line.strip().strip(sep).split(sep) if c.strip()]


def test_tables_show_names_the_code_prints() -> None:
    missing = []
    for args, lines in transcript():
        for i, line in enumerate(lines):
            if line.startswith("┃") and i and lines[i - 1].startswith("┏"):  # a header row
                missing += [(args[0], c) for c in _cells(line, "┃") if not _literal(c)]
            elif line.startswith("│") and i and lines[i - 1].startswith("┌"):  # a key-value table's first row name
                first = _cells(line, "│")[0]
                missing += [] if _literal(first) else [(args[0], first)]
            elif m := re.fullmatch(r"([a-z][a-z ]*): (\S+)", line):  # `grid: PATH`, `card data: PATH` (say_path)
                missing += [] if _literal(m.group(1)) else [(args[0], m.group(1))]
    assert not missing, f"README shows names the code no longer prints (run python tools/demo.py --readme): {missing}"


def test_design_card_example_is_in_the_transcript() -> None:
    assert ["features", "top", "--id", "6909"] in [a for a, _ in transcript()]
    out = next(lines for a, lines in transcript() if a == ["features", "top", "--id", "6909"])
    assert any("feature 6909" in line for line in out), out
