"""Are edits specific: for each class with a labelled feature, suppress that feature on the class's patches and
measure how many of the patches predicted as that class change (target) versus all other patches (other),
next to a random feature of similar frequency and a random direction of equal norm, with bootstrap CIs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saevctl import atomic, layout, workspace
from saevctl.config import resolve_device
from saevctl.data import ImageRecord, resolve_images
from saevctl.edit.clamps import check_features, parse_clamp
from saevctl.edit.controls import (
    CONDITIONS,
    direction_generator,
    measure_stats,
    pick_control_features,
    random_direction_edit,
)
from saevctl.edit.edit import EditPlan, apply_edit
from saevctl.edit.session import FeatureStats, Prober, clamp_values, open_index_stats
from saevctl.errors import IndexError_, InputError, ProbeError
from saevctl.eval import common
from saevctl.eval.config import EditsConfig
from saevctl.eval.metrics import resample_weights

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


@dataclass
class Target:
    """One class under test: its mask id, the head's index for it, and the feature to suppress."""

    class_id: int
    class_name: str
    head_class: int
    feature: int
    auroc: float | None
    value: float = 0.0
    control_feature: int = -1
    control_value: float = 0.0


@dataclass
class EditsResult:
    rows: list[dict[str, Any]]
    """Per class (then 'all' last): class, feature, AUROC, values, counts, and per condition the target and other
    change rates {mean, lo, hi}."""
    n_images: int
    n_failed: int
    n_unmasked: int
    summary: Path
    seconds: float
    freq_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def overall(self) -> dict[str, Any]:
        return self.rows[-1]


# --- which classes, which features ----------------------------------------------------------------------------


def _index_fpath(cfg: EditsConfig) -> Path | None:
    if cfg.index is not None:
        if not cfg.index.is_file():
            raise IndexError_(f"mined index {cfg.index} does not exist", "run saevctl mine first, or fix --index")
        return cfg.index
    ref = workspace.get_default("index")
    return Path(ref) if ref and Path(ref).is_file() else None


def _explicit_targets(pairs: tuple[str, ...], masks: common.MaskLabels) -> list[Target]:
    names = {n.strip().lower(): i for i, n in enumerate(masks.masks.classes)}
    out = []
    for text in pairs:
        cls, sep, feat = text.rpartition("=")
        if not sep or not cls.strip() or not feat.strip().isdigit():
            raise InputError(f"bad --feature {text!r}", "write CLASS=FEATURE, e.g. --feature wall=6909 or 12=6909")
        key = cls.strip()
        cid = int(key) if key.isdigit() else names.get(key.lower())
        if cid is None or not 0 < cid < len(masks.masks.classes):
            raise InputError(
                f"--feature {text!r} names no class of the masks",
                f"use a name or id from {masks.masks.dpath}'s class file (ids 1..{len(masks.masks.classes) - 1})",
            )
        out.append(Target(cid, masks.masks.classes[cid], int(masks.to_head[cid]) if cid < len(masks.to_head) else -1,
                          int(feat), None))
    return out


def _labelled_targets(
    index_fpath: Path | None, sae_path: Path, min_auroc: float, masks: common.MaskLabels
) -> list[Target]:
    """Classes whose best patch-level feature reaches `min_auroc`, from the index's labels."""
    from saevctl.mine.index import Index

    if index_fpath is None:
        raise IndexError_("eval edits needs the classes' features: no --index given and none mined in this workspace",
                          "run saevctl mine and saevctl features label, or pass --feature CLASS=FEATURE")
    with Index.open(index_fpath, read_only=True) as idx:
        sae_id = idx.resolve_sae(str(sae_path))
        rows = idx.class_features(sae_id, level="patch")
    if not rows:
        raise IndexError_(f"SAE {sae_id} in {index_fpath} has no patch-level labels",
                          f"run saevctl features label --sae {sae_id} (on a store extracted with --masks)")
    out = []
    for r in rows:
        if r["feature"] is None or r["auroc"] is None or r["auroc"] < min_auroc:
            continue
        cid = int(r["class_id"])
        head_class = int(masks.to_head[cid]) if 0 <= cid < len(masks.to_head) else -1
        out.append(Target(cid, str(r["class_name"]), head_class, int(r["feature"]), float(r["auroc"])))
    return out


def resolve_targets(cfg: EditsConfig, prober: Prober, masks: common.MaskLabels, sae_path: Path,
                    notes: list[str]) -> list[Target]:
    targets = (_explicit_targets(cfg.features, masks) if cfg.features
               else _labelled_targets(_index_fpath(cfg), sae_path, cfg.min_auroc, masks))
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


# --- one batch -------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_predictions(prober: Prober, x_btd: Tensor, chunk: int | None = None) -> Tensor:
    """The segment head's class per patch (b, p), from its logits on the patch grid."""
    return prober.outputs(x_btd, chunk, out_hw=common.grid_hw(prober)).argmax(1).flatten(1)


def make_rows_plan(features_m: list[int], values_m: list[float], mask_mp: Tensor) -> EditPlan:
    """One EditPlan for rows that each edit their own feature on their own patches (other columns untouched)."""
    feats = sorted(set(features_m))
    col = {f: i for i, f in enumerate(feats)}
    m, p = mask_mp.shape
    values = torch.zeros(m, len(feats))
    mask = torch.zeros(m, p, len(feats), dtype=torch.bool, device=mask_mp.device)
    for r, (f, v) in enumerate(zip(features_m, values_m, strict=True)):
        values[r, col[f]] = v
        mask[r, :, col[f]] = mask_mp[r]
    return EditPlan(feats, values.to(mask_mp.device), mask)


def change_counts(pred_mp: Tensor, ref_mp: Tensor, head_class_m: Tensor) -> np.ndarray:
    """(m, 4): target patches changed, target patches, other patches changed, other patches; target = predicted
    as the row's class before the edit."""
    changed = pred_mp != ref_mp
    target = ref_mp == head_class_m[:, None]
    cols = [(changed & target).sum(1), target.sum(1), (changed & ~target).sum(1), (~target).sum(1)]
    return torch.stack(cols, 1).cpu().numpy().astype(np.int64)


@torch.no_grad()
def edit_batch(prober: Prober, x_btd: Tensor, values_bp: np.ndarray, targets: list[Target],
               gen: torch.Generator | None) -> tuple[list[tuple[int, int]], dict[str, np.ndarray]]:
    """Every (target, image) pair of the batch whose image holds the target's class: change counts per condition."""
    pairs = [(ti, i) for ti, t in enumerate(targets) for i in range(len(x_btd)) if (values_bp[i] == t.class_id).any()]
    if not pairs:
        return [], {}
    dev = x_btd.device
    rows = torch.tensor([i for _, i in pairs], device=dev)
    xs = x_btd[rows]
    mask = torch.from_numpy(np.stack([values_bp[i] == targets[ti].class_id for ti, i in pairs])).to(dev)
    lay, sae = prober.bb.layout, prober.sae
    plan = make_rows_plan([targets[ti].feature for ti, _ in pairs], [targets[ti].value for ti, _ in pairs], mask)
    variants = [apply_edit(sae, xs, lay, plan)]
    if gen is not None:
        ctrl = make_rows_plan([targets[ti].control_feature for ti, _ in pairs],
                              [targets[ti].control_value for ti, _ in pairs], mask)
        variants += [apply_edit(sae, xs, lay, ctrl), random_direction_edit(sae, xs, lay, plan, gen)]
    ref = patch_predictions(prober, x_btd, len(x_btd))[rows]
    preds = patch_predictions(prober, torch.cat(variants), len(x_btd))
    head_class = torch.tensor([targets[ti].head_class for ti, _ in pairs], device=dev)
    m = len(pairs)
    return pairs, {
        c: change_counts(preds[k * m : (k + 1) * m], ref, head_class) for k, c in enumerate(CONDITIONS[: len(variants)])
    }


# --- rates and their bootstrap -----------------------------------------------------------------------------------


def rates(counts_n4: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> dict[str, dict[str, float]]:
    """Pooled target and other change rates (changed / total over all units) with percentile bootstrap CIs
    (units resampled with replacement, the same resamples for every condition given the same seed)."""
    c = np.asarray(counts_n4, dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    w = resample_weights(len(c), n_boot, seed) if len(c) else np.zeros((0, 0))
    boot = w @ c if len(c) else np.zeros((0, 4))
    alpha = (1 - level) / 2
    for name, (num, den) in (("target", (0, 1)), ("other", (2, 3))):
        total = c[:, den].sum()
        mean = float(c[:, num].sum() / total) if total > 0 else float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            rows = boot[:, num] / boot[:, den]
        rows = rows[np.isfinite(rows)]
        lo, hi = (np.quantile(rows, [alpha, 1 - alpha]).tolist() if rows.size else [float("nan")] * 2)
        out[name] = {"mean": mean, "lo": float(lo), "hi": float(hi)}
    return out


# --- the run -------------------------------------------------------------------------------------------------


def _stats(
    cfg: EditsConfig, prober: Prober, sae_path: Path, records: list[ImageRecord], notes: list[str]
) -> FeatureStats | None:
    needs = cfg.controls or parse_clamp(f"0={cfg.value}").multiple
    if not needs:
        return None
    # The explicit --index must hold the SAE; a workspace default that does not is ignored (as probe does).
    stats = open_index_stats(cfg.index, sae_path, prober.sae.cfg.n_latents)
    if stats is None:
        stats = measure_stats(prober, records, cfg)
        notes.append(f"no mined index: feature max and frequency were measured on {stats.source}")
    return stats


class _Tally:
    """Change counts per (target, image) unit and per image (summed over the classes it holds)."""

    def __init__(self, n_targets: int) -> None:
        self.units: dict[str, list[np.ndarray]] = {c: [] for c in CONDITIONS}
        self.target_ids: list[int] = []
        self.image_ids: list[int] = []
        self.n_targets = n_targets

    def add(self, pairs: list[tuple[int, int]], counts: dict[str, np.ndarray], image_offset: int) -> None:
        for c, v in counts.items():
            self.units[c].append(v)
        self.target_ids += [ti for ti, _ in pairs]
        self.image_ids += [image_offset + i for _, i in pairs]

    def rows(self, targets: list[Target], n_boot: int, seed: int) -> list[dict[str, Any]]:
        conds = [c for c in CONDITIONS if self.units[c]]
        units = {c: np.concatenate(self.units[c]) for c in conds}
        tid, iid = np.asarray(self.target_ids), np.asarray(self.image_ids)
        out = []
        for ti, t in enumerate(targets):
            sel = tid == ti
            if not sel.any():
                continue
            first = units[conds[0]][sel]
            out.append(
                {
                    "class_id": t.class_id,
                    "class": t.class_name,
                    "head_class": t.head_class,
                    "feature": t.feature,
                    "auroc": t.auroc,
                    "value": t.value,
                    "control_feature": t.control_feature if len(conds) > 1 else None,
                    "control_value": t.control_value if len(conds) > 1 else None,
                    "n_images": int(sel.sum()),
                    "n_target": int(first[:, 1].sum()),
                    "n_other": int(first[:, 3].sum()),
                    "conditions": {c: rates(units[c][sel], n_boot, seed) for c in conds},
                }
            )
        images, inverse = np.unique(iid, return_inverse=True)
        per_image = {}
        for c in conds:
            acc = np.zeros((len(images), 4), np.int64)
            np.add.at(acc, inverse, units[c])
            per_image[c] = acc
        first = per_image[conds[0]]
        out.append({"class_id": None, "class": "all", "n_classes": len(out), "n_images": len(images),
                    "n_target": int(first[:, 1].sum()), "n_other": int(first[:, 3].sum()),
                    "conditions": {c: rates(per_image[c], n_boot, seed) for c in conds}})
        return out


def run_edits(cfg: EditsConfig, progress: Progress | None = None, prober: Prober | None = None,
              on_total: Callable[[int], None] | None = None) -> EditsResult:
    """Suppress each labelled class's feature on its patches in every masked image; write a JSON summary.

    Progress counts images; `on_total` learns how many once they are listed. The summary's write lock is held
    throughout."""
    t0 = time.perf_counter()
    with common.summary_target(cfg.sae, cfg.index, cfg.out, "edits") as (sae_path, summary):
        return _edits(cfg, sae_path, summary, t0, progress, prober, on_total)


def _edits(cfg: EditsConfig, sae_path: Path, summary: Path, t0: float, progress: Progress | None,
           prober: Prober | None, on_total: Callable[[int], None] | None) -> EditsResult:
    assert cfg.images is not None and cfg.masks is not None  # EditsConfig.check requires them
    records = list(resolve_images(cfg.images, cfg.max_images).records)
    if on_total:
        on_total(len(records))
    mask_set = common.open_checked_masks(cfg.masks, records)
    prober = prober or Prober.load(cfg.sae, cfg.head, cfg.classes, resolve_device(cfg.device))
    if prober.head.task != "segment":
        raise ProbeError(f"eval edits needs a segment head, but {prober.head.name} is a {prober.head.task} head",
                         "train one with saevctl heads train --task segment --masks DIR")
    prober.check_batch_memory(cfg.batch_size, len(records), 3 if cfg.controls else 1, full_codes=False)
    masks = common.MaskLabels(mask_set, prober)
    notes: list[str] = []
    targets = resolve_targets(cfg, prober, masks, sae_path, notes)
    stats = _stats(cfg, prober, sae_path, records, notes)
    set_values(cfg, targets, stats)
    gen = direction_generator(cfg.seed) if cfg.controls else None
    tally = _Tally(len(targets))
    n_images = n_failed = n_unmasked = 0
    for batch in common.iter_images(records, prober.bb.preprocess, cfg.batch_size, cfg.n_workers):
        n_failed += batch.n_failed
        values = [masks.values(r.path, s) for r, s in zip(batch.records, batch.sizes, strict=True)]
        masked = [(i, v) for i, v in enumerate(values) if v is not None]
        keep = [i for i, _ in masked]
        n_unmasked += len(values) - len(keep)
        if keep:
            x = prober.prefix(common.to_input(prober, batch.u8[keep]))
            pairs, counts = edit_batch(prober, x, np.stack([v for _, v in masked]), targets, gen)
            tally.add(pairs, counts, n_images)
            n_images += len(keep)
        if progress:
            progress(len(batch.records) + batch.n_failed)
    if not n_images:
        raise InputError(
            f"no image in {cfg.images} has a mask in {cfg.masks}", "masks are PNGs named like their images"
        )
    if not tally.target_ids:
        raise ProbeError("none of the tested classes appears in the masks of these images",
                         "use images that show the labelled classes, or lower --min-auroc")
    rows = tally.rows(targets, cfg.n_boot, cfg.seed)
    res = EditsResult(rows, n_images, n_failed, n_unmasked, summary, time.perf_counter() - t0,
                      stats.source if stats else "none", notes)
    atomic.write_json(summary, common.jsonable({
        "schema_version": layout.EVAL_SCHEMA, "format": common.FORMAT + "-edits", "sae": str(sae_path),
        "images": cfg.images, "masks": str(cfg.masks), "head": prober.head.name, "layer": prober.layer,
        "value": cfg.value, "min_auroc": cfg.min_auroc, "source": "--feature" if cfg.features else "index labels",
        "n_images": n_images, "n_failed": n_failed, "n_unmasked": n_unmasked, "n_boot": cfg.n_boot, "seed": cfg.seed,
        "freq_source": res.freq_source, "classes": rows, "notes": notes, "seconds": res.seconds,
    }))
    return res
