"""Stage 1, extraction: record a frozen ViT's residual stream at chosen blocks into an activation store.

Use `run(Config(...))` from Python; `saevctl extract` is a thin CLI over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.extract.config import Config
    from saevctl.extract.pipeline import Result, run

__all__ = ["Config", "Result", "run"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Config": "saevctl.extract.config",
        "Result": "saevctl.extract.pipeline",
        "run": "saevctl.extract.pipeline",
    },
)
