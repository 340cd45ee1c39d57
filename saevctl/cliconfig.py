"""The Config is the CLI: turns a stage Config's typed, documented fields into typer options, one adapter for all.

`@config_command(app, "train", Config)` gives `saevctl train` one option per field (help from the field's docstring,
default from its default) plus `--config FILE.toml`; the command body receives the built, checked Config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from saevctl.config import FieldSpec, field_specs, load_toml, merge_config

C = TypeVar("C")
CONFIG_HELP = "TOML file with any of these options (command-line values win; a list is a sweep axis where one sweeps)."
REGISTERED: dict[str, ConfigRef] = {}
"""Every command made from a Config, by its name (the tests check each one's help against its docstrings)."""
_PY_TYPES = {"path": Path, "int": int, "float": float, "str": str, "bool": bool}


def _default_text(spec: FieldSpec) -> str | None:
    if spec.cli.default_text is not None:
        return spec.cli.default_text
    d = spec.default
    if spec.required or d is None or d is False or d == () or (spec.kind == "bool" and d is False):
        return None
    if isinstance(d, Path):
        return str(d) if d.is_absolute() or str(d).startswith(".") else f"./{d}"
    if isinstance(d, tuple):
        return ",".join(str(v) for v in d)
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, int) and abs(d) >= 10_000:
        return f"{d:,}"
    return f"{d:g}" if isinstance(d, float) else str(d)


def help_text(spec: FieldSpec) -> str:
    """The field's docstring, with its default unless the docstring already says it."""
    text = spec.doc or spec.name.replace("_", " ")
    shown = _default_text(spec)
    if shown is not None and "default" not in text.lower():
        text = f"{text.rstrip('.')} (default {shown})."
    return text


def _parameter(spec: FieldSpec) -> inspect.Parameter:
    names = [*(spec.cli.flag or spec.flag).split(" "), *([spec.cli.short] if spec.cli.short else [])]
    # A list field is a comma list (--layers 6,11); with `repeat` also a repeatable option (--sae a --sae b,c).
    # Without it a repeated option keeps its last value, as every option always has (scripts rely on it).
    annotation: Any = (list[str] if spec.many and spec.cli.repeat else str if (spec.many or spec.choices)
                       and spec.kind != "bool" else _PY_TYPES[spec.kind])
    metavar = "|".join(spec.choices) if spec.choices and not spec.many else None
    if spec.many:
        metavar = f"{spec.kind.upper()},..." if not spec.choices else ",".join(spec.choices[:2]) + ",..."
    if spec.cli.argument:
        arg = typer.Argument(... if spec.required else None, help=help_text(spec), show_default=False,
                             metavar=metavar, hidden=spec.cli.hidden)
        return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=arg, annotation=annotation)
    info = typer.Option(None, *names, help=help_text(spec), show_default=False, metavar=metavar,
                        hidden=spec.cli.hidden)
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def build_config(cls: type[C], given: dict[str, Any], config: Path | None) -> C:
    """The Config from a TOML file (if any) overridden by the options given on the command line."""
    return merge_config(cls, load_toml(config) if config else {}, given)


ConfigRef = type[Any] | Callable[[], type[Any]]
"""A Config class, or a function importing and returning it (so a stage's Config loads only when its command runs)."""


def load_config(ref: ConfigRef) -> type[Any]:
    """The Config class a command was registered with."""
    return ref if isinstance(ref, type) else ref()


def reflow(doc: str) -> str:
    """A docstring as --help shows it: paragraphs kept, the line breaks inside them (from wrapping source lines at
    120 columns) dropped, so the terminal wraps the text to its own width."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


class ConfigCommand:
    """The callback typer registers: its signature (one option per Config field, the function's own options,
    --config) is built on first use, so starting `saevctl` never imports the Configs of commands it does not run."""

    def __init__(self, fn: Callable[..., None], ref: ConfigRef) -> None:
        self.fn, self.ref = fn, ref
        self.__name__, self.__qualname__ = fn.__name__, fn.__qualname__
        self.__module__, self.__doc__ = fn.__module__, reflow(fn.__doc__ or "")
        self._sig: inspect.Signature | None = None

    @property
    def cls(self) -> type[Any]:
        return load_config(self.ref)

    def _own(self) -> list[inspect.Parameter]:
        return [p for p in inspect.signature(self.fn).parameters.values() if p.name != "cfg"]

    @property
    def __signature__(self) -> inspect.Signature:
        if self._sig is None:
            own = self._own()
            taken = {p.name for p in own}
            generated = [_parameter(s) for s in field_specs(self.cls) if s.name not in taken]
            config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                                       default=typer.Option(None, "--config", help=CONFIG_HELP, metavar="FILE"))
            self._sig = inspect.Signature([*generated, *own, config])
        return self._sig

    @property
    def __annotations__(self) -> dict[str, Any]:  # type: ignore[override]  # typer reads the generated hints
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **kwargs: Any) -> None:
        cls = self.cls
        config = kwargs.pop("config", None)
        extra = {p.name: kwargs.pop(p.name) for p in self._own()}
        for s in field_specs(cls):
            if s.many and isinstance(kwargs.get(s.name), list):
                kwargs[s.name] = ",".join(kwargs[s.name])  # repeated options: one comma list
        self.fn(build_config(cls, kwargs, config), **extra)


def config_command(app: typer.Typer, name: str, ref: ConfigRef,
                   **command_kwargs: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(cfg, **extra)` as `saevctl <name>` with one option per field of the Config and `--config`.

    `ref` is the Config class or a function returning it (`lambda: Config` after a local import keeps the Config
    module, and what it imports, out of every other command's start-up). `fn`'s own keyword parameters (typer
    options for presentation only, e.g. `--plain`) are kept beside them."""

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        app.command(name, **command_kwargs)(ConfigCommand(fn, ref))
        REGISTERED[f"{app.info.name or ''} {name}".strip()] = ref
        return fn

    return decorate
