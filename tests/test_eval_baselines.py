"""Null baselines (`eval baselines`, `eval all --baselines`): a planted SAE beats its untrained baseline on every
metric of the card: reconstruction, splice recovery and edit specificity in a tiny segmentation world (whose easy
classes random features detect as well: the label metrics tie there), and label coverage, best AUROC and
reconstruction on a planted sparse dictionary, where the untrained baseline sits near chance. Baselines are real
checkpoints of the SAE's width at k = its mean L0, cached beside it, reused, and rebuilt when their inputs change;
the random-decoder baseline keeps its initial decoder; margins have known answers; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saevctl import layout
from saevctl.edit.heads import describe_model
from saevctl.eval.baselines import run_baselines
from saevctl.eval.config import BaselinesConfig
from saevctl.eval.margins import METRICS, Units, compare, specificity
from saevctl.eval.metrics import mean_score
from saevctl.sae import SAE, SAEConfig
from saevctl.store import open_store
from saevctl.vit import load_backbone

from test_eval_card import _ok, invoke
from test_eval_edits import LAYER, seg, seg_head  # noqa: F401  (shared fixtures)


def plus_minus_sae(cfg: SAEConfig, acts_nd: torch.Tensor, q_d: torch.Tensor, t: float) -> SAE:
    """A relu SAE over an orthonormal basis Q (first column q) in both signs: decode(encode(x)) = x exactly, and
    feature 0 is relu(q . x_norm - t) (feature d its mirror), with b_dec = t q so the basis reads x_norm - t q."""
    d = cfg.d
    sae = SAE(cfg)
    sae.set_normalization(acts_nd)
    basis, _ = torch.linalg.qr(torch.cat([q_d[:, None], torch.randn(d, d - 1, generator=torch.Generator()
                                                                       .manual_seed(0))], 1))
    basis[:, 0] = q_d  # qr may flip its sign
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([basis, -basis], 1))
        sae.W_dec.copy_(torch.cat([basis.t(), -basis.t()], 0))
        sae.b_enc.zero_()
        sae.b_dec.copy_(t * q_d)
    return sae.eval()


@pytest.fixture(scope="module")
def seg_world(seg, seg_head, tiny_vit, tmp_path_factory):
    """extract --masks, a planted SAE whose feature 0 is the segment head's square-vs-background direction, mined and
    labelled; then eval all --baselines against an untrained baseline."""
    from safetensors.torch import load_file

    images, masks = seg
    root = tmp_path_factory.mktemp("bl-seg")
    store = root / "store"
    _ok("extract", "--model", tiny_vit, "--images", images, "--masks", masks, "--layers", LAYER, "--out", store,
        "--device", "cpu", "--dtype", "float32")
    bb = load_backbone(tiny_vit)
    acts = torch.from_numpy(open_store(store).layer(LAYER).patches[:]).reshape(-1, bb.d_model).float()
    w = load_file(str(seg_head / "head.safetensors"))
    u, c = w["weight"][2] - w["weight"][1], float(w["bias"][2] - w["bias"][1])
    cfg = SAEConfig(bb.d_model, 2 * bb.d_model, model=describe_model(bb), layer=LAYER)
    probe = SAE(cfg)
    probe.set_normalization(acts)
    s, mu = float(probe.act_scale), probe.act_mean
    # u . x + c > 0  <=>  q . x_norm > -s (u . mu + c) / |u|, with q = u / |u|
    sae = plus_minus_sae(cfg, acts, u / u.norm(), -s * (float(u @ mu) + c) / float(u.norm()))
    ckpt = sae.save(root / "planted")
    index = root / "index.duckdb"
    _ok("mine", "--sae", ckpt, "--store", store, "--index", index)
    _ok("features", "label", "--index", index, "--sae", ckpt)
    out = root / "eval"
    text = _ok("eval", "all", "--sae", ckpt, "--store", store, "--head", seg_head, "--images", images, "--masks",
               masks, "--index", index, "--n-boot", "200", "--baselines", "--baseline-kinds", "untrained",
               "--no-vision", "--out", out)
    card = json.loads(layout.eval_card_json_fpath(out).read_text())
    return {"ckpt": ckpt, "store": store, "index": index, "out": out, "text": text, "card": card,
            "images": images, "masks": masks}


def test_planted_sae_beats_its_untrained_baseline_on_every_metric(seg_world):
    card = seg_world["card"]
    assert all(card["sections"][k] is not None for k in ("recon", "splice", "coverage", "edits")), card["skipped"]
    section = card["sections"]["baselines"]
    assert section["k"] == 32 and section["sae_l0"] == pytest.approx(32, abs=0.5)  # one of each +/- pair fires
    rows = {m["metric"]: m for m in section["metrics"]}
    vision = {"spatial", "probe_k1", "absorbed"}  # scored with --vision, which this run leaves off
    assert set(rows) == {m.name for m in METRICS} - vision, rows.keys()  # every other metric of the card
    for name, m in rows.items():
        assert m["best"] == "untrained" and m["missing"] == [], (name, m)
    # Reconstruction, splice and edits: the planted SAE wins (a positive margin: it does better).
    assert rows["fvu"]["sae"]["mean"] < 1e-6 and rows["fvu"]["margin"]["lo"] > 0.5
    assert rows["recovery"]["sae"]["mean"] == pytest.approx(1.0) and rows["recovery"]["margin"]["mean"] > 0.01
    assert rows["specificity"]["margin"]["lo"] > 0.05
    # A yellow square on grey is so easy that random features detect both classes perfectly too: the label metrics
    # tie here (the dictionary world below is where they separate), which is what the baselines are for.
    for name in ("coverage", "best_auroc"):
        assert rows[name]["sae"]["mean"] == 1.0 and rows[name]["margin"]["mean"] >= 0
    html = layout.eval_card_fpath(seg_world["out"]).read_text()
    assert 'id="baselines"' in html and "margin over the best baseline" in html
    assert "vs baselines" in seg_world["text"]
    summary = json.loads(layout.eval_baselines_fpath(seg_world["out"]).read_text())
    assert summary["format"] == "saevctl-eval-baselines" and summary["metrics"][0]["metric"] == "fvu"
    bl_out = layout.eval_baseline_dpath(seg_world["out"], "untrained")
    assert {p.name for p in bl_out.glob("*.json")} == {"recon.json", "splice.json", "edits.json"}


# --- a planted sparse dictionary --------------------------------------------------------------------------------

D, N_ATOMS, ACTIVE, N_LABELLED = 64, 128, 4, 8


def write_labels(store: Path, labels_np: np.ndarray, classes: list[str]) -> None:
    """Per-patch class labels in the store's format (what extract --masks writes)."""
    dpath = layout.store_labels_dpath(store)
    dpath.mkdir(parents=True, exist_ok=True)
    np.save(layout.store_patch_labels_fpath(store), labels_np.astype(np.int16))
    layout.store_classes_fpath(store).write_text(json.dumps(
        {"schema": layout.LABELS_SCHEMA, "name": "atoms", "classes": classes, "source": "synthetic"}))


@pytest.fixture(scope="module")
def dict_world(tmp_path_factory):
    """Tokens that are sparse sums of known atoms; each token labelled with its strongest atom when that is one of
    the most frequent N_LABELLED; the planted SAE is the dictionary itself (tied, TopK at the mean number active)."""
    from saevctl.train import synthetic as syn

    root = tmp_path_factory.mktemp("bl-dict")
    dic = syn.make_dictionary(D, N_ATOMS, mean_active=ACTIVE, alpha=0.5, seed=0)
    rng = np.random.default_rng(1)
    n, p = 512, 16
    active = rng.random((n * p, N_ATOMS)) < dic.freq_a
    mags = rng.uniform(0.5, 1.5, active.shape) * active
    x = (mags @ dic.atoms_ad + rng.standard_normal((n * p, D)) * 0.02).astype(np.float32)
    store = syn.write_store(root / "store", x, n_patches=p)
    strongest = mags.argmax(1)
    labels = np.where(mags.max(1) > 0, np.where(strongest < N_LABELLED, strongest + 1, -1), -1)
    write_labels(store, labels.reshape(n, p), ["none", *(f"atom{j}" for j in range(N_LABELLED))])
    st = open_store(store)
    cfg = SAEConfig(D, N_ATOMS, activation="topk", k=ACTIVE, model=dict(st.model), layer=0)
    sae = SAE(cfg)
    sae.set_normalization(torch.from_numpy(x))
    with torch.no_grad():
        atoms = torch.from_numpy(dic.atoms_ad)
        sae.W_dec.copy_(atoms)
        sae.W_enc.copy_(atoms.t())
        sae.b_dec.copy_(-sae.act_mean * sae.act_scale)  # the encoder reads x itself (scaled), not x - mean
    ckpt = sae.save(root / "planted")
    index = root / "index.duckdb"
    _ok("mine", "--sae", ckpt, "--store", store, "--index", index)
    _ok("features", "label", "--index", index, "--sae", ckpt)
    return {"root": root, "store": store, "ckpt": ckpt, "index": index}


def test_untrained_baseline_on_a_planted_dictionary_is_near_chance(dict_world, tmp_path):
    res = run_baselines(BaselinesConfig(sae=dict_world["ckpt"], store=dict_world["store"], index=dict_world["index"],
                                        baseline_kinds=("untrained",), n_boot=200, vision=False, out=tmp_path / "e",
                                        device="cpu"))
    rows = {m["metric"]: m for m in res.section["metrics"]}
    assert res.section["k"] == ACTIVE
    assert set(rows) == {"fvu", "coverage", "best_auroc"}  # no images: no splice, no edits
    assert res.skipped["splice"] == "no --images" and res.skipped["edits"] == "no --images"
    for m in rows.values():
        assert m["margin"]["lo"] > 0, m  # the planted SAE beats it, CI and all
    # Near chance: no class detected at AUROC 0.8, its best feature per class near 0.5 (the best of 128 random
    # features, hence above it), and k random directions explain little of the variance; the planted dictionary most
    # of it (tied codes over-count overlapping atoms, and a token may hold more than k of them).
    untrained = {k: m["baselines"]["untrained"]["value"]["mean"] for k, m in rows.items()}
    assert untrained["coverage"] == 0.0 and untrained["best_auroc"] < 0.7 and untrained["fvu"] > 0.7
    assert rows["coverage"]["sae"]["mean"] == 1.0 and rows["best_auroc"]["sae"]["mean"] > 0.95
    assert rows["fvu"]["sae"]["mean"] < 0.3


def _copy_sae(ckpt: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(ckpt, dst, ignore=shutil.ignore_patterns("baselines", "baselines.lock"))
    return dst


def test_baselines_are_real_checkpoints_cached_beside_the_sae_and_rebuilt(dict_world, tmp_path):
    from saevctl.eval.config import BASELINE_KINDS
    from saevctl.train.config import Config as TrainConfig
    from saevctl.train.config import expand
    from saevctl.train.group import SAEGroup

    ckpt = _copy_sae(dict_world["ckpt"], tmp_path / "sae")
    base = {"sae": ckpt, "store": dict_world["store"], "n_boot": 50, "vision": False, "device": "cpu"}
    first = run_baselines(BaselinesConfig(**base, out=tmp_path / "a"))
    assert list(first.section["baselines"]) == list(BASELINE_KINDS)
    weights = {}
    for kind in BASELINE_KINDS:
        dpath = layout.sae_baseline_dpath(ckpt, kind)
        assert not first.section["baselines"][kind]["reused"] and dpath.parent == ckpt / "baselines"
        bl = SAE.load(dpath)  # a real checkpoint: same width, layer and model, TopK at the SAE's mean L0
        assert (bl.cfg.activation, bl.cfg.k, bl.cfg.n_latents, bl.cfg.d, bl.cfg.layer) == ("topk", ACTIVE, N_ATOMS,
                                                                                            D, 0)
        assert bl.header["baseline"]["kind"] == kind and bl.cfg.model == SAE.load(ckpt).cfg.model
        weights[kind] = layout.sae_weights_fpath(dpath).stat().st_mtime_ns
    # random-decoder: the decoder is exactly training's initialisation; only the encoder and biases moved
    rd = SAE.load(layout.sae_baseline_dpath(ckpt, "random-decoder"))
    spec = expand(TrainConfig(activation=("topk",), width=(str(N_ATOMS),), k=(ACTIVE,)), D)[0]
    init = SAEGroup([spec], D, 0, 1 / 32, "cpu").params["W_dec"][0]
    assert torch.equal(rd.W_dec, init) and rd.cfg.train["freeze_decoder"] is True
    assert float((rd.W_enc.detach() - init.t()).abs().max()) > 1e-4  # two steps at the default lr, but it moved
    pca = SAE.load(layout.sae_baseline_dpath(ckpt, "pca"))
    gram = pca.W_dec[:D] @ pca.W_dec[:D].t()
    assert torch.allclose(gram, torch.eye(D), atol=1e-4) and torch.equal(pca.W_dec[D:2 * D], -pca.W_dec[:D])
    km = SAE.load(layout.sae_baseline_dpath(ckpt, "kmeans"))
    assert torch.allclose(km.W_dec.norm(dim=1), torch.ones(N_ATOMS), atol=1e-5)
    # the same inputs: every baseline reused, untouched, and the same figures
    again = run_baselines(BaselinesConfig(**base, out=tmp_path / "b"))
    assert all(b["reused"] for b in again.section["baselines"].values())
    assert {k: layout.sae_weights_fpath(layout.sae_baseline_dpath(ckpt, k)).stat().st_mtime_ns
            for k in BASELINE_KINDS} == weights
    assert again.section["metrics"] == first.section["metrics"]
    # another sample: k and the dictionaries depend on it, so those asked for are rebuilt; the others stay
    other = run_baselines(BaselinesConfig(**base, baseline_kinds=("untrained", "pca"), baseline_sample=4096,
                                          out=tmp_path / "c"))
    assert not any(b["reused"] for b in other.section["baselines"].values())
    assert layout.sae_weights_fpath(layout.sae_baseline_dpath(ckpt, "kmeans")).stat().st_mtime_ns == weights["kmeans"]
    forced = run_baselines(BaselinesConfig(**base, baseline_kinds=("kmeans",), rebuild_baselines=True,
                                           out=tmp_path / "d"))
    assert not forced.section["baselines"]["kmeans"]["reused"]
    assert not list((ckpt / "baselines").glob(".*"))  # no staging or training leftovers


def test_margins_have_known_answers():
    ids = np.arange(4)
    sae = Units(ids, np.array([[1.0, 1], [1, 1], [0, 1], [1, 1]]), mean_score)  # 3 of 4
    worse = Units(ids, np.array([[0.0, 1], [1, 1], [0, 1], [0, 1]]), mean_score)  # 1 of 4
    same = Units(ids, sae.stats.copy(), mean_score)
    metric = next(m for m in METRICS if m.name == "coverage")
    row = compare(metric, sae, {"worse": worse, "same": same}, n_boot=200, seed=0)
    assert row["best"] == "same" and row["margin"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert row["baselines"]["worse"]["margin"]["mean"] == pytest.approx(0.5)
    assert 0 <= row["baselines"]["worse"]["margin"]["lo"] <= 0.5 <= row["baselines"]["worse"]["margin"]["hi"]
    # lower is better (FVU-like): a smaller SAE value is a positive margin; a unit one side lacks counts as zero
    fvu = next(m for m in METRICS if m.name == "fvu")
    low = Units(np.array([0, 1]), np.array([[1.0, 1], [1, 1]]), mean_score)
    high = Units(np.array([1, 2]), np.array([[3.0, 1], [3, 1]]), mean_score)
    assert compare(fvu, low, {"b": high}, 50, 0)["margin"]["mean"] == pytest.approx(2.0)
    counts = np.array([[3.0, 4, 1, 10], [1, 4, 0, 10]])
    assert specificity(counts.sum(0, keepdims=True))[0] == pytest.approx(4 / 8 - 1 / 20)


def test_bad_input_is_one_line(dict_world, tmp_path):
    ckpt = _copy_sae(dict_world["ckpt"], tmp_path / "sae")
    cases = [
        (["--sae", ckpt], "error: eval baselines needs the SAE's store: no --store given. Pass --store DIR."),
        (["--sae", ckpt, "--store", dict_world["store"], "--baseline-kinds", "nope"],
         "error: unknown --baseline-kinds 'nope'. Use untrained, random-decoder, pca, kmeans."),
        (["--sae", ckpt, "--store", dict_world["store"], "--baseline-sample", "0"],
         "error: --baseline-sample 0 is out of range: it must be positive. Pass --baseline-sample 1 or more."),
        (["--sae", ckpt, "--store", dict_world["store"], "--baseline-kinds", "kmeans", "--baseline-sample", "100"],
         f"error: the baseline sample holds 100 tokens, fewer than the SAE's {N_ATOMS} latents, so k-means cannot "
         "place a centroid on each. Pass a larger --baseline-sample, or leave kmeans out of --baseline-kinds."),
    ]
    for args, line in cases:
        r = invoke("eval", "baselines", *args, "--no-vision", "--out", tmp_path / "e")
        assert r.exit_code == 2 and r.output.strip().splitlines() == [line], r.output
    assert not (ckpt / "baselines" / "kmeans").exists()


def test_vision_metrics_have_margins_over_baselines() -> None:
    """The vision metrics enter the baselines table like the others: a known gap gives that margin, with a CI on
    the right side of zero, and a metric a baseline lacks leaves that baseline out of its row."""

    from saevctl.eval import margins
    from saevctl.eval.absorption import AbsorptionResult
    from saevctl.eval.sparse_probe import SparseProbeResult
    from saevctl.eval.spatial import SpatialResult

    rng = np.random.default_rng(0)

    def results(moran: float, acc: float, absorbed: float | None) -> dict[str, object]:
        m = moran + 0.05 * rng.standard_normal(200)
        m[::7] = np.nan  # features never scored
        out: dict[str, object] = {
            "spatial": SpatialResult(m, np.ones(200, np.int64), (16, 16), 50),
            "sparse_probe": SparseProbeResult("mask", ["a", "b", "c", "d"], [1, 5], [],
                                              {"sae": {"1": [acc, acc, acc - 0.02, acc + 0.02], "5": [1.0] * 4}},
                                              [0, 1, 2, 3], 40, 10, 0)}
        if absorbed is not None:
            shifts = (0.0, 0.02, -0.02, 0.01)
            rows = [{"class": n, "absorbed": absorbed + d} for n, d in zip("abcd", shifts, strict=True)]
            out["absorption"] = AbsorptionResult("mask", 0.3, 0.8, rows, {}, {}, 4, 4)
        return out

    table = {r["metric"]: r for r in margins.table(results(0.5, 0.9, 0.1), {"untrained": results(0.1, 0.6, None)},
                                                   n_boot=200, seed=0)}
    assert table["spatial"]["margin"]["mean"] == pytest.approx(0.4, abs=0.03)
    assert table["spatial"]["margin"]["lo"] > 0.3
    assert table["probe_k1"]["margin"]["mean"] == pytest.approx(0.3, abs=0.01) and table["probe_k1"]["margin"]["lo"] > 0
    assert "absorbed" not in table  # the baseline has no absorption result: no row to compare
    both = {r["metric"]: r for r in margins.table(results(0.5, 0.9, 0.1), {"pca": results(0.5, 0.9, 0.3)},
                                                  n_boot=200, seed=0)}
    assert both["absorbed"]["margin"]["mean"] == pytest.approx(0.2, abs=1e-9)  # lower is better: SAE absorbs less
    assert both["absorbed"]["margin"]["lo"] > 0 and both["absorbed"]["best"] == "pca"
