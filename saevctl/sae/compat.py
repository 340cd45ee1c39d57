"""The one check that an SAE fits the store it reads and the ViT it edits: same weights, its layer and token kinds
stored, same width. mine, eval and probe all call it, so a mismatch reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from saevctl.errors import MismatchError
from saevctl.layers import model_n_blocks, resolve_layer

if TYPE_CHECKING:
    from saevctl.sae.model import SAEConfig
    from saevctl.store import Store
    from saevctl.vit import Backbone


def check_compatible(sae_cfg: SAEConfig, *, store: Store | None = None, backbone: Backbone | None = None,
                     kinds: Sequence[str] | None = None, sae_path: Path | None = None) -> int:
    """The block the SAE reads (>= 0), after checking it against `store` and/or `backbone`.

    Weights are compared where both sides record a sha256 (an imported SAE records none: callers that need one
    ask for it first). With a store: the layer and token `kinds` (default: the SAE's own) must be stored and
    the width must match; with a backbone: the layer must exist and the width must match. Raises MismatchError
    (LayerError for a layer outside the model).
    """
    what = f"the SAE at {sae_path}" if sae_path is not None else "the SAE"
    layer = sae_cfg.layer
    if store is not None:
        layer = _check_store(sae_cfg, store, tuple(kinds if kinds is not None else sae_cfg.tokens), what)
    if backbone is not None:
        layer = _check_backbone(sae_cfg, backbone, what)
    assert layer is not None, "pass a store or a backbone"
    return layer


def _check_store(sae_cfg: SAEConfig, store: Store, kinds: tuple[str, ...], what: str) -> int:
    sm, tm = sae_cfg.model, store.model
    want, have = sm.get("weights_sha256"), tm.get("weights_sha256")
    if want and have and want != have:
        raise MismatchError(
            f"{what} was trained on {sm.get('spec')} (weights {str(want)[:12]}) and the store {store.dpath} holds "
            f"{tm.get('spec')} (weights {str(have)[:12]}), but the SAE reads only the model it was trained on",
            "use a store extracted from the model it was trained on",
        )
    layer = resolve_layer(sae_cfg.layer, model_n_blocks(tm), what=f"the model of the store {store.dpath}")
    if layer not in store.layers:
        raise MismatchError(
            f"{what} reads layer {layer}, but the store {store.dpath} holds layers {store.layers}",
            f"extract layer {layer} into a store, or pick the SAE trained on one of {store.layers}",
        )
    missing = [k for k in kinds if k not in store.kinds]
    if missing:
        raise MismatchError(
            f"{what} reads {', '.join(missing)} tokens, "
            f"but the store {store.dpath} holds only {', '.join(store.kinds)}",
            "re-extract with --tokens including them",
        )
    if sae_cfg.d != store.d:
        raise MismatchError(f"{what} has width {sae_cfg.d}, the store {store.d}", "use a matching SAE")
    return layer


def _check_backbone(sae_cfg: SAEConfig, bb: Backbone, what: str) -> int:
    spec, want = sae_cfg.model.get("spec"), sae_cfg.model.get("weights_sha256")
    if want and want != bb.weights_sha256:
        raise MismatchError(
            f"{what} was trained on {spec} weights {str(want)[:12]}, "
            f"but {spec} now loads weights {bb.weights_sha256[:12]}",
            "load the same model weights the store was extracted with",
        )
    layer = bb.check_layer(sae_cfg.layer)
    if sae_cfg.d != bb.d_model:
        raise MismatchError(f"{what} has width {sae_cfg.d}, {bb.spec} {bb.d_model}",
                            "use the SAE trained on this model")
    return layer
