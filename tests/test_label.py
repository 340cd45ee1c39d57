"""`features label`: streaming AUROC/F1 against the exact rank-based reference, the index tables against a
brute-force encode of the whole store, multi-pass = one pass, re-runs replace rows, and the CLI with its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.mine import Config, Index, run
from saevctl.mine.label import Config as LabelConfig
from saevctl.mine.label import run as label
from saevctl.mine.labelstats import ClassHistograms, auroc_reference, f1_reference, scores
from saevctl.store import open_store

from test_masks import write_masks
from test_mine import make_sae

runner = CliRunner()
CLASSES = ("other", "sky", "grass", "tree")


@pytest.fixture(autouse=True)
def wide_console() -> None:
    from saevctl.console import console

    console.width = 250


# --- the streaming statistics ------------------------------------------------------------------------------


def _fold(acts_nf: np.ndarray, pairs: list[tuple[int, int]], n_classes: int, n_bins: int, chunk: int,
          multi: bool = False) -> ClassHistograms:
    h = ClassHistograms(torch.from_numpy(acts_nf.max(0)), n_classes, n_bins, multi_label=multi)
    for lo in range(0, len(acts_nf), chunk):
        sel = [(i - lo, c) for i, c in pairs if lo <= i < lo + chunk]
        items = torch.tensor([i for i, _ in sel], dtype=torch.int64)
        cls = torch.tensor([c for _, c in sel], dtype=torch.int64)
        h.update(torch.from_numpy(acts_nf[lo : lo + chunk]), items, cls)
    return h


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 300), f=st.integers(1, 6), c=st.integers(2, 5), n_bins=st.sampled_from([4, 16, 256]),
       multi=st.booleans(), chunk=st.integers(1, 97), seed=st.integers(0, 2**16))
def test_streaming_auroc_and_f1_equal_the_rank_reference(n: int, f: int, c: int, n_bins: int, multi: bool,
                                                         chunk: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    acts = np.where(rng.random((n, f)) < 0.4, rng.gamma(2.0, 1.0, (n, f)), 0.0)
    if multi:  # image-level presence labels: any number of classes per item, some items unlabelled
        pairs = [(i, k) for i in range(n) for k in range(c) if rng.random() < 0.3]
    else:  # patch labels: one class or none
        lab = rng.integers(-1, c, n)
        pairs = [(i, int(k)) for i, k in enumerate(lab) if k >= 0]
    h = _fold(acts, pairs, c, n_bins, chunk, multi)
    edges = [0, n_bins // 4, n_bins // 2]
    sc = scores(h, edges)
    labelled = sorted({i for i, _ in pairs})
    for k in range(c):
        positive = np.isin(labelled, [i for i, kk in pairs if kk == k])
        for j in range(f):
            want = auroc_reference(acts[labelled, j], positive)
            got, bound = float(sc.auroc_fc[j, k]), float(sc.error_fc[j, k])
            if np.isnan(want):
                assert np.isnan(got)
                continue
            assert abs(got - want) <= bound + 1e-6, (got, want, bound)  # + float32 sums (docs/eval.md)
            mx = acts[:, j].max()
            thresholds = [e / n_bins * mx for e in edges] if mx > 0 else [0.0]
            f1, _ = f1_reference(acts[labelled, j], positive, thresholds)
            assert float(sc.f1_fc[j, k]) == pytest.approx(f1, abs=1e-12)


def test_values_in_distinct_bins_give_the_exact_auroc() -> None:
    rng = np.random.default_rng(0)
    n_bins = 64
    acts = (rng.permutation(n_bins)[:50] + 0.5)[:, None] / n_bins * 3.0  # one value per bin, max below 3
    acts[::7] = 0.0  # plus exact zeros, which are exact ties
    lab = rng.integers(0, 2, 50)
    h = _fold(acts, [(i, int(k)) for i, k in enumerate(lab)], 2, n_bins, 13)
    sc = scores(h, [0])
    assert float(sc.error_fc[0, 1]) == 0.0
    assert float(sc.auroc_fc[0, 1]) == pytest.approx(auroc_reference(acts[:, 0], lab == 1), abs=1e-12)


# --- a labelled store, an SAE mined into an index ------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tiny_vit: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from saevctl.extract import Config as ExtractConfig
    from saevctl.extract import run as extract

    root = tmp_path_factory.mktemp("label")
    masks = write_masks(image_dir, root / "masks", classes=CLASSES)
    store = root / "store"
    extract(ExtractConfig(model=tiny_vit, images=str(image_dir), layers=(1,), out=store, masks=masks,
                          dtype="float32", batch_size=4, images_per_shard=4, device="cpu"))
    sae = make_sae(store, root / "sae", layer=1, n_latents=48)
    sae.save(root / "sae")
    index = root / "index.duckdb"
    mined = run(Config(sae=root / "sae", store=store, index=index, device="cpu", set_defaults=False))
    # A TopK SAE too: labelling reads its codes straight from the top-k (no dense scan).
    topk = make_sae(store, root / "topk", layer=1, n_latents=48, seed=1, activation="topk", k=6)
    topk.save(root / "topk")
    mined_topk = run(Config(sae=root / "topk", store=store, index=index, device="cpu", set_defaults=False))
    shutil.copyfile(index, root / "unlabelled.duckdb")  # each test labels its own copy
    return {
        "unlabelled": root / "unlabelled.duckdb",
        "root": root,
        "store": store,
        "sae": sae,
        "sae_dpath": root / "sae",
        "index": index,
        "sae_id": mined.sae_id,
        "topk": (topk, root / "topk", mined_topk.sae_id),
    }


def _tie_bound(v_n: np.ndarray, positive_n: np.ndarray, mx: float, n_bins: int) -> float:
    """The documented error bound: half the share of (positive, negative) pairs whose non-zero values share a bin."""
    bins = np.where(v_n > 0, np.clip(np.ceil(v_n / max(mx, 1e-30) * n_bins) - 1, 0, n_bins - 1), -1)
    pos = np.bincount(bins[positive_n & (bins >= 0)].astype(int), minlength=n_bins)
    neg = np.bincount(bins[~positive_n & (bins >= 0)].astype(int), minlength=n_bins)
    return 0.5 * float((pos * neg).sum()) / max(int(positive_n.sum()) * int((~positive_n).sum()), 1)


def _copy_index(env: dict, tmp_path: Path) -> Path:
    """A private copy of the unlabelled index with its faiss folder (features show lists neighbours)."""
    from saevctl import layout

    index = tmp_path / "ix.duckdb"
    shutil.copyfile(env["unlabelled"], index)
    shutil.copytree(layout.faiss_dpath(env["index"]), layout.faiss_dpath(index))
    return index


def _reference(env: dict, sae: object) -> dict[str, np.ndarray]:
    """Per level: exact AUROC (features, classes) and its binning bound (features, classes), from one encode."""
    store = open_store(env["store"])
    x = store.layer(1).patches.torch().float()
    n, p, d = x.shape
    with torch.no_grad():
        codes_nps = sae.encode(x.reshape(-1, d)).reshape(n, p, -1).numpy()
    out = {}
    lab = np.asarray(store.patch_labels).reshape(-1)
    keep = lab >= 0
    flat, mx = codes_nps.reshape(n * p, -1)[keep], codes_nps.max((0, 1))
    img, img_lab = codes_nps.max(1), store.image_labels
    for level, v_nf, lab_n, n_cls in (("patch", flat, lab[keep], len(CLASSES)), ("image", img, img_lab, 2)):
        out[level] = np.array([[auroc_reference(v_nf[:, f], lab_n == k) for k in range(n_cls)] for f in range(48)])
        out[level + "_bound"] = np.array([[_tie_bound(v_nf[:, f], lab_n == k, mx[f], 256) for k in range(n_cls)]
                                          for f in range(48)])
    return out


@pytest.mark.parametrize("which", ["relu", "topk"])
def test_index_tables_equal_a_brute_force_encode(env: dict, which: str) -> None:
    sae, sae_dpath, sae_id = (env["sae"], env["sae_dpath"], env["sae_id"]) if which == "relu" else env["topk"]
    res = label(LabelConfig(sae=sae_dpath, index=env["index"], device="cpu"))
    assert set(res.levels) == {"patch", "image"} and res.n_passes == 1 and res.sae_id == sae_id
    ref = _reference(env, sae)
    eps = 1e-6  # float rounding of the fused encoder (mining's) against sae.encode
    with Index.open(env["index"]) as idx:
        for level, n_classes in (("patch", 3), ("image", 2)):
            ref_fc = np.where(np.isnan(ref[level]), -np.inf, ref[level])
            tol_fc = np.nan_to_num(ref[level + "_bound"]) + eps
            rows = idx.feature_labels(sae_id, level)
            assert [r["feature"] for r in rows] == list(range(48))
            for r in rows:
                f = r["feature"]
                assert abs(r["auroc"] - ref_fc[f].max()) <= tol_fc[f].max(), r
                if r["class_id"] is not None:
                    assert abs(ref_fc[f, r["class_id"]] - ref_fc[f].max()) <= 2 * tol_fc[f].max()
                    assert r["class_name"] == (CLASSES if level == "patch" else ("cats", "dogs"))[r["class_id"]]
            cls_rows = idx.class_features(sae_id, level)
            assert len(cls_rows) == n_classes
            for r in cls_rows:
                c = r["class_id"]
                assert abs(r["auroc"] - ref_fc[:, c].max()) <= tol_fc[:, c].max()
                assert abs(ref_fc[r["feature"], c] - r["auroc"]) <= tol_fc[r["feature"], c]
            cov = idx.label_coverage(sae_id, level, 0.7)
            assert cov == pytest.approx(np.mean([r["auroc"] >= 0.7 for r in cls_rows]))
            assert res.levels[level].coverage[0.7] == pytest.approx(cov)
        n_pos = {r["class_name"]: r["n_positive"] for r in idx.class_features(sae_id, "patch")}
        lab = np.asarray(open_store(env["store"]).patch_labels)
        assert n_pos == {name: int((lab == k).sum()) for k, name in enumerate(CLASSES) if k}


def test_several_passes_equal_one_and_reruns_replace_rows(env: dict, tmp_path: Path) -> None:
    index = _copy_index(env, tmp_path)
    one = label(LabelConfig(sae=env["sae_dpath"], index=index, level="patch", device="cpu"))
    with Index.open(index) as idx:
        rows_one = idx.feature_labels(env["sae_id"], "patch")
    many = label(LabelConfig(sae=env["sae_dpath"], index=index, level="patch", device="cpu", max_memory_mb=0.02,
                             batch_size=3))
    assert one.n_passes == 1 and many.n_passes > 3
    with Index.open(index) as idx:
        assert idx.feature_labels(env["sae_id"], "patch") == rows_one  # replaced, not appended
        assert idx.label_levels(env["sae_id"]) == ["patch"]
    label(LabelConfig(sae=env["sae_id"], index=index, level="image", device="cpu"))  # by id; adds a level
    with Index.open(index) as idx:
        assert idx.label_levels(env["sae_id"]) == ["patch", "image"]
        assert len(idx.feature_labels(env["sae_id"])) == 96


def test_image_level_from_masks_is_class_presence(env: dict, tmp_path: Path) -> None:
    """A store with masks but asked for image level without ImageFolder labels: 'image contains class c'."""
    from saevctl.mine.label import _presence_pairs

    lab = np.array([[1, 1, -1, 3], [-1, -1, -1, -1], [2, 2, 2, 2]], dtype=np.int16)
    items, cls = _presence_pairs(lab, 4)(0, 3)
    assert list(zip(items.tolist(), cls.tolist(), strict=True)) == [(0, 1), (0, 3), (2, 2)]


# --- CLI ----------------------------------------------------------------------------------------------------


def _ok(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


def _fails(args: list[str], text: str) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    return r.stderr


def test_cli_label_list_show(env: dict, tmp_path: Path) -> None:
    index = _copy_index(env, tmp_path)
    ix = ["--index", str(index), "--sae", env["sae_id"]]
    plain = _ok(["features", "list", *ix, "--limit", "3"])
    assert "auroc" not in plain  # no labels yet: no label columns
    _fails(["features", "list", *ix, "--label", "sky"], "has no labels to filter by")
    out = _ok(["features", "label", "--sae", str(env["sae_dpath"]), "--index", str(index), "--device", "cpu",
               "--thresholds", "0,0.25"])
    assert "patch level: best feature per class" in out and "image level" in out and "AUROC >= 0.9" in out
    assert "sky" in out and "cats" in out
    out = _ok(["features", "list", *ix, "--label", "SKY", "--limit", "100", "--sort", "auroc"])
    with Index.open(index) as idx:
        want = [r["feature"] for r in idx.feature_labels(env["sae_id"], "patch") if r["class_name"] == "sky"]
    body = out.split("┡", 1)[1].splitlines()[1:-1]
    assert sorted(int(line.split("│")[1]) for line in body) == sorted(want) and all("sky" in line for line in body)
    aurocs = [float(line.split("│")[9]) for line in body]
    assert aurocs == sorted(aurocs, reverse=True)
    f = want[0]
    show = _ok(["features", "show", "--id", str(f), *ix])
    assert "label (patch)" in show and "sky  AUROC" in show and "label (image)" in show
    plain = _ok(["features", "list", *ix, "--label", "no-such-class", "--plain"])
    assert plain.strip() == ""


def test_cli_errors_are_one_line(env: dict, tiny_store: Path, tmp_path: Path) -> None:
    index = _copy_index(env, tmp_path)
    ix = ["--index", str(index)]
    _fails(["features", "label", *ix, "--level", "bogus"], "unknown --level 'bogus'")
    # an SAE that was never mined into this index
    other = make_sae(env["store"], tmp_path / "other", layer=1, n_latents=16, seed=3)
    other.save(tmp_path / "other")
    _fails(["features", "label", "--sae", str(tmp_path / "other"), *ix], "has not been mined into")
    # a store without the labels asked for
    _fails(["features", "label", *ix, "--store", str(_unlabelled_copy(env, tmp_path)), "--level", "patch"],
           "holds no per-patch labels")
    _fails(["features", "label", "--index", str(tmp_path / "none.duckdb")], "no index at")


def _unlabelled_copy(env: dict, tmp_path: Path) -> Path:
    """The same store without its labels folder (same model and layer, so only the labels are missing)."""
    dst = tmp_path / "unlabelled"
    shutil.copytree(env["store"], dst, ignore=shutil.ignore_patterns("labels"))
    return dst


def test_an_index_mined_before_labels_is_upgraded(env: dict, tmp_path: Path) -> None:
    """An index of schema 1 (no label tables): read-only readers ask for an upgrade, features label does it."""
    import duckdb

    index = _copy_index(env, tmp_path)
    con = duckdb.connect(str(index))
    con.execute("DROP TABLE feature_labels")
    con.execute("DROP TABLE class_features")
    con.execute("DELETE FROM schema_migrations WHERE version = 2")
    con.close()
    _fails(["features", "list", "--index", str(index)], "has the older schema 1")
    _ok(["features", "label", "--index", str(index), "--sae", env["sae_id"], "--level", "patch", "--device", "cpu"])
    out = _ok(["features", "list", "--index", str(index), "--sae", env["sae_id"], "--limit", "2"])
    assert "auroc" in out


def test_image_level_from_masks_on_a_store_without_image_labels(env: dict, tmp_path: Path) -> None:
    """No ImageFolder labels: --level image counts an image as positive for each class any of its patches has."""
    import json

    from saevctl import layout

    store = tmp_path / "store"
    shutil.copytree(env["store"], store)
    fpath = layout.store_images_fpath(store)
    rows = [json.loads(line) for line in fpath.read_text().splitlines()]
    fpath.write_text("".join(json.dumps({**r, "label": None}) + "\n" for r in rows))
    assert open_store(store).image_labels is None
    index = _copy_index(env, tmp_path)
    res = label(LabelConfig(sae=env["sae_dpath"], store=store, index=index, level="image", device="cpu"))
    lab = np.asarray(open_store(store).patch_labels)
    with Index.open(index) as idx:
        n_pos = {r["class_id"]: r["n_positive"] for r in idx.class_features(res.sae_id, "image")}
    assert n_pos == {k: int((lab == k).any(1).sum()) for k in range(1, len(CLASSES))}
    assert res.levels["image"].n_items == int((lab >= 0).any(1).sum())


def test_negatives_all_ranks_each_class_against_every_patch(env: dict, tmp_path: Path) -> None:
    """--negatives all: a class's negatives are every other patch of the images with a mask, the unlabelled ('other')
    ones included, as AUROC is usually reported; the default ranks against the other labelled patches only."""
    index = _copy_index(env, tmp_path)
    res = label(LabelConfig(sae=env["sae_dpath"], index=index, level="patch", negatives="all", device="cpu"))
    store = open_store(env["store"])
    x = store.layer(1).patches.torch().float()
    n, p, d = x.shape
    with torch.no_grad():
        codes = env["sae"].encode(x.reshape(-1, d)).reshape(n, p, -1).numpy()
    lab = np.asarray(store.patch_labels)
    rows = (lab >= 0).any(1)  # images with a labelled patch (the others have no usable mask)
    flat, lab_n, mx = codes[rows].reshape(-1, codes.shape[-1]), lab[rows].reshape(-1), codes.max((0, 1))
    assert (lab_n < 0).sum() > 0 and res.levels["patch"].n_items == len(lab_n)
    assert "every other patch" in res.levels["patch"].negatives
    with Index.open(index) as idx:
        rows_all = {r["class_id"]: r for r in idx.class_features(env["sae_id"], "patch")}
    fg = label(LabelConfig(sae=env["sae_dpath"], index=index, level="patch", device="cpu"))
    with Index.open(index) as idx:
        rows_fg = {r["class_id"]: r for r in idx.class_features(env["sae_id"], "patch")}
    for c, r in rows_all.items():
        ref = np.array([auroc_reference(flat[:, f], lab_n == c) for f in range(48)])
        bound = np.array([_tie_bound(flat[:, f], lab_n == c, mx[f], 256) for f in range(48)])
        assert abs(r["auroc"] - ref.max()) <= bound.max() + 1e-6
        assert r["n_positive"] == rows_fg[c]["n_positive"] == int((lab == c).sum())
    assert any(abs(rows_all[c]["auroc"] - rows_fg[c]["auroc"]) > 1e-3 for c in rows_all)
    assert fg.levels["patch"].n_items == int((lab >= 0).sum()) < res.levels["patch"].n_items
    out = _ok(["features", "label", "--sae", str(env["sae_dpath"]), "--index", str(index), "--device", "cpu",
               "--level", "patch"])
    assert "ranked against the other labelled (foreground) patches; --negatives all" in " ".join(out.split())


def test_codes_kept_by_mining_label_like_a_fresh_encode(env: dict, tmp_path: Path) -> None:
    """The codes mine keeps beside the index give the same label tables as labelling that encodes the store
    itself, in one pass or several."""
    from saevctl.mine import codes as codecache
    from saevctl.mine.pipeline import codes_key
    from saevctl.sae import SAE

    _, topk_dpath, sae_id = env["topk"]
    index = tmp_path / "kept.duckdb"
    run(Config(sae=topk_dpath, store=env["store"], index=index, device="cpu", set_defaults=False))
    store = open_store(env["store"])
    kept = codecache.load_codes(index, sae_id, codes_key(SAE.load(topk_dpath), store, 1))
    n_images = store.n_images
    assert kept and sum(c.shape[0] for _, c in kept) == n_images  # every image once, chunk by chunk
    fresh_index = _copy_index(env, tmp_path)
    for kw in ({}, {"max_memory_mb": 0.02, "batch_size": 3}):
        a = label(LabelConfig(sae=topk_dpath, index=index, device="cpu", **kw))
        b = label(LabelConfig(sae=topk_dpath, index=fresh_index, device="cpu", **kw))
        assert a.n_passes == b.n_passes
        with Index.open(index) as ia, Index.open(fresh_index) as ib:
            for level in ("patch", "image"):
                assert ia.feature_labels(sae_id, level) == ib.feature_labels(sae_id, level)
                assert ia.class_features(sae_id, level) == ib.class_features(sae_id, level)


def test_label_reads_the_codes_mine_kept_and_ignores_stale_ones(env: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """mine keeps a TopK SAE's codes beside the index; features label then encodes nothing, with the same tables as
    an encode; a file made from other weights is ignored (encoded again); a ReLU SAE keeps none."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from saevctl.mine import codes as codecache
    from saevctl.mine import label as label_mod

    _, topk_dpath, sae_id = env["topk"]
    index = tmp_path / "mined.duckdb"
    run(Config(sae=topk_dpath, store=env["store"], index=index, device="cpu", set_defaults=False))
    run(Config(sae=env["sae_dpath"], store=env["store"], index=index, device="cpu", set_defaults=False))
    f = codecache.fpath(index, sae_id)
    assert f.is_file() and not codecache.fpath(index, env["sae_id"]).exists()
    encodes = []
    real = label_mod._block_codes
    monkeypatch.setattr(label_mod, "_block_codes", lambda *a: encodes.append(1) or real(*a))
    label(LabelConfig(sae=topk_dpath, index=index, device="cpu", level="patch"))
    assert not encodes  # read from the file
    fresh_index = _copy_index(env, tmp_path)  # no codes file: encodes
    label(LabelConfig(sae=topk_dpath, index=fresh_index, device="cpu", level="patch"))
    assert encodes
    with Index.open(index) as ia, Index.open(fresh_index) as ib:
        assert ia.feature_labels(sae_id, "patch") == ib.feature_labels(sae_id, "patch")
    # the same file claiming other weights: ignored, encoded again
    with safe_open(str(f), framework="pt") as st_:
        meta = st_.metadata()
    meta["key"] = meta["key"].replace('"weights_sha256": "', '"weights_sha256": "0')
    save_file(load_file(str(f)), str(f), metadata=meta)
    encodes.clear()
    label(LabelConfig(sae=topk_dpath, index=index, device="cpu", level="patch", force=True))
    assert encodes


def test_mine_goes_on_when_the_codes_cannot_be_kept(env: dict, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The kept codes are a cache: when they cannot be written (here a file where their folder goes), mine still
    writes its index, says why in a warning, and label encodes instead."""
    from saevctl.mine import codes as codecache

    _, topk_dpath, sae_id = env["topk"]
    index = tmp_path / "mined.duckdb"
    blocker = codecache.fpath(index, sae_id).parent
    blocker.write_text("not a folder")
    with caplog.at_level("WARNING", logger="saevctl.mine.codes"):
        res = run(Config(sae=topk_dpath, store=env["store"], index=index, device="cpu", set_defaults=False))
    assert res.sae_id == sae_id and "not keeping the codes" in caplog.text
    assert label(LabelConfig(sae=topk_dpath, index=index, device="cpu", level="patch")).levels["patch"].n_items > 0
