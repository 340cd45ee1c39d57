"""`eval all`: run every evaluation the given inputs allow (reconstruction, splice, label coverage, edits),
say why the others were skipped, and write the report card beside their JSON summaries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saevctl import layout, lock, workspace
from saevctl.config import resolve_device
from saevctl.edit.heads import resolve_head
from saevctl.edit.session import Prober, load_sae_and_backbone
from saevctl.errors import InputError
from saevctl.eval import card, common
from saevctl.eval.config import AllConfig, EditOpts, EditsConfig, ImageEval, ReconConfig, SpliceConfig
from saevctl.eval.edits import run_edits
from saevctl.eval.recon import run_recon
from saevctl.eval.splice import run_splice

if TYPE_CHECKING:
    from saevctl.sae import SAE

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
Stage = Callable[[str, "int | None"], None]


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


def _index(cfg: AllConfig) -> Path | None:
    ref = cfg.index if cfg.index is not None else workspace.get_default("index")
    if ref is None:
        return None
    fpath = Path(ref).expanduser()
    if not fpath.is_file():
        if cfg.index is not None:
            raise InputError(f"mined index {fpath} does not exist", "run saevctl mine first, or fix --index")
        return None
    return fpath


def _store(cfg: AllConfig, sae: SAE) -> tuple[Path | None, str]:
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
    return {"coverage": share, "n_classes": len(rows), "n_covered": covered, "min_auroc": min_auroc,
            "level": "patch", "sae_id": sae_id}, ""


def sae_card_info(sae: SAE, sae_path: Path) -> dict[str, Any]:
    c = sae.cfg
    return {"name": common.ckpt_name(sae_path), "path": str(sae_path.resolve()), "model_spec": c.model.get("spec"),
            "layer": c.layer, "n_latents": c.n_latents, "activation": c.activation, "k": c.k, "tokens": list(c.tokens)}


def _prober(cfg: AllConfig, sae_path: Path, device: str) -> tuple[SAE, Prober | None]:
    """The SAE, and a Prober (SAE + ViT + head) when there are images to run."""
    if cfg.images is None:
        from saevctl.sae import SAE

        return SAE.load(sae_path, device=device), None
    sae, bb = load_sae_and_backbone(sae_path, device)
    head = cfg.head or ("saliency" if bb.spec == "demo" else ("clip" if cfg.classes else "timm"))
    return sae, Prober(sae, bb, resolve_head(head, bb, cfg.classes))


def _edits_skip(cfg: AllConfig, prober: Prober | None, cov: dict[str, Any] | None, cov_why: str) -> str:
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


def _shared(cfg: AllConfig, *mixins: type) -> dict[str, Any]:
    """The values of the options eval all shares with one evaluation (the fields of these mixins)."""
    return {f.name: getattr(cfg, f.name) for m in mixins for f in dataclasses.fields(m)}


def run_all(cfg: AllConfig, progress: Progress | None = None, on_stage: Stage | None = None) -> AllResult:
    """Run what applies, then write the card; `on_stage(name, total)` announces each stage once it knows its
    image count (before the stage's first progress)."""
    t0 = time.perf_counter()
    sae_path = workspace.resolve_sae_ref(cfg.sae)
    index_fpath = _index(cfg)
    out = cfg.out or common.out_dpath(sae_path, index_fpath)
    with lock.exclusive(out, "the eval output folder", "--out"):  # held by the evaluations inside it too
        return _run_all(cfg, sae_path, index_fpath, out, t0, progress, on_stage)


def _run_all(cfg: AllConfig, sae_path: Path, index_fpath: Path | None, out: Path, t0: float,
             progress: Progress | None, on_stage: Stage | None) -> AllResult:
    device = resolve_device(cfg.device)
    sae, prober = _prober(cfg, sae_path, device)
    stage = on_stage or (lambda name, total: None)
    results: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    store, why = _store(cfg, sae)
    # Every evaluation gets eval all's options, with the SAE, index and device resolved once and its own output.
    resolved: dict[str, Any] = {"sae": sae_path, "index": index_fpath, "device": device}
    if store is not None:
        rec = run_recon(ReconConfig(**resolved, store=store, out=layout.eval_summary_fpath(out, "recon"),
                                    max_images=cfg.recon_max_images), progress, sae=sae,
                        on_total=lambda n: stage("reconstruction", n))
        results["recon"] = rec
        sections["recon"] = {**rec.figures(), "store": str(store), "kinds": list(rec.kinds)}
    else:
        skipped["recon"] = why
    if prober is not None:
        sp = run_splice(SpliceConfig(**(_shared(cfg, ImageEval) | resolved), store=store,
                                     out=layout.eval_summary_fpath(out, "splice")),
                        progress, prober=prober, on_total=lambda n: stage("splice", n))
        results["splice"] = sp
        sections["splice"] = {"head": sp.head, "task": sp.task, "layer": sp.layer, "kinds": list(sp.kinds),
                              "n_images": sp.n_images, "mean_source": sp.mean_source, "metrics": sp.rows}
    else:
        skipped["splice"] = "no --images"
    cov, cov_why = coverage(index_fpath, sae_path, cfg.min_auroc)
    if cov is not None:
        results["coverage"] = sections["coverage"] = cov
    else:
        skipped["coverage"] = cov_why
    why = _edits_skip(cfg, prober, cov, cov_why)
    if not why:
        ed = run_edits(EditsConfig(**(_shared(cfg, ImageEval, EditOpts) | resolved),
                                   out=layout.eval_summary_fpath(out, "edits")),
                       progress, prober=prober, on_total=lambda n: stage("edits", n))
        results["edits"] = ed
        sections["edits"] = {"value": cfg.value, "n_images": ed.n_images, "classes": ed.rows}
    else:
        skipped["edits"] = why
    html_fpath, json_fpath, figures = card.write_card(out, sae_card_info(sae, sae_path), sections, skipped)
    return AllResult(out, html_fpath, json_fpath, figures, results, skipped, time.perf_counter() - t0)
