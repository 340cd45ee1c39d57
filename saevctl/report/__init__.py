"""Stage 4, report: a static HTML feature browser of a mined index that opens from disk with no server.

Use `run(Config(...))` from Python; `saevctl report` is a thin CLI over it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Config", "Result", "count_pages", "run"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `saevctl --help` (which imports report.cli) does not import numpy, duckdb or torch.
    if name in __all__:
        from saevctl.report import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
