"""`saevctl heads train|list`: linear classify and segment heads learn separable data, round-trip through
head.safetensors + head.json, and refuse bad inputs with one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.edit.heads import load_head, read_head_header
from saevctl.errors import ProbeError
from saevctl.probe.train_head import (
    HeadTrainConfig,
    mask_to_input,
    mean_iou,
    patch_labels,
    read_class_names,
    train_head,
)
from saevctl.vit import Preprocess, load_backbone


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def color_folder(tmp_path_factory) -> Path:
    """ImageFolder with two linearly separable classes: reddish and bluish pictures with random shapes."""
    root = tmp_path_factory.mktemp("colors")
    rng = np.random.default_rng(0)
    for cls, base in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / cls).mkdir()
        for i in range(10):
            arr = np.clip(np.array(base) + rng.integers(-30, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            ImageDraw.Draw(img).ellipse((*tuple(int(v) for v in rng.integers(0, 30, 2)), 38, 38), fill=(128, 128, 128))
            img.save(root / cls / f"{cls}{i}.png")
    return root


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Images with a yellow square on grey (class 1 = square, 0 = background, 255 = unlabelled border)."""
    root = tmp_path_factory.mktemp("seg")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        img = np.full((32, 32, 3), 90, np.uint8) + rng.integers(0, 20, (32, 32, 3)).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        r, c = (int(v) * 8 for v in rng.integers(0, 3, 2))
        img[r : r + 16, c : c + 16] = (230, 210, 30)
        mask[r : r + 16, c : c + 16] = 1
        mask[:, 0] = 255
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
    names = root / "classes.txt"
    names.write_text("background\nsquare\n")
    return root / "images", root / "masks", names


def test_train_classify_cli_saves_a_head_that_loads(color_folder, tiny_vit, tmp_path):
    out = tmp_path / "clf"
    r = invoke("heads", "train", "--task", "classify", "--images", color_folder, "--model", tiny_vit, "--out", out,
               "--device", "cpu", "--epochs", "200")
    assert r.exit_code == 0, r.output
    assert "val accuracy" in r.output and "16 train, 4 validation" in r.output
    header = read_head_header(out)
    assert header["task"] == "classify" and header["classes"] == ["blue", "red"] and header["pool"] == "cls"
    assert header["layer"] == 3 and header["final_norm"] is True and header["schema_version"] == layout.HEAD_SCHEMA
    assert header["metrics"]["val_accuracy"] == 1.0  # the two colours are linearly separable
    bb = load_backbone(tiny_vit)
    assert header["model"]["weights_sha256"] == bb.weights_sha256
    head = load_head(out, bb)
    x = torch.stack([bb.preprocess(Image.open(p)) for p in sorted(color_folder.rglob("*.png"))])
    pred = head(bb.forward_tokens(x), (32, 32)).argmax(-1)
    assert pred.tolist() == [0] * 10 + [1] * 10  # blue sorts first


def test_train_classify_mean_pool_and_intermediate_layer(color_folder, tiny_vit, tmp_path):
    res = train_head(HeadTrainConfig(task="classify", images=str(color_folder), model=tiny_vit, out=tmp_path / "h",
                                     layer=1, pool="mean", device="cpu", epochs=100))
    header = read_head_header(res.out)
    assert header["layer"] == 1 and header["final_norm"] is False and header["pool"] == "mean"
    assert res.metrics["val_accuracy"] >= 0.75


def test_train_segment_reports_miou(seg_data, tiny_vit, tmp_path):
    images, masks, names = seg_data
    out = tmp_path / "seg"
    r = invoke("heads", "train", "--task", "segment", "--images", images, "--masks", masks, "--class-names", names,
               "--model", tiny_vit, "--out", out, "--device", "cpu", "--epochs", "300")
    assert r.exit_code == 0, r.output
    assert "val miou" in r.output
    header = read_head_header(out)
    assert header["classes"] == ["background", "square"] and header["task"] == "segment"
    assert header["metrics"]["val_miou"] > 0.6


def test_train_segment_reads_the_mask_folders_class_file(seg_data, tiny_vit, tmp_path):
    """Without --class-names the mask folder's classes.txt names the classes, read as extract --masks reads it:
    value 0 is 'other', so only the square is a trained class."""
    import shutil

    images, masks, _ = seg_data
    own = tmp_path / "masks"
    shutil.copytree(masks, own)
    (own / "classes.txt").write_text("other\nsquare\n")
    out = tmp_path / "seg"
    r = invoke("heads", "train", "--task", "segment", "--images", images, "--masks", own,
               "--model", tiny_vit, "--out", out, "--device", "cpu", "--epochs", "200")
    assert r.exit_code == 0, r.output
    header = read_head_header(out)
    assert header["classes"] == ["other", "square"]
    assert header["metrics"]["val_miou"] > 0.5


def test_train_segment_refuses_a_mask_of_another_size(seg_data, tmp_path):
    """The size check `extract --masks` makes, before the model loads: a mask must be its image's size."""
    import shutil

    images, masks, names = seg_data
    own = tmp_path / "masks"
    shutil.copytree(masks, own)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(own / "im03.png")
    r = invoke("heads", "train", "--task", "segment", "--images", images, "--masks", own, "--class-names", names,
               "--model", "nosuch:model", "--device", "cpu")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: mask {own / 'im03.png'} is 16x16 but its image "), r.output
    assert "is 32x32" in lines[0], r.output


def test_heads_list_shows_ready_and_trained(color_folder, tiny_vit):
    r = invoke("heads", "list")
    assert r.exit_code == 0 and "saliency" in r.output and "no trained heads" in r.output
    train_head(HeadTrainConfig(task="classify", images=str(color_folder), model=tiny_vit, device="cpu", epochs=20))
    r = invoke("heads", "list")
    assert r.exit_code == 0 and "trained heads in" in r.output and "classify" in r.output


def test_mask_geometry_and_patch_labels():
    pre = Preprocess(size=8, mean=(0, 0, 0), std=(1, 1, 1), mode="letterbox")
    mask = Image.fromarray(np.array([[1, 2, 2, 255]] * 2, np.uint8))  # 4x2: letterboxed into 8x8 rows 2..5
    labels = mask_to_input(mask, pre, offset=0, n_classes=3, ignore=255)
    assert (labels[:2] == -1).all() and (labels[6:] == -1).all()  # padding is unlabelled
    assert labels[3].tolist() == [1, 1, 2, 2, 2, 2, -1, -1]
    assert patch_labels(np.array([[0, 0, 1, -1], [0, 1, 1, -1]]), 1, 2).tolist() == [0, 1]
    assert patch_labels(np.full((2, 2), -1), 1, 1).tolist() == [-1]


def test_mean_iou_and_class_files(tmp_path):
    truth = np.array([[0, 0, 1, -1]])
    assert mean_iou(np.array([[0, 0, 1, 1]]), truth, 2) == 1.0
    assert mean_iou(np.array([[0, 1, 1, 0]]), truth, 2) == pytest.approx((0.5 + 0.5) / 2)
    ade = tmp_path / "objectInfo150.csv"
    ade.write_text("Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n2,0.1,1,1,building;edifice\n")
    assert read_class_names(ade) == (["wall", "building"], 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "classify", "--images", "FLAT"], "has no class labels"),
        (["--task", "segment", "--images", "FLAT"], "error: --task segment needs --masks DIR"),
        (["--task", "nope", "--images", "FLAT"], "error: unknown --task 'nope'"),
        (["--images", "FLAT"], "error: missing --task"),
        (["--task", "segment", "--images", "FLAT", "--masks", "MISSING"], "error: mask folder"),
    ],
)
def test_heads_train_errors(tiny_vit, tmp_path, args, message):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(flat / f"{i}.png")
    args = [str(flat) if a == "FLAT" else str(tmp_path / "nothere") if a == "MISSING" else a for a in args]
    r = invoke("heads", "train", "--model", tiny_vit, "--device", "cpu", *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output


def test_head_of_another_schema_is_refused(color_folder, tiny_vit, tmp_path):
    res = train_head(HeadTrainConfig(task="classify", images=str(color_folder), model=tiny_vit, out=tmp_path / "h",
                                     device="cpu", epochs=5))
    cfg = layout.head_config_fpath(res.out)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "schema_version": 99}))
    with pytest.raises(ProbeError, match="has head schema 99, this saevctl reads 1"):
        read_head_header(res.out)
