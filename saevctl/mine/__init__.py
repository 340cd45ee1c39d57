"""Stage 3, mining: scan a store through an SAE once into a DuckDB index (+ faiss) of feature statistics,
exemplars and image -> feature rows. `run(Config(...))` mines; `Index.open(path)` reads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Config", "Index", "Result", "run"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `saevctl --help` (which imports mine.cli) does not import torch or duckdb.
    if name == "Index":
        from saevctl.mine.index import Index

        return Index
    if name in __all__:
        from saevctl.mine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
