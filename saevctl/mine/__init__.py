"""Stage 3, mining: scan a store through an SAE once into a DuckDB index (+ faiss) of feature statistics,
exemplars and image -> feature rows. `run(Config(...))` mines; `Index.open(path)` reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.mine.config import Config
    from saevctl.mine.index import Index
    from saevctl.mine.pipeline import Result, run

__all__ = ["Config", "Index", "Result", "run"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Config": "saevctl.mine.config",
        "Result": "saevctl.mine.pipeline",
        "run": "saevctl.mine.pipeline",
        "Index": "saevctl.mine.index",
    },
)
