"""One rule for naming a ViT block: non-negative block numbers, negatives counting from the end, None for
"the last one". Torch-free, so configs and CLI parsing can check a layer before any model loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from saevctl.errors import LayerError


def model_n_blocks(model: Mapping[str, Any]) -> int | None:
    """The block count a store manifest's or SAE config's model record states (None when it states none)."""
    n = model.get("n_blocks") or model.get("depth")
    return int(n) if n else None


def resolve_layer(layer: int | None, n_blocks: int | None, *, available: Sequence[int] | None = None,
                  what: str = "the model") -> int:
    """The block number `layer` names, always >= 0.

    Negative counts from the end (needs `n_blocks`). None is the last of `available` when given, else the
    model's last block (how an SAE imported without its layer has always been read). With `available` (the
    layers an artifact stores) the result must be one of them; else it must lie in 0..n_blocks-1 when that is
    known. `what` names the model or artifact in the one-line error.
    """
    if layer is None:
        if available is not None:
            if not available:
                raise LayerError(f"{what} holds no layers", "extract at least one layer")
            return max(available)
        if n_blocks is None:
            raise LayerError(f"no layer given and the number of blocks of {what} is unknown", "give a block number")
        return n_blocks - 1
    given = layer
    if layer < 0:
        if n_blocks is None:
            hint = f"pick --layer from {list(available)}" if available is not None else "give a block number from 0"
            raise LayerError(f"layer {layer} counts from the end, but the number of blocks of {what} is unknown", hint)
        layer += n_blocks
    if available is not None:
        if layer not in available:
            choices = list(available)
            raise LayerError(f"{what} holds layers {choices}, not {given}", f"pick --layer from {choices}")
        return layer
    if n_blocks is not None and not 0 <= layer < n_blocks:
        raise LayerError(
            f"layer {given} is outside {what}, which has blocks 0..{n_blocks - 1}",
            f"choose layers between 0 and {n_blocks - 1} (negative counts from the end)",
        )
    return layer


def layer_text(layer: int | None) -> str:
    """A stored layer for display: its number, or "unknown" (an SAE imported without --layer)."""
    return "unknown" if layer is None or layer < 0 else str(layer)
