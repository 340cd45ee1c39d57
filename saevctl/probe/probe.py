"""One causal probe: clamp SAE features on chosen patches of one image and compare a head's output
before and after (summary tables for the CLI, and a PNG)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saevctl import layout, workspace
from saevctl.config import resolve_device
from saevctl.data import open_image
from saevctl.edit.clamps import Clamp, parse_clamp
from saevctl.edit.edit import Patches, apply_edit, make_plan, parse_patches, static_mask
from saevctl.edit.effects import classify_summary, dense_summary
from saevctl.edit.maskpatches import mask_patches
from saevctl.edit.session import Prober, clamp_values, open_index_stats
from saevctl.errors import ProbeError
from saevctl.probe.config import Config
from saevctl.probe.figures import probe_figure

log = logging.getLogger(__name__)


@dataclass
class Result:
    task: str
    classes: list[str]
    features: list[int]
    values: list[float]
    clamps: list[str]
    edited_hw: np.ndarray
    """Patch grid mask of the edited patches (any feature)."""
    before: np.ndarray
    after: np.ndarray
    summary: dict[str, Any]
    figure: Path
    head: str
    notes: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")[:80] or "probe"


def default_figure_fpath(image: str, clamps: tuple[str, ...]) -> Path:
    stem = Path(image.removeprefix("skimage:").split("#")[0]).stem
    return layout.probes_dpath() / f"{_slug(stem)}_{_slug('_'.join(clamps))}.png"


def resolve_features(prober: Prober, clamps: list[Clamp], x_btd: torch.Tensor) -> list[int]:
    """Feature ids, with `top` replaced by this image's most active feature."""
    return [c.feature if c.feature is not None else prober.top_feature(x_btd) for c in clamps]


def prepare(cfg: Config) -> tuple[Prober, list[Clamp]]:
    """Load and cross-check everything a probe needs; fails early on bad clamps or patches."""
    clamps = [parse_clamp(c) for c in cfg.clamps]
    patches = parse_patches(cfg.patches)
    prober = Prober.load(cfg.sae, cfg.head, cfg.classes, resolve_device(cfg.device))
    prober.check_clamps(clamps)
    static_mask(patches, prober.bb.layout, prober.bb.patch_size)  # a patch outside the grid fails before any work
    return prober, clamps


def image_patch_mask(cfg: Config, prober: Prober, patches: Patches) -> tuple[torch.Tensor | None, list[str]]:
    """The patches to edit in this image: a fixed mask (all, cells, box), None (fired: decided by the codes), or
    the image's patches of a mask class (mask:CLASS), with a note when that class covers none."""
    lay = prober.bb.layout
    sel = mask_patches(patches.kind, patches.mask_set, patches.mask_class, cfg.masks, prober.sae.cfg.train)
    if sel is None:
        return static_mask(patches, lay, prober.bb.patch_size), []
    chosen = sel.select(cfg.image, prober.bb.preprocess, (lay.grid_h, lay.grid_w))
    if chosen is None:
        raise ProbeError(f"{cfg.image} has no mask in {sel.masks.dpath} (mask set {sel.set_name})",
                         "pass the folder holding its mask with --masks DIR")
    notes = [] if chosen.any() else [f"{sel.describe()} covers no patch of this image, so nothing was edited"]
    return torch.from_numpy(chosen), notes


def run(cfg: Config, prober: Prober | None = None, figure: bool = True) -> Result:
    """Probe one image; `prober` reuses already loaded models (it must match cfg's SAE and head). `figure=False`
    skips drawing the PNG (saevctl serve draws its own panels from the same numbers); `Result.figure` then names
    where it would have gone."""
    image = open_image(cfg.image)  # a missing or corrupt image fails before the models load
    if prober is None:
        prober, clamps = prepare(cfg)
    else:
        clamps = [parse_clamp(c) for c in cfg.clamps]
        prober.check_clamps(clamps)
    patches = parse_patches(cfg.patches)
    lay = prober.bb.layout
    stats = None
    if any(c.multiple for c in clamps):  # before any model work: a missing index is a quick error
        stats = open_index_stats(cfg.index, workspace.resolve_sae_ref(cfg.sae), prober.sae.cfg.n_latents)
        named = [c for c in clamps if c.feature is not None]
        clamp_values(named, [c.feature for c in named if c.feature is not None], stats)
    image_u8, x_bchw = prober.to_input([image])
    x_btd = prober.prefix(x_bchw)
    features = resolve_features(prober, clamps, x_btd)
    values = clamp_values(clamps, features, stats)
    mask_p, mask_notes = image_patch_mask(cfg, prober, patches)
    plan = make_plan(prober.sae, x_btd[:, lay.n_prefix :], features, torch.tensor([values]), patches, mask_p)
    before = prober.outputs(x_btd)[0].float().cpu().numpy()
    after = prober.outputs(apply_edit(prober.sae, x_btd, lay, plan, fast=cfg.fast))[0].float().cpu().numpy()
    edited_hw = plan.edited_np[0].cpu().numpy().reshape(lay.grid_h, lay.grid_w)
    notes = [f"feature {f} fires on no patch of this image, so nothing was edited; try --patches all"
             for j, f in enumerate(features) if patches.kind == "fired" and not bool(plan.mask_npk[0, :, j].any())]
    notes += mask_notes
    head = prober.head
    if head.task == "classify":
        summary = classify_summary(before, after, head.classes)
    else:
        summary = dense_summary(before, after, head.task, head.classes)
    desc = ", ".join(f"{f}={v:.3g}" for f, v in zip(features, values, strict=True))
    fpath = cfg.out or default_figure_fpath(cfg.image, cfg.clamps)
    title = (f"{Path(cfg.image).name}: clamp {desc} at layer {prober.layer} on {patches.describe()} patches; "
             f"head {head.name}")
    if figure:
        probe_figure(fpath, head.task, image_u8[0], edited_hw, before, after, head.classes, title)
    log.info("probed %s: %s on %d patches, figure %s", cfg.image, desc, int(edited_hw.sum()), fpath)
    return Result(head.task, head.classes, features, values, list(cfg.clamps), edited_hw, before, after, summary,
                  fpath, head.name, notes)
