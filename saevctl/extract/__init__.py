"""Stage 1, extraction: record a frozen ViT's residual stream at chosen blocks into an activation store.

Use `run(Config(...))` from Python; `saevctl extract` is a thin CLI over it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Config", "Result", "run"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `saevctl --help` (which imports extract.cli) does not import torch.
    if name in __all__:
        from saevctl.extract import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
