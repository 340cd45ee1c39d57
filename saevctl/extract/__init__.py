"""Stage 1, extraction: record a frozen ViT's residual stream at chosen blocks into an activation store.

Use `run(Config(...))` from Python; `saevctl extract` is a thin CLI over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.extract.pipeline import Config, Result, run

__all__ = ["Config", "Result", "run"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Config": "saevctl.extract.pipeline",
        "Result": "saevctl.extract.pipeline",
        "run": "saevctl.extract.pipeline",
    },
)
