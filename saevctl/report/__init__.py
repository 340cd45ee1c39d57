"""Stage 3, mining (its browser): a static HTML feature browser of a mined index that opens from disk with no server.

Use `run(Config(...))` from Python; `saevctl report` is a thin CLI over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.report.config import Config
    from saevctl.report.pipeline import Result, count_pages, run

__all__ = ["Config", "Result", "count_pages", "run"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Config": "saevctl.report.config",
        "Result": "saevctl.report.pipeline",
        "count_pages": "saevctl.report.pipeline",
        "run": "saevctl.report.pipeline",
    },
)
