"""`eval baselines` and `eval all --baselines`: null baselines of the SAE's layer, token kinds, width and L0, built
once and cached beside the SAE (`<checkpoint>/baselines/<kind>/`, keyed by the SAE's weights, the store and the
settings), each scored by the same evaluations as the SAE, and the SAE's margin over the best of them per metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl import atomic, layout, lock, workspace
from saevctl.errors import CheckpointError, InputError
from saevctl.eval import common, margins, nullsae, suite
from saevctl.eval.config import BaselineOpts, BaselinesConfig, SuiteOpts
from saevctl.hardware import runs_in
from saevctl.sae.compat import check_compatible
from saevctl.sae.model import SAE
from saevctl.store import Store, open_store

if TYPE_CHECKING:
    from torch import Tensor

    from saevctl.config import Compute
    from saevctl.edit.session import Prober

log = logging.getLogger(__name__)
FORMAT = "saevctl-baseline"
VERSION = 1
"""Bumped when a baseline's construction changes, so cached ones are rebuilt."""


@dataclass
class Built:
    kind: str
    dpath: Path
    reused: bool
    seconds: float
    meta: dict[str, Any]
    """The checkpoint's `baseline` header: kind, key, settings, k, the SAE's mean L0, the SAE and store it is of."""


@dataclass
class BaselinesResult:
    out: Path
    summary: Path
    section: dict[str, Any]
    """What baselines.json holds (and the card's baselines section): k, the baselines, the metric rows."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Parts of the SAE's own evaluation that did not run (so no baseline was scored on them either)."""
    seconds: float = 0.0


# --- the cache ----------------------------------------------------------------------------------------------


def store_fingerprint(store: Store) -> str:
    """The store's manifest and its mask sets' class files (re-extracting or adding --masks changes it)."""
    h = hashlib.sha256(layout.store_manifest_fpath(store.dpath).read_bytes())
    for fpath in sorted(layout.store_labels_dpath(store.dpath).rglob("classes.json")):
        h.update(str(fpath.relative_to(store.dpath)).encode() + fpath.read_bytes())
    return h.hexdigest()


def cache_key(kind: str, sae: SAE, store_fp: str, layer: int, cfg: BaselineOpts, seed: int) -> dict[str, Any]:
    """Everything a baseline depends on; its hash names the cached build."""
    settings: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": kind, "layer": layer,
                                "sae_weights": sae.header.get("weights_sha256"), "store": store_fp, "seed": seed,
                                "sample": cfg.baseline_sample}
    if kind == "kmeans":
        settings["iters"] = cfg.kmeans_iters
    if kind == "random-decoder":
        settings["train_tokens"] = cfg.baseline_train_tokens
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"key": key, "settings": settings}


def _cached(dpath: Path, key: str) -> dict[str, Any] | None:
    """The cached baseline's header if it was built with this key (and its weights are there)."""
    try:
        header = json.loads(layout.sae_config_fpath(dpath).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    meta = header.get("baseline") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("key") != key or not layout.sae_weights_fpath(dpath).is_file():
        return None
    return meta


class _Sample:
    """The store sample behind k and the dictionaries, read once and only when something is built."""

    def __init__(self, sae: SAE, store: Store, layer: int, cfg: BaselineOpts, seed: int) -> None:
        self.sae, self.store, self.layer, self.cfg, self.seed = sae, store, layer, cfg, seed
        self._x: Tensor | None = None
        self._l0: float | None = None

    @property
    def x(self) -> Tensor:
        if self._x is None:
            kinds = tuple(k for k in self.sae.cfg.tokens if k in ("patches", "cls"))
            self._x = nullsae.token_sample(self.store, self.layer, kinds, self.cfg.baseline_sample, self.seed)
        return self._x

    @property
    def l0(self) -> float:
        if self._l0 is None:
            self._l0 = nullsae.mean_l0(self.sae, self.x)
        return self._l0

    @property
    def k(self) -> int:
        """TopK at the SAE's mean L0, so the baselines are exactly as sparse."""
        return max(1, min(self.sae.cfg.n_latents, round(self.l0)))


def _build(kind: str, sample: _Sample, cfg: BaselineOpts, seed: int, run: suite.Run, root: Path) -> SAE:
    sae, k = sample.sae, sample.k
    if kind == "untrained":
        return nullsae.untrained(sae, k, seed)
    if kind == "pca":
        return nullsae.pca(sae, k, sample.x, {"baseline": "pca", "sample": len(sample.x)})
    if kind == "kmeans":
        run.stage("kmeans baseline: k-means", cfg.kmeans_iters, "iter")
        return nullsae.kmeans(sae, k, sample.x, cfg.kmeans_iters, seed,
                              {"baseline": "kmeans", "sample": len(sample.x), "iters": cfg.kmeans_iters}, run.progress)
    assert kind == "random-decoder", kind
    assert run.store is not None
    settings = nullsae.train_settings(sae, k, run.store, sample.layer, cfg.baseline_train_tokens, seed, run.device)
    work = root / ".random-decoder.train"
    shutil.rmtree(work, ignore_errors=True)  # a run killed before: start afresh
    try:
        return nullsae.random_decoder(sae, settings, work, run.progress,
                                      lambda n: run.stage("random-decoder baseline: training", n, "step"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def preflight(cfg: BaselineOpts, sae: SAE, store_dpath: Path) -> None:
    """What would stop a baseline from being built, refused before any evaluation runs: a store that does not fit
    the SAE, or too few tokens for k-means to place a centroid on each latent."""
    store = open_store(store_dpath)
    kinds = tuple(k for k in sae.cfg.tokens if k in ("patches", "cls"))
    layer = check_compatible(sae.cfg, store=store, kinds=kinds)
    per_image = sum(int(np.prod(store.layer(layer).kind(k).shape[1:-1], dtype=np.int64)) for k in kinds)
    n = min(cfg.baseline_sample, store.n_images * per_image)
    if "kmeans" in cfg.baseline_kinds:
        nullsae.check_kmeans_sample(n, sae.cfg.n_latents)


def ensure(cfg: BaselineOpts, seed: int, sae_path: Path, sae: SAE, run: suite.Run) -> dict[str, Built]:
    """Each baseline of `cfg.baseline_kinds`: reused from the cache when its key matches, else built and written
    atomically (a checkpoint folder appears whole or not at all), all under the baselines folder's lock."""
    assert run.store is not None
    if "weights_sha256" not in sae.header:
        raise CheckpointError(f"{sae_path} records no weights hash, so its baselines cannot be cached",
                              "re-save it with saevctl sae import or saevctl train")
    ckpt = workspace.resolve_ckpt(sae_path)
    root = layout.sae_baselines_dpath(ckpt)
    store = open_store(run.store)
    kinds = tuple(k for k in sae.cfg.tokens if k in ("patches", "cls"))
    layer = check_compatible(sae.cfg, store=store, kinds=kinds, sae_path=ckpt)
    store_fp = store_fingerprint(store)
    sample = _Sample(sae, store, layer, cfg, seed)
    out: dict[str, Built] = {}
    with lock.exclusive(root, "the SAE's baselines folder", "--sae"):
        for kind in cfg.baseline_kinds:
            t0 = time.perf_counter()
            dpath = layout.sae_baseline_dpath(ckpt, kind)
            key = cache_key(kind, sae, store_fp, layer, cfg, seed)
            meta = None if cfg.rebuild_baselines else _cached(dpath, key["key"])
            if meta is not None:
                out[kind] = Built(kind, dpath, True, time.perf_counter() - t0, meta)
                continue
            bl = _build(kind, sample, cfg, seed, run, root)
            meta = {"format": FORMAT, "kind": kind, **key, "k": sample.k, "sae_l0": sample.l0,
                    "of": str(ckpt.resolve()), "store_path": str(Path(run.store).resolve())}
            if dpath.exists():
                shutil.rmtree(dpath)  # stale: built for another SAE, store or settings
            with atomic.staged_dir(dpath) as tmp:
                bl.save(tmp, extra={"baseline": meta})
            out[kind] = Built(kind, dpath, False, time.perf_counter() - t0, meta)
            log.info("built the %s baseline in %.1f s", kind, out[kind].seconds)
    return out


# --- scoring -----------------------------------------------------------------------------------------------


def _labelled_index(b: Built, run: suite.Run, compute: Compute) -> Path:
    """The baseline mined (in `compute` precision, as the SAE was) and labelled (patch level) into its own index,
    by mine's and features label's own code, reused while the baseline and the precision are. One pass over the
    store: label reads the codes mine keeps beside the index (saevctl/mine/codes.py)."""
    from saevctl.mine import Config as MineConfig
    from saevctl.mine import run as mine
    from saevctl.mine.config import LabelConfig
    from saevctl.mine.label import run as label

    fpath = layout.sae_baseline_index_fpath(b.dpath)
    # reused if mined as mine would mine it now: an SAE mined in bfloat16 elsewhere has its baselines mined in
    # float32 on a CPU without fast bfloat16, and that index is kept, not mined again at every run
    if (fpath.is_file() and suite.coverage(fpath, b.dpath, 0.5)[0] is not None
            and suite.mined_compute(fpath, b.dpath) == runs_in(compute, run.device)):
        return fpath
    mine(MineConfig(sae=b.dpath, store=run.store, index=fpath, name=f"{b.kind}-baseline", set_defaults=False,
                    device=run.device, compute=compute),
         run.progress, on_total=lambda n: run.stage(f"{b.kind} baseline: mine", n))
    label(LabelConfig(sae=str(b.dpath), index=fpath, store=run.store, level="patch", device=run.device),
          run.progress, on_total=lambda n: run.stage(f"{b.kind} baseline: label", n))
    return fpath


def score_baselines(cfg: SuiteOpts, opts: BaselineOpts, sae_path: Path, sae: SAE, prober: Prober | None, out: Path,
                    run: suite.Run, scores: suite.Scores, compute: Compute = "float32"
                    ) -> tuple[dict[str, Any] | None, str]:
    """Build (or reuse) the baselines, run on each the evaluations that ran on the SAE, and compare; writes
    baselines.json into `out`. Returns the card's section, or None and why there is none. The baselines are mined
    in `compute` precision: the SAE's own (`suite.mined_compute`)."""
    from saevctl.edit.session import Prober

    if run.store is None:
        return None, f"the baselines are built from the store, and there is none: {run.store_why}"
    built = ensure(opts, cfg.seed, sae_path, sae, run)
    labels = "coverage" in scores.sections and open_store(run.store).patch_labels is not None
    notes = [] if labels or "coverage" not in scores.sections else [
        f"label coverage and edits were not scored on the baselines: the store {run.store} has no patch labels"]
    per: dict[str, suite.Scores] = {}
    for kind, b in built.items():
        bl = SAE.load(b.dpath, run.device)
        bl_prober = Prober(bl, prober.bb, prober.head) if prober is not None else None
        index = _labelled_index(b, run, compute) if labels else None
        per[kind] = suite.evaluate(cfg, b.dpath, bl, bl_prober, index, layout.eval_baseline_dpath(out, kind), run,
                                   what=f"{kind} baseline: ")
    first = next(iter(built.values())).meta
    section = {"k": first["k"], "sae_l0": first["sae_l0"], "store": str(run.store), "n_boot": cfg.n_boot,
               "mined_in": compute,
               "baselines": {k: {"path": str(b.dpath), "reused": b.reused, "build_seconds": b.seconds,
                                 "skipped": per[k].skipped} for k, b in built.items()},
               "metrics": margins.table(scores.results, {k: s.results for k, s in per.items()}, cfg.n_boot, cfg.seed),
               "notes": notes}
    atomic.write_json(layout.eval_baselines_fpath(out), common.jsonable({
        "schema_version": layout.EVAL_SCHEMA, "format": common.FORMAT + "-baselines", "sae": str(sae_path),
        **section}))
    return section, ""


def run_baselines(cfg: BaselinesConfig, progress: suite.Progress | None = None,
                  on_stage: suite.Stage | None = None) -> BaselinesResult:
    """`eval baselines`: the SAE's evaluations, then the baselines' and the margins; baselines.json in the SAE's
    eval folder (or --out)."""
    t0 = time.perf_counter()
    sae_path = workspace.resolve_sae_ref(cfg.sae)
    index_fpath = suite.find_index(cfg)
    out = cfg.out or common.out_dpath(sae_path, index_fpath)
    with lock.exclusive(out, "the eval output folder", "--out"):
        sae, prober, run = suite.open_run(cfg, sae_path, progress, on_stage)
        if run.store is None:
            raise InputError(f"eval baselines needs the SAE's store: {run.store_why}", "pass --store DIR")
        preflight(cfg, sae, run.store)
        scores = suite.evaluate(cfg, sae_path, sae, prober, index_fpath, out, run)
        section, _ = score_baselines(cfg, cfg, sae_path, sae, prober, out, run, scores,
                                     suite.mined_compute(index_fpath, sae_path))
    assert section is not None
    return BaselinesResult(out, layout.eval_baselines_fpath(out), section, scores.skipped, time.perf_counter() - t0)
