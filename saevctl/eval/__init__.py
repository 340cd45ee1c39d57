"""Stage 5, evaluation: how much of a task head's behaviour an SAE keeps when spliced in, whether feature
edits are specific to their class, how far it sits above null baselines of its width and sparsity, a one-page
report card, and how many features SAEs of other seeds or widths share.
`saevctl eval splice|edits|recon|baselines|all|card|stability|spatial|sparse-probe|absorption`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.eval.baselines import BaselinesResult, run_baselines
    from saevctl.eval.config import AllConfig, BaselinesConfig, EditsConfig, ReconConfig, SpliceConfig, StabilityConfig
    from saevctl.eval.edits import EditsResult, run_edits
    from saevctl.eval.metrics import recovery
    from saevctl.eval.recon import ReconResult, run_recon
    from saevctl.eval.splice import SpliceResult, run_splice
    from saevctl.eval.stability import StabilityResult, run_stability
    from saevctl.eval.suite import AllResult, run_all
    from saevctl.eval.vision import VisionScores, score_vision

__all__ = [
    "AllConfig", "AllResult", "BaselinesConfig", "BaselinesResult", "EditsConfig", "EditsResult", "ReconConfig",
    "ReconResult", "SpliceConfig", "SpliceResult", "StabilityConfig", "StabilityResult", "VisionScores", "recovery",
    "run_all", "run_baselines", "run_edits", "run_recon", "run_splice", "run_stability", "score_vision",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "VisionScores": "saevctl.eval.vision",
        "score_vision": "saevctl.eval.vision",
        "SpliceConfig": "saevctl.eval.config",
        "SpliceResult": "saevctl.eval.splice",
        "run_splice": "saevctl.eval.splice",
        "EditsConfig": "saevctl.eval.config",
        "EditsResult": "saevctl.eval.edits",
        "run_edits": "saevctl.eval.edits",
        "ReconConfig": "saevctl.eval.config",
        "ReconResult": "saevctl.eval.recon",
        "run_recon": "saevctl.eval.recon",
        "AllConfig": "saevctl.eval.config",
        "AllResult": "saevctl.eval.suite",
        "run_all": "saevctl.eval.suite",
        "recovery": "saevctl.eval.metrics",
        "StabilityConfig": "saevctl.eval.config",
        "StabilityResult": "saevctl.eval.stability",
        "run_stability": "saevctl.eval.stability",
        "BaselinesConfig": "saevctl.eval.config",
        "BaselinesResult": "saevctl.eval.baselines",
        "run_baselines": "saevctl.eval.baselines",
    },
)
