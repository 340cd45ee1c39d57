"""docs/cli.md is generated from --help and must match the current CLI (regenerate: python -m saevctl.clidoc)."""

from pathlib import Path

from saevctl.clidoc import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `python -m saevctl.clidoc > docs/cli.md`"


def test_every_command_is_documented():
    text = render()
    for command in ("saevctl extract",):
        assert f"## `{command}`" in text
