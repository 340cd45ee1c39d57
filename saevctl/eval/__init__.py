"""Stage 6, evaluation: how much of a task head's behaviour an SAE keeps when spliced in, whether feature
edits are specific to their class, and a one-page report card. `saevctl eval splice|edits|recon|all|card`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SpliceConfig": "saevctl.eval.splice",
    "SpliceResult": "saevctl.eval.splice",
    "run_splice": "saevctl.eval.splice",
    "EditsConfig": "saevctl.eval.edits",
    "EditsResult": "saevctl.eval.edits",
    "run_edits": "saevctl.eval.edits",
    "ReconConfig": "saevctl.eval.recon",
    "ReconResult": "saevctl.eval.recon",
    "run_recon": "saevctl.eval.recon",
    "AllConfig": "saevctl.eval.suite",
    "AllResult": "saevctl.eval.suite",
    "run_all": "saevctl.eval.suite",
    "recovery": "saevctl.eval.metrics",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so that `saevctl --help` (which imports eval.cli) does not import torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
