"""`--clamp F=V` parsing and the feature-range check: plain string and int work, kept torch-free so that
Configs can check a clamp when they are built (the edit itself is in saevctl.edit.edit).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from saevctl import layout, workspace
from saevctl.errors import ProbeError, SaevctlError


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


def check_clamp_ids(clamps: tuple[str, ...], sae: Path | None) -> None:
    """Refuse bad clamps and feature ids beyond the SAE's width in well under a second, before the SAE, the ViT or
    torch load: the width comes from the checkpoint's config.json. Anything unreadable is left to the full load,
    which says what is wrong with the checkpoint."""
    parsed = [parse_clamp(c) for c in clamps]
    try:
        ckpt = workspace.resolve_ckpt(workspace.resolve_sae_ref(sae))
        n_latents = int(json.loads(layout.sae_config_fpath(ckpt).read_text())["n_latents"])
    except (SaevctlError, OSError, ValueError, KeyError, TypeError):
        return
    check_features([c.feature for c in parsed if c.feature is not None], n_latents)
