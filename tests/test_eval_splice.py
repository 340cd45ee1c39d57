"""`saevctl eval splice`: an SAE that reconstructs exactly recovers 1.0, one whose reconstruction is the
ablation mean recovers 0; the recovery formula on known numbers; metrics per head kind; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.edit.heads import describe_model
from saevctl.eval import metrics
from saevctl.eval.splice import SpliceConfig, image_means, run_splice, store_means
from saevctl.sae import SAE, SAEConfig
from saevctl.vit import load_backbone

from conftest import make_tiny_vit

LAYER = 1


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_bb(tiny_vit):
    return load_backbone(tiny_vit)


def identity_sae(bb, layer: int = LAYER, tokens: tuple[str, ...] = ("patches",)) -> SAE:
    """relu SAE with W_enc = [I, -I], W_dec = [I; -I]: decode(encode(x)) = relu(x) - relu(-x) = x exactly."""
    d = bb.d_model
    sae = SAE(SAEConfig(d, 2 * d, model=describe_model(bb), layer=layer, tokens=tokens))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.eval()


def mean_sae(bb, mean_d: torch.Tensor, layer: int = LAYER) -> SAE:
    """An SAE whose decoder is zero: every reconstruction is its act_mean, here the ablation mean."""
    sae = identity_sae(bb, layer)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.act_mean.copy_(mean_d)
    return sae


@pytest.fixture(scope="module")
def identity_ckpt(tiny_bb, tmp_path_factory) -> Path:
    return identity_sae(tiny_bb).save(tmp_path_factory.mktemp("sae") / "identity")


def test_recovery_formula_on_known_numbers():
    assert metrics.recovery(0.9, 0.8, 0.5) == pytest.approx(0.75)
    assert metrics.recovery(0.9, 0.9, 0.5) == 1.0
    assert metrics.recovery(0.9, 0.5, 0.5) == 0.0
    assert metrics.recovery(0.9, 0.3, 0.5) == pytest.approx(-0.5)  # worse than ablating
    assert np.isnan(metrics.recovery(0.7, 0.6, 0.7))  # ablation does not hurt: undefined, not a division by 0
    rows = metrics.recovery_rows(np.array([1.0, 0.5]), np.array([0.75, 0.4]), np.array([0.5, 0.5]))
    assert rows[0] == pytest.approx(0.5) and np.isnan(rows[1])


def test_miou_and_cc_on_known_values():
    pred = np.array([[0, 0, 1, 1]])
    truth = np.array([[0, 1, 1, -1]])
    stats = metrics.segment_stats(pred, truth, 2)
    # class 0: inter 1, union 2; class 1: inter 1, union 2 (the unlabelled patch is ignored)
    assert metrics.miou_score(stats)[0] == pytest.approx(0.5)
    a = torch.rand(2, 1, 4, 4)
    cc = metrics.saliency_cc(torch.stack([a[0], 2 * a[0] + 1]), torch.stack([a[0], a[0]]))
    np.testing.assert_allclose(cc, [1.0, 1.0], atol=1e-9)
    assert metrics.saliency_cc(-a[:1], a[:1])[0] == pytest.approx(-1.0)


def test_perfect_sae_recovers_one(identity_ckpt, image_dir, tmp_path):
    res = run_splice(SpliceConfig(images=str(image_dir), sae=identity_ckpt, head="timm", out=tmp_path / "s.json",
                                  device="cpu", n_boot=200))
    assert res.task == "classify" and res.n_images == 12 and res.n_failed == 1
    agree = next(r for r in res.rows if r["metric"] == "agreement")  # the timm head knows no cats/dogs labels
    assert res.rows[0] is agree
    assert agree["spliced"]["mean"] == 1.0 and agree["original"]["mean"] == 1.0
    assert agree["ablated"]["mean"] < 1.0  # mean-ablating the layer changes some predictions
    assert agree["recovery"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["format"] == "saevctl-eval-splice" and summary["schema_version"] == 1
    assert summary["kinds"] == ["patches"] and summary["n_images"] == 12


def test_saes_at_both_ends_on_a_trained_head(tiny_bb, tiny_vit, image_dir, identity_ckpt, tmp_path):
    """A classify head trained on the cats/dogs folder scores accuracy; exact SAE -> 1, mean SAE -> 0."""
    from saevctl.probe.train_head import HeadTrainConfig, train_head

    head = train_head(HeadTrainConfig(task="classify", images=str(image_dir), model=tiny_vit, out=tmp_path / "head",
                                      pool="mean", epochs=50, device="cpu"), backbone=tiny_bb).out
    from saevctl.data import resolve_images
    from saevctl.edit.session import Prober

    prober = Prober.load(identity_ckpt, str(head), None, "cpu")
    records = list(resolve_images(str(image_dir)).records)
    cfg = SpliceConfig(images=str(image_dir), device="cpu", n_boot=100)
    mean_d = image_means(prober, records, [slice(1, 17)], cfg, None)[0]
    # The mean SAE's reconstruction of every patch is the ablation mean: spliced == ablated exactly.
    mean_ckpt = mean_sae(tiny_bb, mean_d).save(tmp_path / "mean")
    for ckpt, want in ((identity_ckpt, 1.0), (mean_ckpt, 0.0)):
        res = run_splice(SpliceConfig(images=str(image_dir), sae=ckpt, head=str(head), out=tmp_path / "x.json",
                                      device="cpu", n_boot=100))
        names = [r["metric"] for r in res.rows]
        assert names == ["accuracy", "agreement"]
        for row in res.rows:
            assert row["original"]["mean"] - row["ablated"]["mean"] > 0.3  # ablation hurts on this data
            assert row["recovery"]["mean"] == pytest.approx(want, abs=1e-6), (ckpt, row)
        assert res.rows[0]["original"]["mean"] > 0.8  # the head learned the labels


def test_store_mean_equals_image_mean(tiny_store, image_dir, identity_ckpt):
    from saevctl.data import resolve_images
    from saevctl.edit.session import Prober

    prober = Prober.load(identity_ckpt, "timm", None, "cpu")
    records = list(resolve_images(str(image_dir)).records)
    from_images = image_means(prober, records, [slice(1, 17)], SpliceConfig(images=str(image_dir)), None)[0]
    from_store = store_means(tiny_store, prober.sae, LAYER, ("patches",))[0]
    torch.testing.assert_close(from_store, from_images, atol=1e-5, rtol=1e-5)


def test_cli_prints_table_and_recovery(identity_ckpt, image_dir, tiny_store, tmp_path):
    r = invoke("eval", "splice", "--sae", identity_ckpt, "--head", "timm", "--images", image_dir,
               "--store", tiny_store, "--n-boot", "50", "--out", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert "recovered" in r.output and "spliced" in r.output and "ablated" in r.output
    assert (tmp_path / "s.json").is_file()


def test_head_of_another_model_is_one_line(identity_ckpt, image_dir, tmp_path):
    from saevctl.probe.train_head import HeadTrainConfig, train_head

    other = "local-dir:" + str(make_tiny_vit(tmp_path / "other", seed=7))
    head = train_head(HeadTrainConfig(task="classify", images=str(image_dir), model=other, out=tmp_path / "h",
                                      epochs=5, device="cpu")).out
    r = invoke("eval", "splice", "--sae", identity_ckpt, "--head", head, "--images", image_dir)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: head ") and "was made for" in lines[0]


def test_store_of_another_model_is_one_line(identity_ckpt, image_dir, tmp_path, tiny_bb):
    from saevctl.extract import Config, run

    other = "local-dir:" + str(make_tiny_vit(tmp_path / "other", seed=3))
    store = tmp_path / "store"
    run(Config(model=other, images=str(image_dir), layers=(LAYER,), out=store, dtype="float32", device="cpu",
               max_images=4))
    r = invoke("eval", "splice", "--sae", identity_ckpt, "--head", "timm", "--images", image_dir, "--store", store)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "but the SAE reads" in lines[0]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_miou_from_per_image_sums_equals_heads_train_miou(n_images, n_classes, seed):
    """Summing per-image counts (what the bootstrap resamples) gives heads train's mIoU on the concatenation."""
    from saevctl.probe.train_head import mean_iou

    rng = np.random.default_rng(seed)
    pred = rng.integers(0, n_classes, (n_images, 16))
    truth = rng.integers(-1, n_classes, (n_images, 16))
    got = metrics.miou_score(metrics.segment_stats(pred, truth, n_classes).sum(0, keepdims=True))[0]
    want = mean_iou(pred.ravel(), truth.ravel(), n_classes)
    assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want)


def test_bootstrap_is_paired_and_brackets_the_point():
    rng = np.random.default_rng(0)
    o = rng.random(40)
    stats = {"original": metrics.mean_stats(o), "spliced": metrics.mean_stats(o * 0.5 + 0.125),
             "ablated": metrics.mean_stats(np.full(40, 0.25))}
    out = metrics.summarize(metrics.Scored("m", "m", stats, metrics.mean_score), n_boot=300, seed=1)
    # spliced - ablated = (original - ablated) / 2 on every image, so on the means of every paired resample too:
    for key in ("mean", "lo", "hi"):
        assert out["recovery"][key] == pytest.approx(0.5)
    assert out["original"]["lo"] < out["original"]["mean"] < out["original"]["hi"]


def test_sae_of_other_weights_is_one_line(tiny_bb, image_dir, tmp_path):
    sae = identity_sae(tiny_bb)
    model = {**sae.cfg.model, "weights_sha256": "0" * 64}  # as if the model's weights changed since training
    import dataclasses

    sae.cfg = dataclasses.replace(sae.cfg, model=model)
    ckpt = sae.save(tmp_path / "stale")
    r = invoke("eval", "splice", "--sae", ckpt, "--head", "timm", "--images", image_dir)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "weights 000000000000" in lines[0] and "now loads weights" in lines[0]
