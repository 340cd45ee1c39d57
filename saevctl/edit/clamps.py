"""`--clamp F=V` parsing and the feature-range check: plain string and int work, kept torch-free so that
Configs can check a clamp when they are built (the edit itself is in saevctl.edit.edit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from saevctl.errors import ProbeError


@dataclass(frozen=True)
class Clamp:
    """One `--clamp F=V`: set feature F to V, to V times its max activation, or (F=top) the image's strongest."""

    feature: int | None
    """Feature id; None for `top` (resolved per image)."""
    value: float
    multiple: bool
    """value is a multiple of the feature's max activation (from the mined index)."""
    text: str

    @property
    def is_ablation(self) -> bool:
        return self.value == 0.0


def parse_clamp(text: str) -> Clamp:
    m = re.fullmatch(r"\s*(\d+|top)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(x?)\s*", text, re.IGNORECASE)
    if not m:
        raise ProbeError(
            f"bad --clamp {text!r}",
            "write FEATURE=VALUE: 6909=0 (ablate), 6909=3.5 (absolute), 6909=2x (times its max), top=0",
        )
    feature = None if m.group(1).lower() == "top" else int(m.group(1))
    return Clamp(feature, float(m.group(2)), bool(m.group(3)), text.strip())


def check_features(features: list[int], n_latents: int) -> None:
    """Every feature id exists in an SAE of `n_latents` (the one check and wording of every command)."""
    bad = [f for f in features if not 0 <= f < n_latents]
    if bad:
        raise ProbeError(
            f"feature {bad[0]} is out of range: this SAE has features 0..{n_latents - 1}",
            f"pick an id from 0 to {n_latents - 1}",
        )
