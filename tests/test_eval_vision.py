"""The vision metrics against hand-built cases whose answer is known: Moran's I of smooth, scattered and checkerboard
maps; a k=1 sparse probe on a planted feature (about 1) and on a random label (chance); a class split between two
features with close decoders (the absorbed share); through real stores, real SAE checkpoints and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saevctl import atomic, layout
from saevctl.cli import app
from saevctl.errors import InputError, StoreError
from saevctl.eval.absorption import absorption_from_codes
from saevctl.eval.imagecodes import ImageCodes, LabelSet, encode_store, label_set
from saevctl.eval.moran import morans_i, null_expectation
from saevctl.eval.sparse_probe import probe_from_codes
from saevctl.eval.vision import score_vision
from saevctl.sae import SAE, SAEConfig
from saevctl.store import StoreWriter, open_store

LAYER = 3


def write_store(dpath: Path, acts_npd: np.ndarray, grid: tuple[int, int], labels: list[str | None] | None = None,
                per_shard: int = 7) -> Path:
    """A complete float32 store of the given patch activations (no model run), with ImageFolder-style labels."""
    n, p, d = acts_npd.shape
    assert p == grid[0] * grid[1]
    model = {"spec": "synthetic", "arch": "none", "weights_sha256": "0" * 64, "n_blocks": 4, "d_model": d,
             "patch_size": 8, "layout": {"n_cls": 1, "n_reg": 0, "grid_h": grid[0], "grid_w": grid[1]},
             "preprocess": {"size": 8 * grid[0], "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "squash"}}
    config = {"model": model, "images": {"spec": "x", "kind": "folder", "n": n, "fingerprint": "x"},
              "layers": [LAYER], "tokens": ["patches"], "dtype": "float32", "images_per_shard": per_shard}
    w = StoreWriter(dpath, config, n)
    for s, (lo, hi) in enumerate(w.shard_ranges):
        rows = [{"id": i, "path": f"/img/{i}.png", "label": labels[i] if labels else None, "width": 8, "height": 8,
                 "status": "ok"} for i in range(lo, hi)]
        w.write_shard(s, {(LAYER, "patches"): acts_npd[lo:hi].astype(np.float32)}, rows)
    w.finalize()
    return dpath


def relu_sae(store_dpath: Path, dec_sd: np.ndarray | None = None, tokens: tuple[str, ...] = ("patches",)) -> SAE:
    """codes = relu(x): an identity encoder, no normalisation; decoder rows `dec_sd` (unit-normed; default I)."""
    store = open_store(store_dpath)
    d = store.d
    sae = SAE(SAEConfig(d, d, model=store.model, layer=LAYER, tokens=tokens))
    dec = torch.eye(d) if dec_sd is None else torch.as_tensor(dec_sd, dtype=torch.float32)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(dec / dec.norm(dim=1, keepdim=True))
    return sae


# --- Moran's I -------------------------------------------------------------------------------------------------


def _reference_moran(m: np.ndarray) -> float:
    """Moran's I from its textbook formula with an explicit rook weight matrix."""
    h, w = m.shape
    x = m.ravel().astype(np.float64)
    wm = np.zeros((h * w, h * w))
    for i in range(h):
        for j in range(w):
            for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                if 0 <= i + di < h and 0 <= j + dj < w:
                    wm[i * w + j, (i + di) * w + j + dj] = 1
    z = x - x.mean()
    return float(len(x) / wm.sum() * (z @ wm @ z) / (z @ z))


def _blob(h: int, w: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def test_morans_i_matches_the_formula_and_known_maps() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((5, 3, 5)) * (rng.random((5, 3, 5)) > 0.5)
    got, ok = morans_i(torch.from_numpy(maps))
    assert ok.all()
    np.testing.assert_allclose(got.numpy(), [_reference_moran(m) for m in maps], rtol=1e-10)
    smooth = np.stack([_blob(16, 16, rng.uniform(4, 12), rng.uniform(4, 12), 3.0) for _ in range(20)])
    salt = rng.random((200, 16, 16)) * (rng.random((200, 16, 16)) > 0.7)
    checker = np.indices((16, 16)).sum(0) % 2 * 1.0
    flat = np.full((16, 16), 2.0)
    i_smooth, _ = morans_i(torch.from_numpy(smooth))
    i_salt, _ = morans_i(torch.from_numpy(salt))
    i_other, ok = morans_i(torch.from_numpy(np.stack([checker, flat])))
    assert float(i_smooth.min()) > 0.85  # a smooth region: close to 1
    assert abs(float(i_salt.mean()) - null_expectation(256)) < 0.01 and float(i_salt.abs().max()) < 0.25
    assert float(i_other[0]) == pytest.approx(-1.0) and ok.tolist() == [True, False]  # checkerboard; flat: undefined


def _spatial_store(dpath: Path, n: int = 12) -> Path:
    """d=3 on an 8x8 grid: channel 0 a smooth blob, channel 1 salt and pepper, channel 2 never positive."""
    rng = np.random.default_rng(1)
    acts = np.zeros((n, 64, 3), np.float32)
    for i in range(n):
        acts[i, :, 0] = (_blob(8, 8, rng.uniform(2, 6), rng.uniform(2, 6), 1.8) - 0.2).ravel()
        acts[i, :, 1] = np.where(rng.random(64) > 0.7, rng.random(64), -1.0)
    acts[:, :, 2] = -1.0
    return write_store(dpath, acts, (8, 8))


def test_spatial_cli_on_a_store(tmp_path: Path) -> None:
    store = _spatial_store(tmp_path / "store")
    ckpt = relu_sae(store).save(tmp_path / "sae")
    out = tmp_path / "spatial.json"
    r = CliRunner().invoke(app, ["eval", "spatial", "--sae", str(ckpt), "--store", str(store), "--out", str(out),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "summary:" in r.output and "plot:" in r.output
    s = json.loads(out.read_text())
    assert s["format"] == "saevctl-eval-spatial" and s["adjacency"] == "rook" and s["grid"] == [8, 8]
    moran, n_img = s["per_feature"]["moran"], s["per_feature"]["n_images"]
    assert moran[0] > 0.7 and abs(moran[1]) < 0.1 and moran[2] is None  # smooth, scattered, never fires
    assert n_img == [12, 12, 0] and s["n_scored"] == 2
    assert (tmp_path / "spatial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_streamed_codes_equal_the_whole_store_at_once(tmp_path: Path) -> None:
    store = _spatial_store(tmp_path / "store", n=13)
    sae = relu_sae(store)
    codes = encode_store(sae, open_store(store), batch_tokens=64 * 3)  # 3 images a chunk, 13 images
    x = torch.from_numpy(open_store(store).layer(LAYER).patches[:])
    np.testing.assert_allclose(codes.codes_ns, torch.relu(x).amax(1).numpy())
    np.testing.assert_allclose(codes.raw_nd, x.amax(1).numpy())
    i, ok = morans_i(torch.relu(x[..., 0]).reshape(13, 8, 8))
    assert codes.moran_n_s[0] == int(ok.sum()) and codes.moran_sum_s[0] == pytest.approx(float(i[ok].sum()))
    assert encode_store(sae, open_store(store), max_images=5).n_images == 5


# --- sparse probing -------------------------------------------------------------------------------------------


def _codes(codes_ns: np.ndarray, raw_nd: np.ndarray) -> ImageCodes:
    s = codes_ns.shape[1]
    return ImageCodes(codes_ns.astype(np.float32), raw_nd.astype(np.float32), np.zeros(s), np.zeros(s, np.int64),
                      (4, 4), LAYER)


def _labels(y: np.ndarray, source: str = "mask") -> LabelSet:
    return LabelSet(source, [f"c{i}" for i in range(y.shape[1])], y.astype(bool), np.ones(len(y), bool), 0)


def test_planted_feature_probes_to_one_and_a_random_label_to_chance() -> None:
    rng = np.random.default_rng(0)
    n, s = 400, 64
    planted = rng.random(n) < 0.4
    random_label = rng.random(n) < 0.5
    codes = rng.exponential(1.0, (n, s)) * (rng.random((n, s)) < 0.2)
    codes[:, 7] = np.where(planted, 2.0 + rng.random(n), 0.0)
    raw = rng.normal(size=(n, 16))  # carries nothing about either label
    res = probe_from_codes(_codes(codes, raw), _labels(np.stack([planted, random_label], 1)), (1, 2, 5), 200, 0)
    by_k = {r["k"]: r for r in res.rows}
    assert res.top_feature[0] == 7
    assert res.per_class["sae"]["1"][0] == 1.0  # the planted class, k=1
    assert abs(res.per_class["sae"]["1"][1] - 0.5) < 0.15  # the random label, k=1
    assert abs(res.per_class["raw"]["1"][0] - 0.5) < 0.15
    assert by_k[1]["diff"]["lo"] > 0.05 and by_k[1]["sae"]["lo"] <= by_k[1]["sae"]["mean"] <= by_k[1]["sae"]["hi"]
    assert res.n_train + res.n_test == n and res.n_test == 100


def test_sparse_probe_cli_with_image_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 90
    names = ["bird", "cat", "dog"]
    labels = [names[i % 3] for i in range(n)]
    acts = rng.normal(size=(n, 16, 6)).astype(np.float32) - 2.0  # mostly silent
    for i in range(n):
        acts[i, rng.integers(16), i % 3] = 3.0  # one patch shows the class
    store = write_store(tmp_path / "store", acts, (4, 4), labels)
    ckpt = relu_sae(store).save(tmp_path / "sae")
    out = tmp_path / "probe.json"
    r = CliRunner().invoke(app, ["eval", "sparse-probe", "--sae", str(ckpt), "--store", str(store), "--out", str(out),
                                 "--probe-k", "1,2", "--n-boot", "100", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())
    assert s["format"] == "saevctl-eval-sparse-probe" and s["labels"] == "image" and s["classes"] == names
    assert s["rows"][0]["k"] == 1 and s["rows"][0]["sae"]["mean"] == 1.0 and s["top_feature"] == [0, 1, 2]
    bad = CliRunner().invoke(app, ["eval", "sparse-probe", "--sae", str(ckpt), "--store", str(store), "--labels",
                                   "mask", "--out", str(out)])
    assert bad.exit_code == 2 and bad.output.startswith("error: the store") and "no mask classes" in bad.output


# --- absorption -----------------------------------------------------------------------------------------------


def _absorption_store(dpath: Path) -> Path:
    """Class a (50 images): 35 fire feature 0, 10 only feature 1 (decoder close to 0's), 5 only feature 2 (far);
    class b (50 images): feature 3 on every image. d = 8, 2x2 grid, one patch per image carries the feature."""
    acts = np.full((100, 4, 8), -1.0, np.float32)
    feats = [0] * 35 + [1] * 10 + [2] * 5 + [3] * 50
    for i, f in enumerate(feats):
        acts[i, i % 4, f] = 2.0
    return write_store(dpath, acts, (2, 2), ["a"] * 50 + ["b"] * 50, per_shard=32)


def _close_decoder() -> np.ndarray:
    dec = np.eye(8)
    dec[1] = 0.8 * dec[0] + 0.6 * dec[4]  # cosine 0.8 with feature 0's
    return dec


def test_absorption_of_a_class_split_between_close_features(tmp_path: Path) -> None:
    store = _absorption_store(tmp_path / "store")
    sae = relu_sae(store, _close_decoder())
    st = open_store(store)
    codes = encode_store(sae, st)
    labels = label_set(st, "auto", codes.n_images, 10)
    res = absorption_from_codes(sae, codes, labels, cos=0.3, n_boot=200, seed=0)
    a, b = res.classes
    assert a["feature"] == 0 and a["auroc"] == pytest.approx(0.85) and a["n_close"] == 1
    assert a["silent"] == pytest.approx(0.3) and a["absorbed"] == pytest.approx(0.2)
    assert a["absorbers"] == [{"feature": 1, "images": 10}]
    assert b["feature"] == 3 and b["silent"] == 0 and b["absorbed"] == 0
    assert res.n_tested == 2 and res.absorbed["mean"] == pytest.approx(0.1)
    assert res.absorbed["lo"] <= 0.1 <= res.absorbed["hi"]
    strict = absorption_from_codes(sae, codes, labels, cos=0.9, n_boot=50, seed=0)
    assert strict.classes[0]["absorbed"] == 0 and strict.classes[0]["silent"] == pytest.approx(0.3)


def test_absorption_cli_and_mask_labels(tmp_path: Path) -> None:
    store = _absorption_store(tmp_path / "store")
    # mask classes instead: "dot" where a patch carries feature 0 or 1; class 0 ignored; the last 10 rows unmasked
    acts = open_store(store).layer(LAYER).patches[:]
    patch = np.where(acts[..., [0, 1]].max(-1) > 0, 1, 2).astype(np.int16)
    patch[90:] = -1
    layout.store_labels_dpath(store).mkdir()
    np.save(layout.store_patch_labels_fpath(store), patch)
    atomic.write_json(layout.store_classes_fpath(store), {"schema": layout.LABELS_SCHEMA,
                                                          "classes": ["ignored", "dot", "ground"], "source": "m"})
    lab = label_set(open_store(store), "mask", 100, 10)
    assert lab.source == "mask" and lab.classes == ["dot"] and lab.n_dropped == 1  # every masked image has ground
    assert lab.known_n.sum() == 90 and lab.y_nc[:, 0].sum() == 45
    named = label_set(open_store(store), "mask:m", 100, 10)  # the set by name (named after its mask folder)
    assert named.source == "mask:m" and named.classes == ["dot"]
    with pytest.raises(StoreError, match="no mask set 'nope'"):
        label_set(open_store(store), "mask:nope", 100, 10)
    ckpt = relu_sae(store, _close_decoder()).save(tmp_path / "sae")
    out = tmp_path / "absorption.json"
    r = CliRunner().invoke(app, ["eval", "absorption", "--sae", str(ckpt), "--store", str(store), "--out", str(out),
                                 "--labels", "mask", "--n-boot", "50", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())
    (dot,) = s["classes"]
    assert s["labels"] == "mask" and dot["feature"] == 0 and dot["absorbed"] == pytest.approx(10 / 45)


def test_score_vision_refuses_an_sae_without_patch_tokens(tmp_path: Path) -> None:
    store = _spatial_store(tmp_path / "store")
    sae = relu_sae(store, tokens=("cls",))
    with pytest.raises(InputError, match="patch grid"):
        score_vision(sae, open_store(store))


def test_eval_all_puts_the_vision_metrics_on_the_card(tmp_path: Path) -> None:
    labelled = _absorption_store(tmp_path / "labelled")
    ckpt = relu_sae(labelled, _close_decoder()).save(tmp_path / "sae")
    out = tmp_path / "card"
    r = CliRunner().invoke(app, ["eval", "all", "--sae", str(ckpt), "--store", str(labelled), "--out", str(out),
                                 "--n-boot", "50", "--probe-k", "1", "--vision", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "spatial" in r.output and "sparse probe" in r.output and "absorption" in r.output
    card = json.loads(layout.eval_card_json_fpath(out).read_text())
    sec = card["sections"]
    assert sec["absorption"]["absorbed"]["mean"] == pytest.approx(0.1) and sec["sparse_probe"]["rows"][0]["k"] == 1
    assert sec["spatial"]["n_images"] == 100
    for name in ("spatial.json", "spatial.png", "sparse-probe.json", "absorption.json"):
        assert (out / name).is_file(), name
    html = layout.eval_card_fpath(out).read_text()
    assert "Spatial coherence" in html and "Sparse probing" in html and "Feature absorption" in html
    # without labels the label-based parts say why; without --vision the card has none of the three
    unlabelled = _spatial_store(tmp_path / "unlabelled")
    ckpt2 = relu_sae(unlabelled).save(tmp_path / "sae2")
    r = CliRunner().invoke(app, ["eval", "all", "--sae", str(ckpt2), "--store", str(unlabelled), "--out",
                                 str(tmp_path / "card2"), "--n-boot", "50", "--vision", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    card = json.loads(layout.eval_card_json_fpath(tmp_path / "card2").read_text())
    assert card["sections"]["spatial"]["n_scored"] == 2 and card["sections"]["sparse_probe"] is None
    assert "neither ImageFolder labels" in card["skipped"]["sparse_probe"]
    r = CliRunner().invoke(app, ["eval", "all", "--sae", str(ckpt2), "--store", str(unlabelled), "--out",
                                 str(tmp_path / "card3"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    card = json.loads(layout.eval_card_json_fpath(tmp_path / "card3").read_text())
    assert card["sections"]["spatial"] is None and "spatial" not in card["skipped"]
    assert "Spatial coherence" not in layout.eval_card_fpath(tmp_path / "card3").read_text()


def test_labels_of_too_few_images_give_a_note_in_the_suite_and_an_error_alone(tmp_path: Path) -> None:
    store = open_store(_absorption_store(tmp_path / "store"))
    sae = relu_sae(store.dpath, _close_decoder())
    sc = score_vision(sae, store, min_positives=60, n_boot=20, skip_unlabelled=True)
    assert sc.sparse_probe is not None and sc.sparse_probe.rows == [] and sc.absorption is not None
    assert "has 60 images with it and 60 without it" in sc.sparse_probe.notes[0] and sc.absorption.n_tested == 0
    assert sc.spatial is not None and not sc.skipped
    with pytest.raises(InputError, match="has 60 images with it"):
        score_vision(sae, store, min_positives=60, n_boot=20, parts=("absorption",))
