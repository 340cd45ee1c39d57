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

from saevctl import atomic, layout
from saevctl.config import resolve_device
from saevctl.data import ImageRecord, resolve_images
from saevctl.edit.clamps import parse_clamp
from saevctl.edit.controls import CONDITIONS, direction_generator, measure_stats, random_direction_edit
from saevctl.edit.edit import EditPlan, apply_edit
from saevctl.edit.effects import verdict
from saevctl.edit.heads import image_truth
from saevctl.edit.maskpatches import eval_mask_folder
from saevctl.edit.session import FeatureStats, Prober, open_index_stats
from saevctl.errors import InputError, ProbeError
from saevctl.eval import common
from saevctl.eval.config import EditsConfig
from saevctl.eval.edittargets import Target, resolve_targets, set_values
from saevctl.eval.metrics import resample_weights
from saevctl.eval.passes import Passes

__all__ = ["EditsConfig", "EditsResult", "Target", "change_counts", "make_rows_plan", "rates", "run_edits"]

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


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
    per_image: tuple[np.ndarray, dict[str, np.ndarray]] | None = field(default=None, repr=False)
    """(image numbers among the masked images, condition -> int64 (n, 4) counts: target changed, target, other
    changed, other), summed over each image's classes: what the overall row's bootstrap resamples."""

    level: str = "patch"
    """patch (a segment head's patches) or image (a classify head's prediction per image)."""

    @property
    def overall(self) -> dict[str, Any]:
        return self.rows[-1]


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


def truth_counts(pred_mp: Tensor, ref_mp: Tensor, truth_mp: Tensor) -> np.ndarray:
    """(m, 2): of the units (patches or images) the head got right before the edit (prediction = the true class,
    truth -1 unknown), how many it gets wrong after: flips against the true label."""
    right = (ref_mp == truth_mp) & (truth_mp >= 0)
    cols = [(right & (pred_mp != truth_mp)).sum(1), right.sum(1)]
    return torch.stack(cols, 1).cpu().numpy().astype(np.int64)


def image_counts(pred_m1: Tensor, ref_m1: Tensor) -> np.ndarray:
    """(m, 4) as `change_counts` for a classify head: the image's prediction is the one target unit (no others)."""
    changed = (pred_m1 != ref_m1).sum(1)
    cols = [changed, torch.ones_like(changed), torch.zeros_like(changed), torch.zeros_like(changed)]
    return torch.stack(cols, 1).cpu().numpy().astype(np.int64)


def change_counts(pred_mp: Tensor, ref_mp: Tensor, head_class_m: Tensor) -> np.ndarray:
    """(m, 4): target patches changed, target patches, other patches changed, other patches; target = predicted
    as the row's class before the edit."""
    changed = pred_mp != ref_mp
    target = ref_mp == head_class_m[:, None]
    cols = [(changed & target).sum(1), target.sum(1), (changed & ~target).sum(1), (~target).sum(1)]
    return torch.stack(cols, 1).cpu().numpy().astype(np.int64)


@torch.no_grad()
def edit_batch(prober: Prober, x_btd: Tensor, values_bp: np.ndarray, targets: list[Target],
               gen: torch.Generator | None, truth_b: Tensor | None = None, ref_b: Tensor | None = None
               ) -> tuple[list[tuple[int, int]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every (target, image) pair of the batch whose image holds the target's class: change counts and true-label
    counts (`truth_counts`) per condition. A classify head is measured on each image's prediction, against
    `truth_b` (each image's true head class, -1 unknown); a segment head on each patch, against the masks.
    `ref_b`: the unedited prediction per image, or per patch, when already computed (`reference`)."""
    pairs = [(ti, i) for ti, t in enumerate(targets) for i in range(len(x_btd)) if (values_bp[i] == t.class_id).any()]
    if not pairs:
        return [], {}, {}
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
    m, conds = len(pairs), CONDITIONS[: len(variants)]
    if prober.head.task == "classify":
        ref = (ref_b if ref_b is not None else prober.outputs(x_btd, len(x_btd)).argmax(-1))[rows][:, None]
        preds = prober.outputs(torch.cat(variants), len(x_btd)).argmax(-1)[:, None]
        truth = (truth_b.to(dev)[rows] if truth_b is not None else torch.full((m,), -1, device=dev))[:, None]
        counts = {c: image_counts(preds[k * m : (k + 1) * m], ref) for k, c in enumerate(conds)}
    else:
        ref = (ref_b if ref_b is not None else patch_predictions(prober, x_btd, len(x_btd)))[rows]
        preds = patch_predictions(prober, torch.cat(variants), len(x_btd))
        head_class = torch.tensor([targets[ti].head_class for ti, _ in pairs], device=dev)
        truth = torch.where(mask, head_class[:, None], -1)  # the edited patches are the class's, by the masks
        counts = {c: change_counts(preds[k * m : (k + 1) * m], ref, head_class) for k, c in enumerate(conds)}
    return pairs, counts, {c: truth_counts(preds[k * m : (k + 1) * m], ref, truth) for k, c in enumerate(conds)}


# --- rates and their bootstrap -----------------------------------------------------------------------------------


RATES = (("target", (0, 1)), ("other", (2, 3)))
"""Rate name -> (changed column, total column) of `change_counts`."""


def rates(counts_n4: np.ndarray, n_boot: int, seed: int, level: float = 0.95,
          names: tuple[tuple[str, tuple[int, int]], ...] = RATES) -> dict[str, dict[str, float]]:
    """Pooled target and other change rates (changed / total over all units) with percentile bootstrap CIs
    (units resampled with replacement, the same resamples for every condition given the same seed); `names`
    picks other columns (("true", (0, 1)) for `truth_counts`)."""
    c = np.asarray(counts_n4, dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    w = resample_weights(len(c), n_boot, seed) if len(c) else np.zeros((0, 0))
    boot = w @ c if len(c) else np.zeros((0, c.shape[1] if c.ndim == 2 else 4))
    alpha = (1 - level) / 2
    for name, (num, den) in names:
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
        self.truths: dict[str, list[np.ndarray]] = {c: [] for c in CONDITIONS}
        """Per condition, `truth_counts` of each unit."""
        self.target_ids: list[int] = []
        self.image_ids: list[int] = []
        self.n_targets = n_targets

    def add(self, pairs: list[tuple[int, int]], counts: dict[str, np.ndarray], image_offset: int,
            truths: dict[str, np.ndarray] | None = None) -> None:
        for c, v in counts.items():
            self.units[c].append(v)
        for c, v in (truths or {}).items():
            self.truths[c].append(v)
        self.target_ids += [ti for ti, _ in pairs]
        self.image_ids += [image_offset + i for _, i in pairs]

    def per_image(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(image numbers, condition -> (n, 4) counts summed over each image's classes)."""
        images, inverse = np.unique(np.asarray(self.image_ids), return_inverse=True)
        out: dict[str, np.ndarray] = {}
        for c in (c for c in CONDITIONS if self.units[c]):
            acc = np.zeros((len(images), 4), np.int64)
            np.add.at(acc, inverse, np.concatenate(self.units[c]))
            out[c] = acc
        return images, out

    def true_rates(self, sel: np.ndarray | None, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
        """Per condition, the true-label flip rate {mean, lo, hi} of the units `sel` (None: per image, pooled over
        each image's classes, as the overall row resamples)."""
        out = {}
        for c in (c for c in CONDITIONS if self.truths[c]):
            t = np.concatenate(self.truths[c])
            if sel is None:
                images, inverse = np.unique(np.asarray(self.image_ids), return_inverse=True)
                acc = np.zeros((len(images), 2), np.int64)
                np.add.at(acc, inverse, t)
                t = acc
            else:
                t = t[sel]
            out[c] = rates(t, n_boot, seed, names=(("true", (0, 1)),))["true"]
        return out

    def rows(self, targets: list[Target], n_boot: int, seed: int) -> list[dict[str, Any]]:
        conds = [c for c in CONDITIONS if self.units[c]]
        units = {c: np.concatenate(self.units[c]) for c in conds}
        tid = np.asarray(self.target_ids)
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
        images, per_image = self.per_image()
        first = per_image[conds[0]]
        out.append({"class_id": None, "class": "all", "n_classes": len(out), "n_images": len(images),
                    "n_target": int(first[:, 1].sum()), "n_other": int(first[:, 3].sum()),
                    "conditions": {c: rates(per_image[c], n_boot, seed) for c in conds}})
        return out


def judged_rows(tally: _Tally, targets: list[Target], cfg: EditsConfig, label: str) -> list[dict[str, Any]]:
    """`_Tally.rows` with each condition's true-label flip rate ("true") and each row's verdict: the feature's target
    change rate against both controls' (`saevctl.edit.effects.verdict`; none without controls)."""
    rows = tally.rows(targets, cfg.n_boot, cfg.seed)
    tid = np.asarray(tally.target_ids)
    for r in rows:
        ti = next((i for i, t in enumerate(targets) if t.class_id == r["class_id"]), None) if r["class_id"] else None
        for c, v in tally.true_rates(None if ti is None else tid == ti, cfg.n_boot, cfg.seed).items():
            r["conditions"][c]["true"] = v
        conds = r["conditions"]
        controls = {c: conds[c]["target"] for c in conds if c != "feature"}
        r["verdict"] = verdict(conds["feature"]["target"], controls, cfg.min_effect, label) if controls else None
    return rows


def run_edits(cfg: EditsConfig, progress: Progress | None = None, prober: Prober | None = None,
              on_total: Callable[[int], None] | None = None, passes: Passes | None = None) -> EditsResult:
    """Suppress each labelled class's feature on its patches in every masked image; write a JSON summary.

    Progress counts images; `on_total` learns how many once they are listed. The summary's write lock is held
    throughout. `passes` shares the SAE-independent passes with the other evaluations of one run (`eval all`)."""
    t0 = time.perf_counter()
    with common.summary_target(cfg.sae, cfg.index, cfg.out, "edits") as (sae_path, summary):
        return _edits(cfg, sae_path, summary, t0, progress, prober, on_total,
                      passes if passes is not None else Passes(0))


def reference(prober: Prober, passes: Passes, records: list[ImageRecord], x_btd: Tensor) -> Tensor:
    """The head's unedited prediction per image (classify) or per patch (segment): splice's original outputs."""
    if prober.head.task == "classify":
        return passes.outputs(prober, records, x_btd, len(x_btd), None).argmax(-1)
    return passes.outputs(prober, records, x_btd, len(x_btd), common.grid_hw(prober)).argmax(1).flatten(1)


def _check_head(cfg: EditsConfig, prober: Prober) -> None:
    """--level patch needs a segment head (a class per patch), --level image a classify head (one per image)."""
    task, name = prober.head.task, prober.head.name
    if cfg.level == "patch" and task != "segment":
        raise ProbeError(f"eval edits needs a segment head, but {name} is a {task} head",
                         "train one with saevctl heads train --task segment --masks DIR, or pass --level image to "
                         "measure a classify head's prediction (e.g. --head timm, the model's own classifier)")
    if cfg.level == "image" and task != "classify":
        raise ProbeError(f"eval edits --level image needs a classify head, but {name} is a {task} head",
                         "pass --head timm (the model's own classifier), clip or a trained classify head")


def _edits(cfg: EditsConfig, sae_path: Path, summary: Path, t0: float, progress: Progress | None,
           prober: Prober | None, on_total: Callable[[int], None] | None, passes: Passes) -> EditsResult:
    assert cfg.images is not None and cfg.masks is not None  # EditsConfig.check requires them
    records = list(resolve_images(cfg.images, cfg.max_images).records)
    if on_total:
        on_total(len(records))
    mask_set = common.open_checked_masks(cfg.masks, records, cfg.sae)
    prober = prober or Prober.load(cfg.sae, cfg.head, cfg.classes, resolve_device(cfg.device))
    _check_head(cfg, prober)
    prober.check_batch_memory(cfg.batch_size, len(records), 3 if cfg.controls else 1, full_codes=False)
    masks = common.MaskLabels(mask_set, prober, need_head=cfg.level == "patch")
    notes: list[str] = []
    targets = resolve_targets(cfg, prober, masks, sae_path, notes, eval_mask_folder(cfg.masks, cfg.sae)[1])
    truth = image_truth(records, prober.head, notes)
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
            recs = [batch.records[i] for i in keep]
            x = passes.prefix(prober, recs, batch.u8[keep])
            truth_b = torch.tensor([truth[r.id] for r in recs]) if truth is not None else None
            pairs, counts, truths = edit_batch(prober, x, np.stack([v for _, v in masked]), targets, gen, truth_b,
                                               reference(prober, passes, recs, x))
            tally.add(pairs, counts, n_images, truths)
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
    rows = judged_rows(tally, targets, cfg, "prediction flips" if cfg.level == "image" else "target change rate")
    res = EditsResult(rows, n_images, n_failed, n_unmasked, summary, time.perf_counter() - t0,
                      stats.source if stats else "none", notes, tally.per_image(), level=cfg.level)
    atomic.write_json(summary, common.jsonable({
        "schema_version": layout.EVAL_SCHEMA, "format": common.FORMAT + "-edits", "sae": str(sae_path),
        "images": cfg.images, "masks": str(cfg.masks), "head": prober.head.name, "layer": prober.layer,
        "value": cfg.value, "min_auroc": cfg.min_auroc, "source": "--feature" if cfg.features else "index labels",
        "level": cfg.level, "min_effect": cfg.min_effect,
        "n_images": n_images, "n_failed": n_failed, "n_unmasked": n_unmasked, "n_boot": cfg.n_boot, "seed": cfg.seed,
        "freq_source": res.freq_source, "classes": rows, "notes": notes, "seconds": res.seconds,
    }))
    return res
