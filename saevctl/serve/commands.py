""""Copy as CLI": the `saevctl` command that computes what a view of the explorer shows, with the same arguments
(shell-quoted), so a finding made by clicking can be re-run, scripted and cited.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """The arguments every command names: the index, the SAE (its id in the index for `features`, its checkpoint
    for `probe`), and the head and classes an edit is read through."""

    index: str
    sae_id: str
    sae_path: str
    head: str
    classes: str | None = None


def _join(*parts: str | None) -> str:
    return " ".join(shlex.quote(p) for p in parts if p is not None)


def search(t: Target, image: str, cells: str, n: int) -> str:
    """`features search`: the selection's features by the sum of their codes (the paper's Figure 2)."""
    patches = ("--patches", cells) if cells else (None, None)
    return _join("saevctl", "features", "search", "--index", t.index, "--sae", t.sae_id, "--image", image,
                 *patches, "--n", str(n))


def feature(t: Target, feature_id: int, n_similar: int, other: str | None) -> str:
    """`features show` (statistics, histogram, similar features), `features top` and, with another SAE,
    `features match`: one command per line."""
    base = ("--index", t.index, "--sae", t.sae_id, "--id", str(feature_id))
    lines = [_join("saevctl", "features", "show", *base, "--similar", str(n_similar)),
             _join("saevctl", "features", "top", *base)]
    if other is not None:
        lines.append(_join("saevctl", "features", "match", "--index", t.index, "--from", t.sae_id,
                           "--id", str(feature_id), "--to", other))
    return "\n".join(lines)


def _edit_args(t: Target, clamps: Sequence[str], patches: str) -> list[str | None]:
    out: list[str | None] = []
    for c in clamps:
        out += ["--clamp", c]
    out += ["--patches", patches, "--sae", t.sae_path, "--index", t.index, "--head", t.head]
    if t.classes is not None:
        out += ["--classes", t.classes]
    return out


def probe(t: Target, image: str, clamps: Sequence[str], patches: str) -> str:
    """`probe --image`: the edit on one image, before/after."""
    return _join("saevctl", "probe", "--image", image, *_edit_args(t, clamps, patches))


def probe_batch(t: Target, images: str, clamps: Sequence[str], patches: str, n_boot: int, seed: int) -> str:
    """`probe --images`: the edit on many images next to the two controls, with bootstrap CIs."""
    return _join("saevctl", "probe", "--images", images, *_edit_args(t, clamps, patches),
                 "--n-boot", str(n_boot), "--seed", str(seed))
