"""The vision metrics of an SAE over a store (spatial coherence, sparse probing, absorption) from one shared pass:
`score_vision(sae, store)` for any SAE object (a trained one, or a baseline), and the runs behind
`eval spatial|sparse-probe|absorption` and `eval all`, which write their JSON summaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saevctl import atomic, layout
from saevctl.config import StatsOpts, resolve_device
from saevctl.errors import InputError
from saevctl.eval import common
from saevctl.eval.absorption import AbsorptionResult, absorption_from_codes
from saevctl.eval.config import AbsorbOpts, LabelOpts, ProbeOpts, VisionBase, VisionPass
from saevctl.eval.imagecodes import ImageCodes, encode_store, label_set
from saevctl.eval.recon import default_store
from saevctl.eval.sparse_probe import SparseProbeResult, probe_from_codes
from saevctl.eval.spatial import SpatialResult, plot, spatial_from_codes
from saevctl.sae.model import SAE
from saevctl.store.reader import Store

Progress = Callable[[int], None]
PARTS = ("spatial", "sparse_probe", "absorption")
KINDS = {"spatial": "spatial", "sparse_probe": "sparse-probe", "absorption": "absorption"}
"""Each part's summary name: <kind>.json in the eval folder (spatial.png beside spatial.json)."""


@dataclass
class VisionScores:
    codes: ImageCodes
    spatial: SpatialResult | None = None
    sparse_probe: SparseProbeResult | None = None
    absorption: AbsorptionResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    """Part -> why it did not run (only with skip_unlabelled: the store has no labels of the kind asked for; labels
    of too few images give a result without classes, and a note)."""


def score_vision(sae: SAE, store: Store, *, max_images: int | None = VisionPass.vision_max_images,
                 labels: str = LabelOpts.labels, min_positives: int = LabelOpts.min_positives,
                 probe_k: tuple[int, ...] = ProbeOpts.probe_k, absorb_cos: float = AbsorbOpts.absorb_cos,
                 n_boot: int = StatsOpts.n_boot, seed: int = StatsOpts.seed, parts: tuple[str, ...] = PARTS,
                 skip_unlabelled: bool = False, progress: Progress | None = None,
                 on_total: Callable[[int], None] | None = None) -> VisionScores:
    """Score `parts` of the SAE on the store's first `max_images` images in one pass (the options and their defaults
    are the Configs'). Without usable labels the label-based parts raise InputError, or are recorded in `skipped`
    with `skip_unlabelled`."""
    sae.eval().requires_grad_(False)
    codes = encode_store(sae, store, max_images=max_images, progress=progress, on_total=on_total)
    out = VisionScores(codes)
    if "spatial" in parts:
        out.spatial = spatial_from_codes(codes)
    wanted = [p for p in ("sparse_probe", "absorption") if p in parts]
    if not wanted:
        return out
    try:
        lab = label_set(store, labels, codes.n_images, min_positives, allow_empty=skip_unlabelled)
    except InputError as e:
        if not skip_unlabelled:
            raise
        out.skipped.update(dict.fromkeys(wanted, e.message))
        return out
    if "sparse_probe" in parts:
        out.sparse_probe = (probe_from_codes(codes, lab, probe_k, n_boot, seed) if lab.classes
                            else SparseProbeResult.empty(lab, probe_k))
    if "absorption" in parts:
        out.absorption = (absorption_from_codes(sae, codes, lab, absorb_cos, n_boot, seed) if lab.classes
                          else AbsorptionResult.empty(lab, absorb_cos))
    return out


def options(cfg: Any) -> dict[str, Any]:
    """`score_vision`'s keyword arguments from a Config holding some of the vision options (the rest default)."""
    names = ("labels", "min_positives", "probe_k", "absorb_cos", "n_boot", "seed")
    return {"max_images": cfg.vision_max_images, **{n: getattr(cfg, n) for n in names if hasattr(cfg, n)}}


def sections(scores: VisionScores) -> dict[str, dict[str, Any]]:
    """The report card's figures of each part that ran (the summaries hold the per-feature and per-class detail)."""
    out: dict[str, dict[str, Any]] = {}
    if scores.spatial is not None:
        out["spatial"] = scores.spatial.figures()
    if scores.sparse_probe is not None:
        fig = scores.sparse_probe.figures()
        out["sparse_probe"] = {k: v for k, v in fig.items() if k not in ("per_class", "top_feature")}
    if scores.absorption is not None:
        out["absorption"] = scores.absorption.figures()
    return out


def write_summaries(scores: VisionScores, paths: dict[str, Path], meta: dict[str, Any]) -> dict[str, Path]:
    """Write the summary of each part that ran to `paths[part]` (spatial also its histogram, beside it as .png);
    returns every file written."""
    written: dict[str, Path] = {}
    figs = sections(scores)
    for part, fpath in paths.items():
        if part not in figs:
            continue
        body: dict[str, Any] = {"schema_version": layout.EVAL_SCHEMA, "format": f"{common.FORMAT}-{KINDS[part]}",
                                **meta, **figs[part]}
        if part == "spatial" and scores.spatial is not None:
            png = fpath.with_suffix(".png")
            plot(scores.spatial, png, f"spatial coherence of {meta.get('name', 'the SAE')}'s features")
            body["plot"], body["per_feature"] = png.name, scores.spatial.per_feature()
            written["spatial_plot"] = png
        if part == "sparse_probe" and scores.sparse_probe is not None:
            body = {**body, **scores.sparse_probe.figures()}
        atomic.write_json(fpath, common.jsonable(body))
        written[part] = fpath
    return written


def meta(sae_path: Path, store_dpath: Path, codes: ImageCodes) -> dict[str, Any]:
    return {"sae": str(sae_path), "name": common.ckpt_name(sae_path), "store": str(store_dpath),
            "layer": codes.layer, "n_images": codes.n_images}


@dataclass
class VisionRun:
    scores: VisionScores
    written: dict[str, Path]
    """Part (and spatial_plot) -> the file written."""


def run_part(cfg: VisionBase, part: str, progress: Progress | None = None,
             on_total: Callable[[int], None] | None = None, sae: SAE | None = None) -> VisionRun:
    """`eval spatial|sparse-probe|absorption`: one part, its summary at --out or in the SAE's eval folder."""
    from saevctl.store import open_store

    with common.summary_target(cfg.sae, cfg.index, cfg.out, KINDS[part]) as (sae_path, summary):
        sae = sae if sae is not None else SAE.load(sae_path, device=resolve_device(cfg.device))
        store_dpath = cfg.store or default_store(sae)
        scores = score_vision(sae, open_store(store_dpath), **options(cfg), parts=(part,), progress=progress,
                              on_total=on_total)
        written = write_summaries(scores, {part: summary}, meta(sae_path, store_dpath, scores.codes))
    return VisionRun(scores, written)


@dataclass
class SuitePart:
    """What `eval all` (or a baseline's scoring) adds to its card: sections, results and skip reasons."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def in_suite(cfg: Any, sae: SAE, sae_path: Path, store_dpath: Path | None, store_why: str, out: Path,
             progress: Progress | None = None, on_total: Callable[[int], None] | None = None) -> SuitePart:
    """The vision parts of `eval all --vision` on one SAE, their summaries written into `out`; nothing without
    --vision; a part that cannot run (no store, an SAE without patch tokens, a store without labels) gets its
    reason instead."""
    from saevctl.store import open_store

    if not cfg.vision:
        return SuitePart()
    why = (store_why if store_dpath is None
           else "the SAE was not trained on patch tokens" if "patches" not in sae.cfg.tokens else "")
    if why or store_dpath is None:
        return SuitePart(skipped=dict.fromkeys(PARTS, why))
    scores = score_vision(sae, open_store(store_dpath), **options(cfg), skip_unlabelled=True, progress=progress,
                          on_total=on_total)
    write_summaries(scores, {p: layout.eval_summary_fpath(out, KINDS[p]) for p in PARTS},
                    meta(sae_path, store_dpath, scores.codes))
    results = {p: getattr(scores, p) for p in PARTS if getattr(scores, p) is not None}
    return SuitePart(sections(scores), results, dict(scores.skipped))
