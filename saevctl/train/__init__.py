"""Stage 2, training: sparse autoencoders (ReLU+L1, TopK, BatchTopK, Matryoshka) on a stored layer, whole
sweeps in one pass over the data. Use `run(Config(...))` from Python, or `fit(acts, Config(...))` on an (n, d)
array or tensor; `saevctl train` is a thin CLI over `run`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.train.arrays import fit
    from saevctl.train.config import Config
    from saevctl.train.loop import Result, run

__all__ = ["Config", "Result", "fit", "run"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Config": "saevctl.train.config",
        "Result": "saevctl.train.loop",
        "fit": "saevctl.train.arrays",
        "run": "saevctl.train.loop",
    },
)
