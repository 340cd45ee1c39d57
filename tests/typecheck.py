"""The run-time type checker conftest.py puts on every saevctl function and dataclass (through jaxtyping's
import hook): beartype, with the PEP 484 numeric tower (an int where a float is declared, as mypy allows).

Stage Configs are checked once built, not at the call: their constructor takes command-line and TOML values
(strings, lists) that `ConfigBase.__post_init__` coerces to the declared types or refuses with a one-line
error, so the annotations describe the fields, not what the caller may pass.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from typing import Any

import beartype
from beartype.door import die_if_unbearable

CONF = beartype.BeartypeConf(is_pep484_tower=True)


def typechecker(fn: Callable[..., Any]) -> Callable[..., Any]:
    checked = beartype.beartype(fn, conf=CONF)
    if not getattr(fn, "__qualname__", "").endswith(".__init__"):
        return checked

    @functools.wraps(fn)
    def check_init(*args: Any, **kwargs: Any) -> Any:
        from saevctl.config import ConfigBase

        if args and isinstance(args[0], ConfigBase):
            _check_fields(args[0])
            return None
        return checked(*args, **kwargs)

    return check_init


def _check_fields(cfg: Any) -> None:
    """A Config's fields against their annotations, once __init__ has set them (before, there is nothing)."""
    fields = dataclasses.fields(cfg)
    if not all(hasattr(cfg, f.name) for f in fields):
        return
    hints = typing.get_type_hints(type(cfg))
    for f in fields:
        die_if_unbearable(getattr(cfg, f.name), hints[f.name], conf=CONF)
