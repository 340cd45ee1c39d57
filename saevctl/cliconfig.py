"""The Config is the CLI: turns a stage Config's typed, documented fields into typer options, one adapter for all.

`@config_command(app, "train", Config)` gives `saevctl train` one option per field (help from the field's docstring,
default from its default) plus `--config FILE.toml`; the command body receives the built, checked Config.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import typer

from saevctl.config import FieldSpec, field_specs, load_toml, merge_config
from saevctl.errors import InputError

C = TypeVar("C")
CONFIG_HELP = "TOML file with any of these options (command-line values win; a list is a sweep axis where one sweeps)."
REGISTERED: dict[str, type[Any]] = {}
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


def build_config(cls: type[C], given: dict[str, Any], config: Path | None,
                 missing: Mapping[str, str] | None = None) -> C:
    """The Config from a TOML file (if any) overridden by the options given on the command line.

    `missing` {field: hint}: a required field given nowhere is the one line "missing --flag. Pass <hint>." (the
    wording of the commands that always said so), before the generic check of `merge_config`."""
    file_values = load_toml(config) if config else {}
    for name, hint in (missing or {}).items():
        if given.get(name) is None and file_values.get(name) is None:
            spec = next(s for s in field_specs(cls) if s.name == name)
            raise InputError(f"missing {(spec.cli.flag or spec.flag).split('/')[0]}", f"pass {hint}")
    return merge_config(cls, file_values, given)


def config_command(app: typer.Typer, name: str, cls: type[Any], *, missing: Mapping[str, str] | None = None,
                   **command_kwargs: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(cfg, **extra)` as `saevctl <name>` with one option per field of `cls` and `--config`.

    `fn`'s own keyword parameters (typer options for presentation only, e.g. `--plain`) are kept beside them;
    `missing` words the error of a required field left out (see `build_config`)."""

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        specs = field_specs(cls)
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "cfg"]
        taken = {p.name for p in own}
        generated = [_parameter(s) for s in specs if s.name not in taken]
        config_param = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                                         default=typer.Option(None, "--config", help=CONFIG_HELP, metavar="FILE"))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            config = kwargs.pop("config", None)
            extra = {p.name: kwargs.pop(p.name) for p in own}
            for s in specs:
                if s.many and isinstance(kwargs.get(s.name), list):
                    kwargs[s.name] = ",".join(kwargs[s.name])  # repeated options: one comma list
            cfg = build_config(cls, kwargs, config, missing)
            fn(cfg, **extra)

        params = [*generated, *own, config_param]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # typer reads it
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the generated signature, not fn's
        app.command(name, **command_kwargs)(command)
        REGISTERED[f"{app.info.name or ''} {name}".strip()] = cls
        return fn

    return decorate
