"""Stage 4, probing: train or pick a task head, clamp SAE features at the SAE's layer, and measure how the
head's output changes (one image, or many images against controls). `saevctl heads` / `saevctl probe`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.edit.heads import resolve_head
    from saevctl.edit.session import Prober
    from saevctl.probe.batch import BatchResult, run_batch
    from saevctl.probe.config import BatchConfig, Config, HeadTrainConfig
    from saevctl.probe.probe import Result, run
    from saevctl.probe.train_head import train_head

__all__ = [
    "BatchConfig", "BatchResult", "Config", "HeadTrainConfig", "Prober", "Result", "resolve_head", "run",
    "run_batch", "train_head",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "Config": "saevctl.probe.config",
        "Result": "saevctl.probe.probe",
        "run": "saevctl.probe.probe",
        "BatchConfig": "saevctl.probe.config",
        "BatchResult": "saevctl.probe.batch",
        "run_batch": "saevctl.probe.batch",
        "HeadTrainConfig": "saevctl.probe.config",
        "train_head": "saevctl.probe.train_head",
        "resolve_head": "saevctl.edit.heads",
        "Prober": "saevctl.edit.session",
    },
)
