"""Stage 5, probing: train or pick a task head, clamp SAE features at the SAE's layer, and measure how the
head's output changes (one image, or many images against controls). `saevctl heads` / `saevctl probe`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Config": "saevctl.probe.probe",
    "Result": "saevctl.probe.probe",
    "run": "saevctl.probe.probe",
    "BatchConfig": "saevctl.probe.batch",
    "BatchResult": "saevctl.probe.batch",
    "run_batch": "saevctl.probe.batch",
    "HeadTrainConfig": "saevctl.probe.train_head",
    "train_head": "saevctl.probe.train_head",
    "resolve_head": "saevctl.probe.heads",
    "Prober": "saevctl.probe.session",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so that `saevctl --help` (which imports probe.cli) does not import torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
