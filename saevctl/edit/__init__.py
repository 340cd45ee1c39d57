"""The causal-edit engine that probe and eval share: task heads, the SAE edit at a layer, the loaded and
cross-checked SAE + ViT + head (`Prober`), matched controls, and effect sizes with bootstrap CIs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.edit.clamps import Clamp, parse_clamp
    from saevctl.edit.edit import EditPlan, apply_edit
    from saevctl.edit.heads import Head, resolve_head
    from saevctl.edit.session import FeatureStats, Prober

__all__ = ["Clamp", "EditPlan", "FeatureStats", "Head", "Prober", "apply_edit", "parse_clamp", "resolve_head"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Clamp": "saevctl.edit.clamps",
        "parse_clamp": "saevctl.edit.clamps",
        "EditPlan": "saevctl.edit.edit",
        "apply_edit": "saevctl.edit.edit",
        "Head": "saevctl.edit.heads",
        "resolve_head": "saevctl.edit.heads",
        "FeatureStats": "saevctl.edit.session",
        "Prober": "saevctl.edit.session",
    },
)
