"""The Config is the CLI: options, help, defaults and TOML files all come from a Config's typed, documented fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

import saevctl.cli  # noqa: F401  (registers every command)
from saevctl.cliconfig import REGISTERED, config_command, help_text, load_config
from saevctl.config import ConfigBase, DeviceOpts, check_finite, field_docs, field_docs_ast, field_specs, opt
from saevctl.errors import InputError


@dataclass(frozen=True)
class Toy(DeviceOpts):
    name: str
    """The toy's name."""
    size: int = opt(3, short="-n")
    """How big."""
    rates: tuple[float, ...] = (0.1, 0.2)
    """Rates, a comma list."""
    mode: Literal["fast", "slow"] = "fast"
    """fast or slow."""
    out: Path | None = None
    """Where to write (default: nowhere)."""
    loud: bool = False
    """Shout."""

    def check(self) -> None:
        super().check()
        check_finite("rates", max(self.rates), low=0, low_open=True)


def test_every_registered_command_documents_every_option():
    assert len(REGISTERED) >= 1
    for name, ref in REGISTERED.items():
        cls = load_config(ref)
        specs = field_specs(cls)
        assert specs, name
        assert field_docs(cls) == field_docs_ast(cls), f"{name}: fast docstring reader disagrees with ast"
        undocumented = [s.name for s in specs if not s.doc and not s.cli.hidden]
        assert not undocumented, f"{name}: fields without a docstring: {undocumented}"


def test_fields_are_coerced_and_checked_in_one_place():
    t = Toy(name="a", size="7", rates="0.5, 1e-3", out="~/x")  # type: ignore[arg-type]  # as TOML/CLI give them
    assert (t.size, t.rates, t.out) == (7, (0.5, 1e-3), Path("~/x").expanduser())
    with pytest.raises(InputError, match="unknown --mode 'medium'"):
        Toy(name="a", mode="medium")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="bad --size 'many'"):
        Toy(name="a", size="many")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="not a finite number"):
        Toy(name="a", rates=(float("inf"),))
    with pytest.raises(InputError, match="out of range"):
        Toy(name="a", rates=(0.0,))
    assert dataclasses.replace(t, size=9).size == 9


def test_help_comes_from_docstrings_with_defaults():
    specs = {s.name: s for s in field_specs(Toy)}
    assert help_text(specs["size"]) == "How big (default 3)."
    assert help_text(specs["rates"]) == "Rates, a comma list (default 0.1,0.2)."
    assert help_text(specs["out"]) == "Where to write (default: nowhere)."
    assert [s.name for s in field_specs(Toy)][-1] == "device"  # own fields first, shared ones after


def _toy_app(seen: list[Toy]) -> typer.Typer:
    app = typer.Typer()

    @config_command(app, "toy", Toy)
    def toy(cfg: Toy) -> None:
        seen.append(cfg)

    @app.command("other")
    def other() -> None:  # a second command keeps typer from collapsing the group
        pass

    return app


def test_cli_and_toml_fill_the_same_config(tmp_path):
    seen: list[Toy] = []
    app = _toy_app(seen)
    toml = tmp_path / "toy.toml"
    toml.write_text('name = "from-file"\nsize = 5\nrates = [0.3]\n')
    r = CliRunner().invoke(app, ["toy", "--config", str(toml), "-n", "8", "--mode", "slow", "--loud"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == Toy(name="from-file", size=8, rates=(0.3,), mode="slow", loud=True)
    r = CliRunner().invoke(app, ["toy", "--name", "x", "--rates", "0.1,0.4"])
    assert r.exit_code == 0, r.output
    assert seen[-1].rates == (0.1, 0.4)
    r = CliRunner().invoke(app, ["toy", "--help"])
    assert "How big (default 3)." in " ".join(r.output.split()) and "fast|slow" in r.output


def test_a_missing_required_option_is_one_line():
    r = CliRunner().invoke(_toy_app([]), ["toy"])
    assert r.exit_code != 0 and isinstance(r.exception, InputError)
    assert "missing --name" in str(r.exception)


@dataclass(frozen=True)
class Positional(ConfigBase):
    src: Path = opt(argument=True)
    """Where from."""
    tags: tuple[str, ...] = opt((), flag="--tag", repeat=True)
    """Tags, repeatable or a comma list."""
    layers: tuple[int, ...] = (1,)
    """A comma list; repeating it keeps the last, as for any option."""


def test_positional_arguments_and_repeatable_lists():
    seen: list[Positional] = []
    app = typer.Typer()

    @config_command(app, "pos", Positional)
    def pos(cfg: Positional) -> None:
        seen.append(cfg)

    @app.command("other")
    def other() -> None:
        pass

    r = CliRunner().invoke(app, ["pos", "a.pt", "--tag", "x", "--tag", "y,z", "--layers", "3", "--layers", "4,5"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == Positional(src=Path("a.pt"), tags=("x", "y", "z"), layers=(4, 5))
    r = CliRunner().invoke(app, ["pos"])
    assert r.exit_code == 2 and "Missing argument" in r.output
