"""Which classes `eval edits` tests and with which features: CLASS=FEATURE pairs, or each class's best feature from the
index's labels (`features label`) at the level of the mask set in use; and the value each feature is set to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saevctl import workspace
from saevctl.edit.clamps import check_features, parse_clamp
from saevctl.edit.controls import pick_control_features
from saevctl.edit.heads import norm_class
from saevctl.edit.session import FeatureStats, Prober, clamp_values
from saevctl.errors import IndexError_, InputError, ProbeError
from saevctl.eval import common
from saevctl.eval.config import EditsConfig


@dataclass
class Target:
    """One class under test: its mask id, the head's index for it, and the feature to suppress."""

    class_id: int
    class_name: str
    head_class: int
    """The head's index for the class (-1: the head does not predict it; unused when a classify head is tested)."""
    feature: int
    auroc: float | None
    value: float = 0.0
    control_feature: int = -1
    control_value: float = 0.0


def _index_fpath(cfg: EditsConfig) -> Path | None:
    if cfg.index is not None:
        if not cfg.index.is_file():
            raise IndexError_(f"mined index {cfg.index} does not exist", "run saevctl mine first, or fix --index")
        return cfg.index
    ref = workspace.get_default("index")
    return Path(ref) if ref and Path(ref).is_file() else None


def _head_class(masks: common.MaskLabels, cid: int) -> int:
    return int(masks.to_head[cid]) if 0 <= cid < len(masks.to_head) else -1


def _explicit_targets(pairs: tuple[str, ...], masks: common.MaskLabels) -> list[Target]:
    names = {norm_class(n): i for i, n in enumerate(masks.masks.classes)}
    out = []
    for text in pairs:
        cls, sep, feat = text.rpartition("=")
        if not sep or not cls.strip() or not feat.strip().isdigit():
            raise InputError(f"bad --feature {text!r}", "write CLASS=FEATURE, e.g. --feature wall=6909 or 12=6909")
        key = cls.strip()
        cid = int(key) if key.isdigit() else names.get(norm_class(key))
        if cid is None or not 0 < cid < len(masks.masks.classes):
            raise InputError(
                f"--feature {text!r} names no class of the masks",
                f"use a name or id from {masks.masks.dpath}'s class file (ids 1..{len(masks.masks.classes) - 1})",
            )
        out.append(Target(cid, masks.masks.classes[cid], _head_class(masks, cid), int(feat), None))
    return out


def _labelled_targets(index_fpath: Path | None, sae_path: Path, min_auroc: float, masks: common.MaskLabels,
                      level: str) -> list[Target]:
    """Classes whose best feature at label level `level` (patch, or patch:SET for a store's further mask set)
    reaches `min_auroc`, from the index's labels."""
    from saevctl.mine.index import Index

    if index_fpath is None:
        raise IndexError_("eval edits needs the classes' features: no --index given and none mined in this workspace",
                          "run saevctl mine and saevctl features label, or pass --feature CLASS=FEATURE")
    with Index.open(index_fpath, read_only=True) as idx:
        sae_id = idx.resolve_sae(str(sae_path))
        rows = idx.class_features(sae_id, level=level)
    if not rows:
        which = "patch-level labels" if level == "patch" else f"labels of mask set {level.partition(':')[2]}"
        how = "" if level == "patch" else f" --masks {level.partition(':')[2]}"
        raise IndexError_(f"SAE {sae_id} in {index_fpath} has no {which}",
                          f"run saevctl features label --sae {sae_id}{how} (on a store extracted with --masks)")
    return [Target(int(r["class_id"]), str(r["class_name"]), _head_class(masks, int(r["class_id"])),
                   int(r["feature"]), float(r["auroc"]))
            for r in rows if r["feature"] is not None and r["auroc"] is not None and r["auroc"] >= min_auroc]


def resolve_targets(cfg: EditsConfig, prober: Prober, masks: common.MaskLabels, sae_path: Path,
                    notes: list[str], label_level: str = "patch") -> list[Target]:
    """The classes to test; with a segment head only those it predicts (the others are noted)."""
    targets = (_explicit_targets(cfg.features, masks) if cfg.features
               else _labelled_targets(_index_fpath(cfg), sae_path, cfg.min_auroc, masks, label_level))
    if prober.head.task == "segment":
        unknown = [t.class_name for t in targets if t.head_class < 0]
        if unknown:
            notes.append(f"skipped {len(unknown)} class(es) the head does not predict: {', '.join(unknown[:5])}")
        targets = [t for t in targets if t.head_class >= 0]
    if not targets:
        raise ProbeError(f"no class has a feature with patch AUROC >= {cfg.min_auroc} that the head predicts",
                         "lower --min-auroc, or name pairs with --feature CLASS=FEATURE")
    check_features([t.feature for t in targets], prober.sae.cfg.n_latents)
    return targets


def set_values(cfg: EditsConfig, targets: list[Target], stats: FeatureStats | None) -> None:
    """Each target's value (Nx uses the feature's max), and its control feature with the same kind of value."""
    rng = np.random.default_rng(cfg.seed)
    for t in targets:
        clamp = parse_clamp(f"{t.feature}={cfg.value}")
        t.value = clamp_values([clamp], [t.feature], stats)[0]
        if cfg.controls:
            assert stats is not None
            t.control_feature = pick_control_features([t.feature], stats.freq_s, rng)[0]
            t.control_value = clamp_values([clamp], [t.control_feature], stats)[0]
