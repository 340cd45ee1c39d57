"""Stage 2, training: sparse autoencoders (ReLU+L1, TopK, BatchTopK, Matryoshka) on a stored layer, whole
sweeps in one pass over the data. Use `run(Config(...))` from Python; `saevctl train` is a thin CLI over it."""

from __future__ import annotations

from typing import Any

__all__ = ["Config", "Result", "run"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `saevctl --help` (which imports train.cli) does not import torch.
    if name == "Config":
        from saevctl.train.config import Config

        return Config
    if name in ("Result", "run"):
        from saevctl.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
