"""`eval all`: run every evaluation the given inputs allow (reconstruction, splice, label coverage, edits; with
--vision spatial coherence, sparse probing, absorption), say why the others were skipped, and write the report card
beside their JSON summaries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saevctl import layout, lock, rerun, workspace
from saevctl.config import resolve_device
from saevctl.edit.heads import resolve_head
from saevctl.edit.session import Prober, load_sae_and_backbone
from saevctl.errors import InputError
from saevctl.eval import card, common, fresh, vision
from saevctl.eval.config import AllConfig, EditOpts, EditsConfig, ImageEval, ReconConfig, SpliceConfig, SuiteOpts
from saevctl.eval.edits import run_edits
from saevctl.eval.passes import Passes
from saevctl.eval.recon import run_recon
from saevctl.eval.splice import run_splice

if TYPE_CHECKING:
    from saevctl.config import Compute
    from saevctl.sae import SAE

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


Stage = Callable[..., None]
"""stage(name, total, unit="img"): announces a stage of work and its size before its first progress (a new bar);
written loosely because its unit is optional."""


def _no_stage(name: str, total: int | None, unit: str = "img") -> None:
    """The stage callback when nobody listens."""


@dataclass
class AllResult:
    out: Path
    card: Path
    card_json: Path
    figures: dict[str, Any] = field(default_factory=dict)
    """The card's content (what card.json holds): sae, sections (None when skipped), skipped."""
    results: dict[str, Any] = field(default_factory=dict)
    """recon/splice/edits results and the coverage dict, for those that ran."""
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    unchanged: bool = False
    """The card in `out` was made from the same inputs (saevctl.rerun): kept, nothing evaluated."""


def find_index(cfg: SuiteOpts) -> Path | None:
    ref = cfg.index if cfg.index is not None else workspace.get_default("index")
    if ref is None:
        return None
    fpath = Path(ref).expanduser()
    if not fpath.is_file():
        if cfg.index is not None:
            raise InputError(f"mined index {fpath} does not exist", "run saevctl mine first, or fix --index")
        return None
    return fpath


def _store(cfg: SuiteOpts, sae: SAE) -> tuple[Path | None, str]:
    if cfg.store is not None:
        return cfg.store, ""
    ref = sae.cfg.train.get("store") if isinstance(sae.cfg.train, dict) else None
    if ref and Path(ref).is_dir():
        return Path(ref), ""
    return None, ("no --store given" + (f" and the SAE's training store {ref} is gone" if ref else ""))


def coverage(index_fpath: Path | None, sae_path: Path, min_auroc: float) -> tuple[dict[str, Any] | None, str]:
    """Share of labelled classes whose best patch-level feature reaches `min_auroc`, or why there is none."""
    from saevctl.errors import IndexError_
    from saevctl.mine.index import Index

    if index_fpath is None:
        return None, "no mined index (pass --index, or run saevctl mine here)"
    try:
        with Index.open(index_fpath, read_only=True) as idx:
            sae_id = idx.resolve_sae(str(sae_path))
            rows = [r for r in idx.class_features(sae_id, level="patch") if (r["n_positive"] or 0) > 0]
            share = idx.label_coverage(sae_id, "patch", min_auroc) if rows else 0.0
    except IndexError_ as e:
        return None, e.message
    if not rows:
        return None, (f"SAE {sae_id} has no patch-level labels "
                      "(run saevctl features label on a store extracted with --masks)")
    covered = sum(1 for r in rows if r["auroc"] is not None and r["auroc"] >= min_auroc)
    # each class's best feature, which the baselines' comparison resamples (bootstrap over classes)
    classes = [{"class_id": r["class_id"], "class": r["class_name"], "feature": r["feature"], "auroc": r["auroc"]}
               for r in rows]
    return {"coverage": share, "n_classes": len(rows), "n_covered": covered, "min_auroc": min_auroc,
            "level": "patch", "sae_id": sae_id, "classes": classes}, ""


def mined_compute(index_fpath: Path | None, sae_path: Path) -> Compute:
    """The precision the SAE's index was mined in (mine --compute), which its baselines are mined in too, so that
    the comparison is like for like; float32 without an index."""
    from saevctl.errors import IndexError_
    from saevctl.mine.index import Index
    from saevctl.mine.pipeline import recorded_compute

    if index_fpath is None:
        return "float32"
    try:
        with Index.open(index_fpath, read_only=True) as idx:
            got = recorded_compute(idx.sae_info(idx.resolve_sae(str(sae_path))))["compute"]
    except IndexError_:
        return "float32"
    return "bfloat16" if got == "bfloat16" else "float32"


def sae_card_info(sae: SAE, sae_path: Path) -> dict[str, Any]:
    c = sae.cfg
    return {"name": common.ckpt_name(sae_path), "path": str(sae_path.resolve()), "model_spec": c.model.get("spec"),
            "layer": c.layer, "n_latents": c.n_latents, "activation": c.activation, "k": c.k, "tokens": list(c.tokens)}


def _prober(cfg: SuiteOpts, sae_path: Path, device: str) -> tuple[SAE, Prober | None]:
    """The SAE, and a Prober (SAE + ViT + head) when there are images to run."""
    if cfg.images is None:
        from saevctl.sae import SAE

        return SAE.load(sae_path, device=device), None
    sae, bb = load_sae_and_backbone(sae_path, device)
    head = cfg.head or ("saliency" if bb.spec == "demo" else ("clip" if cfg.classes else "timm"))
    return sae, Prober(sae, bb, resolve_head(head, bb, cfg.classes))


def _edits_skip(cfg: SuiteOpts, prober: Prober | None, cov: dict[str, Any] | None, cov_why: str) -> str:
    if prober is None:
        return "no --images"
    if cfg.masks is None:
        return "no --masks"
    if prober.head.task != "segment":
        return f"head {prober.head.name} is a {prober.head.task} head; edits need a segment head"
    if cov is None:
        return cov_why
    if not cov["n_covered"]:
        return f"no class has a feature with patch AUROC >= {cfg.min_auroc}"
    return ""


def _shared(cfg: SuiteOpts, *mixins: type) -> dict[str, Any]:
    """The values of the options eval all shares with one evaluation (the fields of these mixins)."""
    return {f.name: getattr(cfg, f.name) for m in mixins for f in dataclasses.fields(m)}


def run_all(cfg: AllConfig, progress: Progress | None = None, on_stage: Stage | None = None) -> AllResult:
    """Run what applies (and, with cfg.baselines, the same on each null baseline), then write the card;
    `on_stage(name, total)` announces each stage once it knows its item count (before the stage's first progress)."""
    t0 = time.perf_counter()
    sae_path = workspace.resolve_sae_ref(cfg.sae)
    index_fpath = find_index(cfg)
    out = cfg.out or common.out_dpath(sae_path, index_fpath)
    inputs = fresh.inputs(cfg)
    card_json = layout.eval_card_json_fpath(out)
    with lock.exclusive(out, "the eval output folder", "--out"):  # held by the evaluations inside it too
        if layout.eval_card_fpath(out).is_file() and (card := rerun.kept(card_json, inputs, cfg.force)) is not None:
            return AllResult(out, layout.eval_card_fpath(out), card_json, card, {}, card.get("skipped", {}), 0.0,
                             unchanged=True)
        res = _run_all(cfg, sae_path, index_fpath, out, t0, progress, on_stage)
        rerun.record(res.card_json, inputs)
    return res


@dataclass
class Scores:
    """One SAE's evaluations: the card's sections (those that ran), the full results, and why the others did not."""

    sections: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """What every evaluation of one command shares: the store (or why there is none), device and progress."""

    store: Path | None
    store_why: str
    device: str
    progress: Progress | None
    stage: Stage
    passes: Passes = field(default_factory=Passes)
    """The SAE-independent ViT passes, shared by the evaluations of the SAE and of its baselines."""


def open_run(cfg: SuiteOpts, sae_path: Path, progress: Progress | None,
             on_stage: Stage | None) -> tuple[SAE, Prober | None, Run]:
    """The SAE, its Prober when there are images, and the shared inputs of its evaluations."""
    device = resolve_device(cfg.device)
    sae, prober = _prober(cfg, sae_path, device)
    store, why = _store(cfg, sae)
    return sae, prober, Run(store, why, device, progress, on_stage or _no_stage)


def evaluate(cfg: SuiteOpts, sae_path: Path, sae: SAE, prober: Prober | None, index_fpath: Path | None, out: Path,
             run: Run, what: str = "") -> Scores:
    """Every evaluation the inputs allow on one SAE (the SAE under test, or a baseline: `what` prefixes the
    progress stages), each summary written into `out`."""
    sc = Scores()
    # Every evaluation gets the suite's options, with the SAE, index and device resolved once and its own output.
    resolved: dict[str, Any] = {"sae": sae_path, "index": index_fpath, "device": run.device}
    if run.store is not None:
        rec = run_recon(ReconConfig(**resolved, store=run.store, out=layout.eval_summary_fpath(out, "recon"),
                                    max_images=cfg.recon_max_images), run.progress, sae=sae,
                        on_total=lambda n: run.stage(what + "reconstruction", n))
        sc.results["recon"] = rec
        sc.sections["recon"] = {**rec.figures(), "store": str(run.store), "kinds": list(rec.kinds)}
    else:
        sc.skipped["recon"] = run.store_why
    if prober is not None:
        sp = run_splice(SpliceConfig(**(_shared(cfg, ImageEval) | resolved), store=run.store,
                                     out=layout.eval_summary_fpath(out, "splice")),
                        run.progress, prober=prober, on_total=lambda n: run.stage(what + "splice", n),
                        passes=run.passes)
        sc.results["splice"] = sp
        sc.sections["splice"] = {"head": sp.head, "task": sp.task, "layer": sp.layer, "kinds": list(sp.kinds),
                                 "n_images": sp.n_images, "mean_source": sp.mean_source, "metrics": sp.rows}
    else:
        sc.skipped["splice"] = "no --images"
    cov, cov_why = coverage(index_fpath, sae_path, cfg.min_auroc)
    if cov is not None:
        sc.results["coverage"] = sc.sections["coverage"] = cov
    else:
        sc.skipped["coverage"] = cov_why
    why = _edits_skip(cfg, prober, cov, cov_why)
    if not why:
        ed = run_edits(EditsConfig(**(_shared(cfg, ImageEval, EditOpts) | resolved),
                                   out=layout.eval_summary_fpath(out, "edits")),
                       run.progress, prober=prober, on_total=lambda n: run.stage(what + "edits", n),
                       passes=run.passes)
        sc.results["edits"] = ed
        sc.sections["edits"] = {"value": cfg.value, "n_images": ed.n_images, "classes": ed.rows}
    else:
        sc.skipped["edits"] = why
    vis = vision.in_suite(cfg, sae, sae_path, run.store, run.store_why, out, run.progress,
                          lambda n: run.stage(what + "vision metrics", n))
    sc.sections.update(vis.sections)
    sc.results.update(vis.results)
    sc.skipped.update(vis.skipped)
    return sc


def _run_all(cfg: AllConfig, sae_path: Path, index_fpath: Path | None, out: Path, t0: float,
             progress: Progress | None, on_stage: Stage | None) -> AllResult:
    sae, prober, run = open_run(cfg, sae_path, progress, on_stage)
    if cfg.baselines and run.store is not None:
        from saevctl.eval.baselines import preflight

        preflight(cfg, sae, run.store)  # before any evaluation runs
    sc = evaluate(cfg, sae_path, sae, prober, index_fpath, out, run)
    if cfg.baselines:
        from saevctl.eval.baselines import score_baselines

        section, why = score_baselines(cfg, cfg, sae_path, sae, prober, out, run, sc,
                                       mined_compute(index_fpath, sae_path))
        if section is not None:
            sc.results["baselines"] = sc.sections["baselines"] = section
        else:
            sc.skipped["baselines"] = why
    html_fpath, json_fpath, figures = card.write_card(out, sae_card_info(sae, sae_path), sc.sections, sc.skipped)
    return AllResult(out, html_fpath, json_fpath, figures, sc.results, sc.skipped, time.perf_counter() - t0)
