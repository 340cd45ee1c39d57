"""`features label`: which class each feature detects, and which feature best detects each class, from the
store's per-patch (extract --masks) or per-image (ImageFolder) labels, streamed chunk by chunk into the index.

Per feature and class: AUROC of the feature's activation for 'this patch/image is class c' and the best F1 of
'activation > t' over a few thresholds t (fractions of the feature's max). Method and error: docs/eval.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saevctl import lock, workspace
from saevctl.config import resolve_device
from saevctl.errors import IndexError_, StoreError
from saevctl.mine import fresh
from saevctl.mine.config import LabelConfig as Config
from saevctl.mine.index import Index
from saevctl.mine.labelsource import NEGATIVES, LevelLabels, _presence_pairs, level_labels
from saevctl.mine.labelstats import ClassHistograms, scores
from saevctl.mine.queries import sae_in_index
from saevctl.mine.scan import TopKCodes
from saevctl.store import Store, open_store

__all__ = ["Config", "LevelResult", "Result", "_presence_pairs", "run"]  # _presence_pairs: tests import it here

if TYPE_CHECKING:
    from saevctl.sae import SAE

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
# Codes materialised per chunk (floats), as in mining; bounds the working set whatever the store size.
CHUNK_CODES = 1 << 24


@dataclass(frozen=True)
class LevelResult:
    level: str
    """As written to the index: patch or image (the default mask set), patch:NAME or image:NAME (another set)."""
    n_items: int
    """Labelled patches (patch level) or images (image level) that took part."""
    n_classes: int
    """Classes with at least one positive and one negative item."""
    coverage: dict[float, float]
    """Share of those classes whose best feature reaches each AUROC in COVERAGE_AT."""
    max_error: float
    """Largest bound on the binned AUROC's error among the written rows (see docs/eval.md)."""
    classes: list[dict[str, Any]] = field(default_factory=list)
    """class_features rows, best AUROC first."""
    negatives: str = ""
    """What each class was ranked against, in words."""


@dataclass(frozen=True)
class Result:
    index: Path
    sae_id: str
    levels: dict[str, LevelResult]
    n_passes: int
    seconds: float
    unchanged: bool = False
    """Labelled before from the same inputs (saevctl.rerun): the recorded result, nothing recomputed."""


COVERAGE_AT = (0.7, 0.8, 0.9)


def upgrade_index(index_fpath: Path) -> None:
    """Migrate an index mined before the label tables existed (labelling writes to it anyway)."""
    if index_fpath.is_file():
        Index.open(index_fpath, read_only=False).close()


def _resolve(cfg: Config, index_fpath: Path) -> tuple[str, dict[str, Any], np.ndarray]:
    """The SAE id, its index info and each feature's max on patch tokens; errors before any compute."""
    upgrade_index(index_fpath)
    with Index.open(index_fpath) as idx:
        sae_id = sae_in_index(idx, cfg.sae)
        info = idx.sae_info(sae_id)
        if "patches" not in info["tokens"]:
            raise IndexError_(f"SAE {sae_id} was mined on {', '.join(info['tokens'])} tokens",
                              "labels need patch tokens")
        n = int(info["n_latents"])
        rows = idx.list_features(sae_id, sort="feature", limit=n, token="patches", descending=False)
    max_s = np.zeros(n, dtype=np.float64)
    max_s[[r["feature"] for r in rows]] = [r["max"] for r in rows]
    return sae_id, info, max_s


def _load(cfg: Config, info: dict[str, Any], device: str) -> tuple[Any, Store, int]:
    from saevctl.mine.pipeline import check_match
    from saevctl.sae import SAE

    store_dpath = cfg.store or Path(info.get("store_path") or "")
    if cfg.store is None and not store_dpath.is_dir():
        raise StoreError(f"the store {info.get('store_path')} that {info['sae_id']} was mined on is gone",
                         "pass --store DIR")
    given = Path(cfg.sae).expanduser() if cfg.sae is not None else None
    sae_dpath = given if given is not None and given.exists() else Path(info["ckpt_path"])
    if not sae_dpath.exists():
        raise IndexError_(f"the checkpoint of {info['sae_id']} recorded in the index ({sae_dpath}) is gone",
                          "pass --sae PATH to it")
    sae = SAE.load(sae_dpath, device)
    store = open_store(store_dpath)
    return sae, store, check_match(sae, store, sae_dpath)


def _feature_blocks(n_latents: int, labels: list[LevelLabels], cfg: Config) -> list[tuple[int, int]]:
    """Feature ranges whose histograms fit the memory budget: each is one pass over the store."""
    per_feature = sum((len(lab.classes) + 1) * cfg.n_bins * 4 for lab in labels)
    size = max(1, min(n_latents, int(cfg.max_memory_mb * (1 << 20)) // per_feature))
    return [(lo, min(lo + size, n_latents)) for lo in range(0, n_latents, size)]


class _Best:
    """Running best feature per class (by AUROC, ties: F1, then the smaller feature id) over feature blocks."""

    def __init__(self, n_classes: int) -> None:
        self.auroc = np.full(n_classes, -np.inf)
        self.f1 = np.full(n_classes, -np.inf)
        self.threshold = np.full(n_classes, np.nan)
        self.error = np.full(n_classes, np.nan)
        self.feature = np.full(n_classes, -1, dtype=np.int64)

    def fold(self, f0: int, auroc_fc: np.ndarray, f1_fc: np.ndarray, thr_fc: np.ndarray, err_fc: np.ndarray) -> None:
        a = np.where(np.isnan(auroc_fc), -np.inf, auroc_fc)
        top = a.max(0)
        f1 = np.where(a >= top[None, :], f1_fc, -np.inf)
        f = f1.argmax(0)  # first maximum: the smallest feature id among equals
        c = np.arange(a.shape[1])
        better = (top > self.auroc) | ((top == self.auroc) & (f1[f, c] > self.f1))
        better &= np.isfinite(top)
        self.auroc[better], self.f1[better] = top[better], f1[f, c][better]
        self.threshold[better], self.error[better] = thr_fc[f, c][better], err_fc[f, c][better]
        self.feature[better] = f0 + f[better]


def _feature_rows(f0: int, lab: LevelLabels, auroc_fc: np.ndarray, f1_fc: np.ndarray, thr_fc: np.ndarray,
                  fired_f: np.ndarray) -> dict[str, np.ndarray]:
    """feature_labels columns of a block: each feature's best class (None for features that never fired)."""
    a = np.where(np.isnan(auroc_fc), -np.inf, auroc_fc)
    top = a.max(1)
    best = np.where(a >= top[:, None], f1_fc, -np.inf).argmax(1)
    rows = np.arange(len(a))
    ok = fired_f & np.isfinite(top)
    class_id = np.where(ok, best, -1)
    names = np.array([lab.classes[c] if c >= 0 else None for c in class_id], dtype=object)
    return {"feature": (f0 + rows).astype(np.int32), "class_id": class_id.astype(np.int32), "class_name": names,
            "auroc": np.where(np.isfinite(top), top, np.nan),
            "f1": np.where(ok, f1_fc[rows, best], 0.0), "threshold": np.where(ok, thr_fc[rows, best], np.nan)}


def _block_codes(sae: SAE, encode: Callable[..., torch.Tensor | TopKCodes], x_nd: torch.Tensor, f0: int, f1: int,
                 buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero codes of features f0..f1 as (item, feature - f0, value), by mining's encoder (the same codes mine
    scans). A TopK SAE's come straight from its top-k (no dense codes, no scan). The (n, s) pre-activations go
    into `buf`, reused across chunks: a fresh tensor per chunk costs a page fault per 4 KiB, about as much as the
    GEMM's own pass over it."""
    codes = encode(x_nd, out=buf[: len(x_nd) * sae.cfg.n_latents].view(len(x_nd), sae.cfg.n_latents))
    if isinstance(codes, TopKCodes):
        return _topk_nonzero(codes.vals_tk, codes.idx_tk, f0, f1)
    codes_nf = codes[:, f0:f1]
    nz_i, nz_f = codes_nf.nonzero(as_tuple=True)
    return nz_i, nz_f, codes_nf[nz_i, nz_f]


def _topk_nonzero(vals_nk: torch.Tensor, idx_nk: torch.Tensor, f0: int, f1: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A TopK encoder's (values, indices) as the non-zero codes of features f0..f1: (item, feature - f0, value)."""
    keep = (vals_nk > 0) & (idx_nk >= f0) & (idx_nk < f1)
    nz_i, j = keep.nonzero(as_tuple=True)
    return nz_i, idx_nk[nz_i, j] - f0, vals_nk[nz_i, j]


def _chunk_codes(sae: SAE, store: Store, layer: int, f0: int, f1: int, per: int, device: str,
                 codes: Sequence[tuple[int, TopKCodes]] | None, precision: str = "float32"
                 ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per chunk of images: (first row, images, item, feature - f0, value) of the non-zero codes of features f0..f1.
    From `codes` when mining kept them in this process (the same encoder, chunk for chunk), else encoded here in
    `precision`."""
    if codes is not None:
        for row0, c in codes:
            yield row0, c.shape[0], *_topk_nonzero(c.vals_tk.to(device), c.idx_tk.to(device).long(), f0, f1)
        return
    from saevctl.mine.encode import make_encoder
    from saevctl.mine.pipeline import _chunks, _prefetched

    p, s = store.layout.n_patches, sae.cfg.n_latents
    encode = make_encoder(sae, sparse_topk=True, compute=precision)
    buf = torch.empty(per * p * s, device=device, dtype=sae.W_enc.dtype)
    for row0, rows in _prefetched(_chunks({"patches": store.layer(layer).kind("patches")}, per)):
        x_bpd = rows["patches"].to(device)
        b = x_bpd.shape[0]
        yield row0, b, *_block_codes(sae, encode, x_bpd.reshape(b * p, -1), f0, f1, buf)


def _one_pass(sae: SAE, store: Store, layer: int, labels: list[LevelLabels], max_s: np.ndarray, f0: int, f1: int,
              cfg: Config, device: str, progress: Progress | None,
              codes: Sequence[tuple[int, TopKCodes]] | None = None,
              precision: str = "float32") -> dict[str, ClassHistograms]:
    """Stream the store once, folding features f0..f1's codes into one ClassHistograms per level."""
    p, s, f = store.layout.n_patches, sae.cfg.n_latents, f1 - f0
    per = cfg.batch_size or max(1, min(1024, CHUNK_CODES // (s * p)))
    big = store.n_images * p >= 1 << 31
    max_f = torch.from_numpy(max_s[f0:f1]).to(device)
    hists = {lab.level: ClassHistograms(max_f, len(lab.classes), cfg.n_bins, big, lab.multi_label) for lab in labels}
    with torch.inference_mode():
        for row0, b, nz_i, nz_f, vals in _chunk_codes(sae, store, layer, f0, f1, per, device, codes, precision):
            for lab in labels:
                items, cls = (torch.from_numpy(a).to(device) for a in lab.pairs(row0, row0 + b))
                if lab.level == "patch":
                    hists["patch"].update_sparse(b * p, nz_i, nz_f, vals, items, cls)
                else:  # the image's score: max over its patches (codes are >= 0, so absent = 0)
                    img_bf = torch.zeros(b * f, device=device).scatter_reduce_(
                        0, (nz_i // p) * f + nz_f, vals.float(), "amax").view(b, f)
                    hists["image"].update(img_bf, items, cls)
            if progress:
                progress(b)
    return hists


def _edges(cfg: Config) -> list[int]:
    return sorted({min(cfg.n_bins - 1, round(t * cfg.n_bins)) for t in cfg.thresholds})


def compute(sae: SAE, store: Store, layer: int, labels: list[LevelLabels], max_s: np.ndarray, cfg: Config, device: str,
            progress: Progress | None = None, codes: Sequence[tuple[int, TopKCodes]] | None = None,
            precision: str = "float32") -> tuple[dict[str, dict[str, np.ndarray]], dict[str, _Best], dict[str, Any]]:
    """(feature_labels columns per level, best feature per class per level, counts per level + passes); `codes`:
    the store's TopK codes as mine kept them (saevctl/mine/codes.py), read instead of encoding the store, else
    encoded in `precision` (as mine encoded them)."""
    blocks = _feature_blocks(sae.cfg.n_latents, labels, cfg)
    feats: dict[str, list[dict[str, np.ndarray]]] = {lab.level: [] for lab in labels}
    best = {lab.level: _Best(len(lab.classes)) for lab in labels}
    counts: dict[str, Any] = {"n_passes": len(blocks)}
    edges = _edges(cfg)
    for f0, f1 in blocks:
        hists = _one_pass(sae, store, layer, labels, max_s, f0, f1, cfg, device, progress, codes, precision)
        for lab in labels:
            h = hists[lab.level]
            if lab.skip_class is not None:
                h.n_pos_c[lab.skip_class] = 0  # never a label; keeps it out of 'classes with positives'
            counts[lab.level] = (h.n_items, h.n_pos_c.cpu().numpy())
            fired_f = (h.all_counts().sum(1) > 0).cpu().numpy()
            for lo in range(0, f1 - f0, 256):  # float32 scratch of 256 x classes x bins at a time
                sc = scores(h, edges, lo, lo + 256)
                arrs = [t.cpu().numpy() for t in (sc.auroc_fc, sc.f1_fc, sc.threshold_fc, sc.error_fc)]
                if lab.skip_class is not None:
                    arrs[0][:, lab.skip_class] = np.nan
                feats[lab.level].append(_feature_rows(f0 + lo, lab, arrs[0], arrs[1], arrs[2], fired_f[lo : lo + 256]))
                best[lab.level].fold(f0 + lo, *arrs)
    merged = {lv: {k: np.concatenate([b[k] for b in bs]) for k in bs[0]} for lv, bs in feats.items()}
    return merged, best, counts


def _class_rows(lab: LevelLabels, best: _Best, n_pos_c: np.ndarray) -> dict[str, np.ndarray]:
    """class_features columns: every class but the ignored one, with its best feature (None without one)."""
    ids = np.array([c for c in range(len(lab.classes)) if c != lab.skip_class], dtype=np.int64)
    found = np.isfinite(best.auroc[ids])
    return {"class_id": ids.astype(np.int32), "class_name": np.array([lab.classes[c] for c in ids], dtype=object),
            "n_positive": n_pos_c[ids].astype(np.int64),
            "feature": np.where(found, best.feature[ids], -1).astype(np.int32),
            "auroc": np.where(found, best.auroc[ids], np.nan), "f1": np.where(found, best.f1[ids], np.nan),
            "threshold": np.where(found, best.threshold[ids], np.nan)}


def _insert(idx: Index, table: str, cols: dict[str, np.ndarray], prefix: dict[str, Any],
            null_if_neg: tuple[str, ...]) -> None:
    """Bulk insert numpy columns (NaN and -1 ids become NULL) with constant prefix columns; bound values only."""
    name = f"_new_{table}"
    idx.con.register(name, cols)
    try:
        targets = ", ".join(f'"{c}"' for c in [*prefix, *cols])
        exprs = []
        for c, a in cols.items():
            if c in null_if_neg:
                exprs.append(f'CASE WHEN "{c}" < 0 THEN NULL ELSE "{c}" END')
            elif a.dtype.kind == "f":
                exprs.append(f'CASE WHEN isnan("{c}") THEN NULL ELSE "{c}" END')
            else:
                exprs.append(f'"{c}"')
        sources = ", ".join(["?"] * len(prefix) + exprs)
        idx.con.execute(f"INSERT INTO {table} ({targets}) SELECT {sources} FROM {name}", list(prefix.values()))
    finally:
        idx.con.unregister(name)


def write(index_fpath: Path, sae_id: str,
          tables: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]) -> None:
    """Replace this SAE's rows of the written levels in one transaction (other levels and SAEs stay)."""
    with Index.open(index_fpath, read_only=False) as idx:  # migrates an index mined before labels existed
        idx.con.execute("BEGIN TRANSACTION")
        try:
            for level, (feat_cols, class_cols) in tables.items():
                for table in ("feature_labels", "class_features"):  # constants, never user text
                    idx.con.execute(f"DELETE FROM {table} WHERE sae_id = ? AND level = ?", [sae_id, level])
                prefix = {"sae_id": sae_id, "token": "patches", "level": level}
                _insert(idx, "feature_labels", feat_cols, prefix, ("class_id",))
                _insert(idx, "class_features", class_cols, prefix, ("feature",))
            idx.con.execute("COMMIT")
        except BaseException:
            idx.con.execute("ROLLBACK")
            raise


def _level_result(level: str, n_items: int, class_cols: dict[str, np.ndarray]) -> LevelResult:
    keep = (class_cols["n_positive"] > 0) & (class_cols["feature"] >= 0)
    auroc = class_cols["auroc"][keep]
    coverage = {t: float((auroc >= t).mean()) if len(auroc) else 0.0 for t in COVERAGE_AT}
    rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in class_cols.items()}
            for i in np.flatnonzero(keep)]
    rows.sort(key=lambda r: (-r["auroc"], r["class_id"]))
    return LevelResult(level, n_items, int(keep.sum()), coverage, math.nan, rows)


def run(cfg: Config, progress: Progress | None = None, on_total: Callable[[int], None] | None = None) -> Result:
    """Label every feature of `cfg.sae` (already mined into `cfg.index`; both default as for every features
    command) from the store's labels; write the index.

    `on_total(n)` is told the number of images to stream (images x passes) before the first chunk. The index's
    write lock is held throughout: a mine of the same index meanwhile would rename its copy over these labels.
    A TopK SAE's codes are read from what mine kept beside the index (saevctl/mine/codes.py) when they match."""
    index_fpath = workspace.index_or_default(cfg.index)
    with lock.exclusive(index_fpath, "the index", "--index", make_parent=False):
        return _run(cfg, index_fpath, progress, on_total)


def _run(cfg: Config, index_fpath: Path, progress: Progress | None, on_total: Callable[[int], None] | None) -> Result:
    t0 = time.perf_counter()
    inputs, kept = fresh.label_state(cfg, index_fpath)
    if kept is not None:
        return _from_record(index_fpath, kept["result"])
    device = resolve_device(cfg.device)
    sae_id, info, max_s = _resolve(cfg, index_fpath)
    sae, store, layer = _load(cfg, info, device)
    codes = None
    if sae.cfg.activation == "topk":  # what mine kept of this SAE over this store, if anything
        from saevctl.mine import codes as codecache
        from saevctl.mine.pipeline import codes_key

        codes = codecache.load_codes(index_fpath, sae_id, codes_key(sae, store, layer))
    labels = level_labels(store, cfg.level, cfg.masks, cfg.negatives)
    blocks = _feature_blocks(sae.cfg.n_latents, labels, cfg)
    if on_total:
        on_total(store.n_images * len(blocks))
    from saevctl.mine.pipeline import recorded_compute

    precision = recorded_compute(info)["compute"]  # the codes mine scanned (so the index's maxima bound them)
    feats, best, counts = compute(sae, store, layer, labels, max_s, cfg, device, progress, codes, precision)
    tables, results = {}, {}
    for lab in labels:
        n_items, n_pos_c = counts[lab.level]
        class_cols = _class_rows(lab, best[lab.level], n_pos_c)
        tables[lab.written] = (feats[lab.level], class_cols)
        res = _level_result(lab.written, n_items, class_cols)
        err = best[lab.level].error[class_cols["class_id"].astype(np.int64)]
        max_error = float(np.nanmax(err)) if np.isfinite(err).any() else 0.0
        results[lab.written] = LevelResult(**{**res.__dict__, "max_error": max_error,
                                              "negatives": NEGATIVES[lab.negatives]})
    write(index_fpath, sae_id, tables)
    secs = time.perf_counter() - t0
    log.info("labelled %s at %s level(s) in %.1f s (%d pass(es))", sae_id, ", ".join(results), secs, counts["n_passes"])
    result = Result(index_fpath, sae_id, results, int(counts["n_passes"]), secs)
    if inputs is not None:
        fresh.record_labels(index_fpath, sae_id, inputs, _to_record(result))
    return result


def _to_record(res: Result) -> dict[str, Any]:
    levels = {k: {**dataclasses.asdict(v), "coverage": list(v.coverage.items())} for k, v in res.levels.items()}
    return {"sae_id": res.sae_id, "n_passes": res.n_passes, "seconds": res.seconds, "levels": levels}


def _from_record(index_fpath: Path, rec: dict[str, Any]) -> Result:
    levels = {k: LevelResult(**{**v, "coverage": {float(t): float(c) for t, c in v["coverage"]}})
              for k, v in rec["levels"].items()}
    return Result(index_fpath, rec["sae_id"], levels, int(rec["n_passes"]), float(rec["seconds"]), unchanged=True)

