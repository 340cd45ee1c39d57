"""`saevctl eval edits`: on a segment head trained with `heads train` at the SAE's layer, suppressing a planted
feature that writes the head's "square" direction flips the patches predicted square and nothing else, more
than both controls do; bootstrap CIs; mask and class-file errors are one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.eval.edits import EditsConfig, change_counts, make_rows_plan, rates, run_edits
from saevctl.vit import load_backbone

from test_probe_edit import make_sae

LAYER = 1


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    img = np.full((32, 32, 3), 90, np.uint8) + rng.integers(0, 20, (32, 32, 3)).astype(np.uint8)
    mask = np.ones((32, 32), np.uint8)  # 1 = background
    r, c = (int(v) * 8 for v in rng.integers(0, 3, 2))
    img[r : r + 16, c : c + 16] = (230, 210, 30)
    mask[r : r + 16, c : c + 16] = 2  # 2 = square
    return img, mask


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> tuple[Path, Path]:
    """12 images with a yellow square on grey; masks: 0 other (unused), 1 background, 2 square; classes.txt."""
    root = tmp_path_factory.mktemp("segeval")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        img, mask = _draw(rng)
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
    (root / "masks" / "classes.txt").write_text("other\nbackground\nsquare\n")
    return root / "images", root / "masks"


@pytest.fixture(scope="module")
def seg_head(seg, tiny_vit, tmp_path_factory) -> Path:
    from saevctl.probe.train_head import HeadTrainConfig, train_head

    images, masks = seg
    out = tmp_path_factory.mktemp("head") / "seg"
    return train_head(
        HeadTrainConfig(
            task="segment",
            images=str(images),
            masks=masks,
            class_names=masks / "classes.txt",
            model=tiny_vit,
            layer=LAYER,
            out=out,
            epochs=100,
            device="cpu",
        )
    ).out


@pytest.fixture(scope="module")
def planted(seg_head, tiny_vit, tmp_path_factory) -> Path:
    """Feature 0 fires (code 1) on every patch and writes the head's square-minus-background direction."""
    from safetensors.torch import load_file

    bb = load_backbone(tiny_vit)
    w = load_file(str(seg_head / "head.safetensors"))["weight"]
    u = w[2] - w[1]
    sae = make_sae(bb, layer=LAYER)
    with torch.no_grad():
        sae.W_dec[0] = u / u.norm()
        sae.W_enc[:, 0] = 0
        sae.b_enc[0] = 1.0
        sae.b_enc[1:] = 2.0
    return sae.save(tmp_path_factory.mktemp("sae") / "planted")


def test_rates_and_plan_helpers():
    ref = torch.tensor([[1, 1, 2, 2]])
    pred = torch.tensor([[1, 2, 1, 2]])
    counts = change_counts(pred, ref, torch.tensor([2]))
    assert counts.tolist() == [[1, 2, 1, 2]]  # target (predicted 2): 1 of 2 changed; other: 1 of 2
    r = rates(np.array([[1, 2, 0, 5], [3, 4, 1, 5]]), n_boot=200, seed=0)
    assert r["target"]["mean"] == pytest.approx(4 / 6) and r["other"]["mean"] == pytest.approx(1 / 10)
    assert r["target"]["lo"] <= r["target"]["mean"] <= r["target"]["hi"]
    plan = make_rows_plan([5, 3, 5], [-1.0, -2.0, -3.0], torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool))
    assert plan.features == [3, 5]
    assert plan.values_nk.tolist() == [[0, -1.0], [-2.0, 0], [0, -3.0]]
    assert plan.mask_npk[:, :, 1].tolist() == [[True, False], [False, False], [True, True]]
    assert not plan.mask_npk[:, :, 0][[0, 2]].any()


def test_planted_feature_edit_is_specific(planted, seg_head, seg, tmp_path):
    images, masks = seg
    res = run_edits(
        EditsConfig(
            images=str(images),
            masks=masks,
            sae=planted,
            head=str(seg_head),
            features=("square=0",),
            value="-30x",
            out=tmp_path / "e.json",
            device="cpu",
            n_boot=300,
        )
    )
    assert res.n_images == 12 and res.n_unmasked == 0
    square, overall = res.rows[0], res.overall
    assert square["class"] == "square" and square["feature"] == 0 and square["value"] == pytest.approx(-30.0)
    assert square["n_target"] > 12  # the head predicts the squares
    feat = square["conditions"]["feature"]
    assert feat["target"]["mean"] > 0.9  # suppressing the square direction flips the squares
    assert feat["other"]["mean"] == 0.0  # and nothing else: no block mixes tokens before this head
    for control in ("random feature", "random direction"):
        c = square["conditions"][control]
        assert feat["target"]["lo"] > c["target"]["hi"], (control, c)
    assert overall["class"] == "all" and overall["n_images"] == 12
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["format"] == "saevctl-eval-edits" and summary["classes"][0]["control_feature"] not in (None, 0)


def test_cli_table(planted, seg_head, seg, tmp_path):
    images, masks = seg
    r = invoke("eval", "edits", "--sae", planted, "--head", seg_head, "--images", images, "--masks", masks,
               "--feature", "2=0", "--value", "-30x", "--n-boot", "50", "--out", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    assert "target" in r.output and "other" in r.output and "square" in r.output and "random direction" in r.output


def _one_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_mask_of_another_size_is_one_line(planted, seg_head, seg, tmp_path):
    images, masks = seg
    bad = tmp_path / "masks"
    bad.mkdir()
    (bad / "classes.txt").write_text((masks / "classes.txt").read_text())
    for p in sorted(masks.glob("*.png")):
        Image.open(p).resize((20, 24)).save(bad / p.name)
    line = _one_line(invoke("eval", "edits", "--sae", planted, "--head", seg_head, "--images", images,
                            "--masks", bad, "--feature", "square=0"))
    assert "is 20x24 but its image" in line


def test_missing_class_file_is_one_line(planted, seg_head, seg, tmp_path):
    images, masks = seg
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in sorted(masks.glob("*.png")):
        (bare / p.name).write_bytes(p.read_bytes())
    line = _one_line(invoke("eval", "edits", "--sae", planted, "--head", seg_head, "--images", images,
                            "--masks", bare, "--feature", "square=0"))
    assert "has no class file" in line


def test_classify_head_and_unknown_class_are_one_line(planted, seg_head, seg):
    images, masks = seg
    line = _one_line(invoke("eval", "edits", "--sae", planted, "--head", "timm", "--images", images, "--masks", masks,
                            "--feature", "square=0"))
    assert "needs a segment head" in line
    line = _one_line(invoke("eval", "edits", "--sae", planted, "--head", seg_head, "--images", images, "--masks", masks,
                            "--feature", "circle=0"))
    assert "names no class of the masks" in line


def test_no_labels_and_no_index_is_one_line(planted, seg_head, seg):
    images, masks = seg
    line = _one_line(
        invoke("eval", "edits", "--sae", planted, "--head", seg_head, "--images", images, "--masks", masks)
    )
    assert "none mined in this workspace" in line


def test_verdict_per_class_and_true_label_flips(planted, seg_head, seg, tmp_path):
    """Each class gets a verdict (its target change rate against both controls', and --min-effect), and the share
    of its patches the head got right before the edit and wrong after (the masks are the truth)."""
    images, masks = seg
    res = run_edits(EditsConfig(images=str(images), masks=masks, sae=planted, head=str(seg_head),
                                features=("square=0",), value="-30x", out=tmp_path / "v.json", device="cpu",
                                n_boot=200))
    square = res.rows[0]
    v = square["verdict"]
    assert v["result"] == "specific" and v["metric"] == "target change rate" and v["test"]
    assert v["effect"] == square["conditions"]["feature"]["target"]
    feat_true = square["conditions"]["feature"]["true"]
    assert feat_true["mean"] > 0.9  # the squares it got right are all wrong after suppressing the square direction
    assert square["conditions"]["random direction"]["true"]["mean"] < feat_true["lo"]
    strict = run_edits(EditsConfig(images=str(images), masks=masks, sae=planted, head=str(seg_head),
                                   features=("square=0",), value="-30x", out=tmp_path / "s.json", device="cpu",
                                   n_boot=200, min_effect=1.0))
    target = square["conditions"]["feature"]["target"]["mean"]
    assert strict.rows[0]["verdict"]["result"] == ("specific" if target >= 1.0 else "too small")
