"""Lazy package exports: a stage package names its public API without importing it, so that `saevctl --help`
(which imports every stage's cli.py, and with it the package) loads neither torch nor duckdb.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(module_name: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module-level `__getattr__` that returns attribute `name` of module `exports[name]`, imported on first use.

    Use as `__getattr__ = lazy_exports(__name__, {"Config": "saevctl.train.config"})`, with `__all__` and an
    `if TYPE_CHECKING:` block importing the same names so type checkers see them.
    """

    def __getattr__(name: str) -> object:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return getattr(importlib.import_module(target), name)

    return __getattr__
