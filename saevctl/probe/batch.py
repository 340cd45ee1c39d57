"""Batch probe: the same edit over many images next to two controls (a random feature of similar firing
frequency, a random direction of the same norm), with bootstrap confidence intervals of the effect sizes.
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

from saevctl import atomic, layout, workspace
from saevctl.config import resolve_device
from saevctl.data import ImageRecord, resolve_images
from saevctl.edit.clamps import Clamp, parse_clamp
from saevctl.edit.controls import (
    CONDITIONS,
    direction_generator,
    iter_batches,
    measure_stats,
    pick_control_features,
    random_direction_edit,
)
from saevctl.edit.edit import EditPlan, Patches, apply_edit, make_plan, parse_patches, static_mask
from saevctl.edit.effects import DECISION, bootstrap_ci, effect_sizes, primary_metric, task_metrics, verdict
from saevctl.edit.heads import image_truth
from saevctl.edit.maskpatches import MaskPatches, mask_patches
from saevctl.edit.session import FeatureStats, Prober, clamp_values, open_index_stats
from saevctl.errors import ProbeError
from saevctl.probe.config import BatchConfig
from saevctl.probe.figures import batch_figure

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
SUMMARY_SCHEMA = 1


@dataclass
class BatchResult:
    task: str
    n_images: int
    n_failed: int
    n_fired: int
    """Images where the edit touched at least one patch."""
    features: list[int]
    values: list[float]
    control_features: list[int]
    control_values: list[float]
    freq_source: str
    rows: list[dict[str, Any]]
    """Per metric: label, magnitude, conditions [{condition, mean, lo, hi}], vs_controls [{control, mean, lo, hi}]."""
    verdict: dict[str, Any] | None
    """`saevctl.edit.effects.verdict`: the magnitude metric against both controls, and the share of decisions
    changed (prediction flips, pixels changed) against --min-effect; None without controls."""
    effects: dict[str, dict[str, np.ndarray]]
    figure: Path
    summary: Path
    seconds: float
    notes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    """The probed images, in the order of the per-image effect arrays."""

    @property
    def specific(self) -> bool | None:
        """The verdict is 'specific'; None without controls."""
        return None if self.verdict is None else bool(self.verdict["specific"])

    @property
    def images_per_s(self) -> float:
        return self.n_images / max(self.seconds, 1e-9)


# --- the run -------------------------------------------------------------------------------------------


def _plans(prober: Prober, x_btd: torch.Tensor, feats: list[list[int]], vals: list[list[float]], patches: Patches,
           mask_p: torch.Tensor | None) -> list[EditPlan]:
    x_npd = x_btd[:, prober.bb.layout.n_prefix :]
    n = x_npd.shape[0]
    return [make_plan(prober.sae, x_npd, f, torch.tensor([v] * n), patches, mask_p)
            for f, v in zip(feats, vals, strict=True)]


@torch.no_grad()
def probe_batch(
    prober: Prober, u8: np.ndarray, feats: list[list[int]], vals: list[list[float]], patches: Patches,
    mask_p: torch.Tensor | None, gen: torch.Generator | None, fast: bool = True, truth_b: torch.Tensor | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """Effects of the feature edit (and controls when `feats` has two entries and gen is set) on one batch;
    `truth_b` (true head class per image, -1 unknown) adds the true-label metrics."""
    x_btd = prober.prefix(prober.bb.preprocess.normalize(torch.from_numpy(u8).to(prober.device)))
    lay, n = prober.bb.layout, x_btd.shape[0]
    plans = _plans(prober, x_btd, feats, vals, patches, mask_p)
    variants = [x_btd, *(apply_edit(prober.sae, x_btd, lay, p, fast=fast) for p in plans)]
    if gen is not None:
        variants.append(random_direction_edit(prober.sae, x_btd, lay, plans[0], gen))
    probs = prober.outputs(torch.cat(variants), chunk=prober.variant_chunk(n)).float()
    before = probs[:n]
    effects = {CONDITIONS[i]: effect_sizes(before, probs[(i + 1) * n : (i + 2) * n], prober.head.task, truth_b)
               for i in range(len(variants) - 1)}
    return effects, int(plans[0].edited_np.any(1).sum())


def _ci(values: np.ndarray, cfg: BatchConfig) -> dict[str, float]:
    mean, lo, hi = bootstrap_ci(values, cfg.n_boot, seed=cfg.seed)
    return {"mean": mean, "lo": lo, "hi": hi}


def _aggregate(
    task: str, effects: dict[str, dict[str, np.ndarray]], cfg: BatchConfig, labelled: bool
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Bootstrap rows per metric, and the verdict on the verdict metric against both controls."""
    rows: list[dict[str, Any]] = []
    for key, label, magnitude in task_metrics(task, labelled):
        conds = [{"condition": c, **_ci(e[key], cfg)} for c, e in effects.items()]
        vs = [
            {"control": c, **_ci(effects["feature"][key] - e[key], cfg)} for c, e in effects.items() if c != "feature"
        ]
        rows.append({"metric": key, "label": label, "magnitude": magnitude, "conditions": conds, "vs_controls": vs})
    def ci(metric: str, i: int) -> dict[str, float]:
        row = next(r for r in rows if r["metric"] == metric)
        return {k: row["conditions"][i][k] for k in ("mean", "lo", "hi")}

    primary = next(r for r in rows if r["metric"] == primary_metric(task))
    controls = {c["condition"]: ci(primary["metric"], i) for i, c in enumerate(primary["conditions"]) if i}
    if not controls:
        return rows, None
    key, name = DECISION[task]
    return rows, verdict(ci(primary["metric"], 0), controls, cfg.min_effect, primary["label"], ci(key, 0), name,
                         share=primary["metric"] == key)


def _controls(cfg: BatchConfig, prober: Prober, clamps: list[Clamp], features: list[int], records: list[ImageRecord],
              stats: FeatureStats | None, notes: list[str]) -> tuple[list[float], list[int], list[float], str]:
    """(the edit's values, control features and their values, where frequencies came from)."""
    sae_path = workspace.resolve_sae_ref(cfg.sae)
    if stats is None and (cfg.controls or any(c.multiple for c in clamps)):
        stats = open_index_stats(cfg.index, sae_path, prober.sae.cfg.n_latents)
    values = clamp_values(clamps, features, stats)
    if not cfg.controls:
        return values, [], [], stats.source if stats else "none"
    if stats is None:
        stats = measure_stats(prober, records, cfg)
        notes.append(f"no mined index: firing frequencies were measured on {stats.source}")
    ctrl_f = pick_control_features(features, stats.freq_s, np.random.default_rng(cfg.seed))
    log.info("control features %s (frequencies from %s)", ctrl_f, stats.source)
    return values, ctrl_f, clamp_values(clamps, ctrl_f, stats), stats.source


class _Tally:
    """Per-image effects of every condition, the images they belong to, and the counts the summary reports."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, list[np.ndarray]]] = {}
        self.paths: list[str] = []
        self.n_failed = self.n_fired = self.n_unmasked = 0

    def add(self, eff: dict[str, dict[str, np.ndarray]], ok: list[ImageRecord], fired: int) -> None:
        self.paths += [r.path for r in ok]
        self.n_fired += fired
        for cond, metrics in eff.items():
            for key, v in metrics.items():
                self.parts.setdefault(cond, {}).setdefault(key, []).append(v)

    def effects(self) -> dict[str, dict[str, np.ndarray]]:
        return {c: {k: np.concatenate(v) for k, v in m.items()} for c, m in self.parts.items()}


def _mask_rows(sel: MaskPatches, u8: np.ndarray, ok: list[ImageRecord], prober: Prober,
               tally: _Tally) -> tuple[np.ndarray, list[ImageRecord], torch.Tensor]:
    """The images of a batch whose mask has the class, and their patches of it; the others are counted, not probed."""
    lay = prober.bb.layout
    chosen = [sel.select(r.path, prober.bb.preprocess, (lay.grid_h, lay.grid_w)) for r in ok]
    kept = [(i, m) for i, m in enumerate(chosen) if m is not None and m.any()]
    keep = [i for i, _ in kept]
    tally.n_unmasked += len(ok) - len(keep)
    masks = np.stack([m for _, m in kept]) if kept else np.zeros((0, lay.n_patches), dtype=bool)
    return u8[keep], [ok[i] for i in keep], torch.from_numpy(masks)


def run_batch(cfg: BatchConfig, progress: Progress | None = None, prober: Prober | None = None,
              stats: FeatureStats | None = None, on_total: Progress | None = None) -> BatchResult:
    """Probe every image of `cfg.images` with the edit and the controls; write a PNG and a JSON summary.

    `prober` reuses loaded models; `stats` gives feature max/frequency directly instead of the mined index;
    `on_total(n)` is told the number of images once they are listed (`progress` advances once per image)."""
    clamps = [parse_clamp(c) for c in cfg.clamps]
    if any(c.feature is None for c in clamps):
        raise ProbeError("--clamp top=... works on one --image only", "name feature ids in batch mode")
    patches = parse_patches(cfg.patches)
    records = list(resolve_images(cfg.images, cfg.max_images).records)
    if on_total:
        on_total(len(records))
    prober = prober or Prober.load(cfg.sae, cfg.head, cfg.classes, resolve_device(cfg.device))
    prober.check_clamps(clamps)
    prober.check_batch_memory(cfg.batch_size, len(records), 4 if cfg.controls else 2, full_codes=not cfg.fast)
    mask_p = static_mask(patches, prober.bb.layout, prober.bb.patch_size)
    sel = mask_patches(patches.kind, patches.mask_set, patches.mask_class, cfg.masks, prober.sae.cfg.train)
    features = [c.feature for c in clamps if c.feature is not None]  # all of them (checked above)
    notes: list[str] = []
    values, ctrl_f, ctrl_v, freq_source = _controls(cfg, prober, clamps, features, records, stats, notes)
    truth = image_truth(records, prober.head, notes)
    feats, vals = ([features, ctrl_f], [values, ctrl_v]) if cfg.controls else ([features], [values])
    gen = direction_generator(cfg.seed) if cfg.controls else None
    t0, tally = time.perf_counter(), _Tally()
    for u8, ok, failed in iter_batches(records, prober, cfg.batch_size, cfg.n_workers):
        tally.n_failed += failed
        n_read = len(u8)
        u8, ok, per_image = _mask_rows(sel, u8, ok, prober, tally) if sel is not None else (u8, ok, mask_p)
        if len(u8):
            truth_b = torch.tensor([truth[r.id] for r in ok]) if truth is not None else None
            eff, fired = probe_batch(prober, u8, feats, vals, patches, per_image, gen, cfg.fast, truth_b)
            tally.add(eff, ok, fired)
        if progress:
            progress(n_read + failed)
    seconds = time.perf_counter() - t0
    if not tally.paths:
        why = f" with {sel.describe()} in their mask" if sel is not None and tally.n_unmasked else " could be read"
        raise ProbeError(f"none of the images in {cfg.images}{why}",
                         "check the --images folder" + (" and --masks" if sel is not None else ""))
    if sel is not None and tally.n_unmasked:
        notes.append(f"{tally.n_unmasked} images without {sel.describe()} in their mask were left out")
    effects = tally.effects()
    rows, verdict_ = _aggregate(prober.head.task, effects, cfg, truth is not None)
    result = BatchResult(prober.head.task, len(tally.paths), tally.n_failed, tally.n_fired, features, values, ctrl_f,
                         ctrl_v, freq_source, rows, verdict_, effects, Path(), Path(), seconds, notes, tally.paths)
    _write(cfg, prober, result)
    return result


def _ids(features: list[int]) -> str:
    return ",".join(str(f) for f in features)


def figure_fpath(cfg: BatchConfig) -> Path:
    """The batch probe's PNG (its JSON summary is beside it, .json): --out, else probes/batch_<clamps>.png."""
    slug = "_".join(c.replace("=", "-") for c in cfg.clamps)
    return cfg.out or layout.probes_dpath() / f"batch_{slug}.png"


def _write(cfg: BatchConfig, prober: Prober, result: BatchResult) -> None:
    fpath = figure_fpath(cfg)
    desc = ", ".join(f"{f}={v:.3g}" for f, v in zip(result.features, result.values, strict=True))
    title = (f"clamp {desc} at layer {prober.layer} on {cfg.patches} patches; {result.n_images} images; "
             f"head {prober.head.name}")
    names = {"feature": f"feature {_ids(result.features)}",
             "random feature": f"random feature {_ids(result.control_features)}"}
    result.figure = batch_figure(fpath, result.rows, title, names)
    result.summary = fpath.with_suffix(".json")
    atomic.write_json(
        result.summary,
        {
            "schema_version": SUMMARY_SCHEMA,
            "format": "saevctl-probe-batch",
            "images": cfg.images,
            "clamps": list(cfg.clamps),
            "sae": str(workspace.resolve_sae_ref(cfg.sae)),
            "layer": prober.layer,
            "head": prober.head.name,
            "task": result.task,
            "patches": cfg.patches,
            "features": result.features,
            "values": result.values,
            "control_features": result.control_features,
            "control_values": result.control_values,
            "freq_source": result.freq_source,
            "n_images": result.n_images,
            "n_failed": result.n_failed,
            "n_fired": result.n_fired,
            "n_boot": cfg.n_boot,
            "seed": cfg.seed,
            "specific": result.specific,
            "verdict": result.verdict,
            "masks": [str(m) for m in cfg.masks],
            "metrics": result.rows,
            "seconds": result.seconds,
            "per_image": {
                "paths": result.paths,
                "effects": {c: {k: v.tolist() for k, v in m.items()} for c, m in result.effects.items()},
            },
        },
    )
