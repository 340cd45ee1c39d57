"""Mask folders and per-patch labels: class files, majority per patch under the model's resize + crop (against an
independent nearest-neighbour reference), `extract --masks` writing row-aligned labels, resume, and the errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.data.masks import MaskSizeError, majority_per_patch, mask_geometry, open_masks, patch_labels
from saevctl.data.preprocess import Preprocess
from saevctl.errors import InputError
from saevctl.extract import Config, run
from saevctl.store import open_store

runner = CliRunner()
PRE = Preprocess(32, (0.5,) * 3, (0.5,) * 3, mode="center_crop", crop_pct=0.9, interpolation="bicubic")


def write_masks(
    image_dir: Path, out: Path, seed: int = 0, classes: tuple[str, ...] = ("other", "sky", "grass", "tree")
) -> Path:
    """A random block mask (ids 0..len(classes)-1) of each image's exact size, mirroring the image folders."""
    rng = np.random.default_rng(seed)
    for img_fpath in sorted(image_dir.rglob("*")):
        if not img_fpath.is_file() or "corrupt" in img_fpath.name:
            continue
        with Image.open(img_fpath) as im:
            w, h = im.size
        blocks = rng.integers(0, len(classes), (5, 6))
        ids = np.kron(blocks, np.ones((h // 5 + 1, w // 6 + 1), dtype=np.int64))[:h, :w]
        dst = out / img_fpath.relative_to(image_dir).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids.astype(np.uint8), "L").save(dst)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return out


# --- reference: nearest-neighbour resize + centre crop written out by hand --------------------------------


def _nearest_sources(n_in: int, n_out: int) -> np.ndarray:
    """PIL's NEAREST resize: source pixel floor(x_o) with x_o stepping from in/out * 0.5 by in/out (float64
    additions in order, as Pillow's ImagingScaleAffine does, so exact-boundary cases round the same way)."""
    step, xo, out = n_in / n_out, n_in / n_out * 0.5, []
    for _ in range(n_out):
        out.append(min(int(xo), n_in - 1))
        xo += step
    return np.array(out)


def reference_labels(ids_hw: np.ndarray, pre: Preprocess, grid: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the shorter side to size / crop_pct, centre crop, majority per patch."""
    h, w = ids_hw.shape
    scale = int(pre.size / pre.crop_pct)
    nw, nh = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    ys, xs = _nearest_sources(h, nh), _nearest_sources(w, nw)
    resized = ids_hw[ys][:, xs] if (nw, nh) != (w, h) else ids_hw
    top, left = round((nh - pre.size) / 2.0), round((nw - pre.size) / 2.0)
    crop = resized[top : top + pre.size, left : left + pre.size]
    gh, gw = grid
    ph, pw = pre.size // gh, pre.size // gw
    out = []
    for r in range(gh):
        for c in range(gw):
            vals, counts = np.unique(crop[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw], return_counts=True)
            best = vals[counts == counts.max()].min()  # ties: the smaller id
            out.append(-1 if best == 0 else best)
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(20, 90), h=st.integers(20, 90), n_cls=st.integers(2, 6), block=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_patch_majority_follows_the_models_resize_and_crop(w: int, h: int, n_cls: int, block: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, n_cls, (h // block + 1, w // block + 1))
    ids = np.kron(blocks, np.ones((block, block), dtype=np.int64))[:h, :w]
    got = majority_per_patch(mask_geometry(ids.astype(np.int32), PRE), (4, 4))
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, reference_labels(ids, PRE, (4, 4)))


def test_patch_labels_hand_case_and_16_bit_ids(tmp_path: Path) -> None:
    pre = Preprocess(32, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)  # 32x32 mask: no resize, no crop
    ids = np.zeros((32, 32), dtype=np.uint16)
    ids[:, :16] = 300  # beyond 8 bits: needs a 16-bit PNG
    ids[:8, 16:] = 7
    fpath = tmp_path / "m.png"
    Image.fromarray(ids).save(fpath)
    got = patch_labels(fpath, (32, 32), pre, (4, 4)).reshape(4, 4)
    np.testing.assert_array_equal(got, [[300, 300, 7, 7], [300, 300, -1, -1], [300, 300, -1, -1], [300, 300, -1, -1]])
    with pytest.raises(MaskSizeError, match=r"is 32x32 but its image x.jpg is 40x32"):
        patch_labels(fpath, (40, 32), pre, (4, 4), image="x.jpg")


def test_class_files(tmp_path: Path) -> None:
    d = tmp_path / "ade" / "annotations"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(d / "ADE_train_00000001.png")
    with pytest.raises(InputError) as e:
        open_masks(d)
    assert "classes.txt" in e.value.message and "objectInfo150.csv" in e.value.message and str(d) in e.value.message
    (tmp_path / "ade" / "objectInfo150.csv").write_text(
        "Idx,Ratio,Train,Val,Name\n1,0.15,1,1,wall\n2,0.1,1,1,building;edifice\n3,0.09,1,1,sky\n")
    ms = open_masks(d)
    assert ms.classes == ("other", "wall", "building", "sky")
    assert ms.path_for("/photos/ADE_train_00000001.jpg") == d.resolve() / "ADE_train_00000001.png"
    assert ms.path_for("/photos/other.jpg") is None
    (d / "classes.txt").write_text("none\nroad\n")  # classes.txt in DIR wins
    assert open_masks(d).classes == ("none", "road")
    # the challenge zip's layout: ADEChallengeData2016/objectInfo150.txt beside annotations/training/
    train = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
    train.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(train / "ADE_train_00000001.png")
    (tmp_path / "ADEChallengeData2016" / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n2\t0.1072\t6046\t612\tbuilding, edifice\n")
    assert open_masks(train).classes == ("other", "wall", "building")


def test_class_files_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_masks(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"holds no .png masks"):
        open_masks(tmp_path / "empty")


def test_extract_masks_writes_row_aligned_labels_and_resumes(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    masks = write_masks(image_dir, tmp_path / "masks")
    (masks / "dogs" / "img00.png").unlink()  # one image without a mask: its row is unlabelled
    (masks / "cats" / "img01.png").write_bytes(b"not a png")  # an unreadable mask: also unlabelled
    out = tmp_path / "store"
    run(Config(model=tiny_vit, images=str(image_dir), layers=(1,), out=out, masks=masks, dtype="float32",
               batch_size=4, images_per_shard=4, device="cpu"))
    store = open_store(out)
    assert store.classes == ("other", "sky", "grass", "tree")
    lab = store.patch_labels
    assert lab.dtype == np.int16 and lab.shape == (store.n_images, 16) == (12, 16)
    pre = Preprocess.from_dict(store.model["preprocess"])
    ms = open_masks(masks)
    for im in store.images:
        if im["row"] < 0:
            continue
        if im["path"].endswith(("img00.png", "img00.jpg", "img01.png")):
            assert (lab[im["row"]] == -1).all(), im["path"]
            continue
        want = patch_labels(ms.path_for(im["path"]), (im["width"], im["height"]), pre, (4, 4))
        np.testing.assert_array_equal(lab[im["row"]], want)
    assert (np.asarray(lab) >= 0).mean() > 0.5
    head = json.loads(layout.store_classes_fpath(out).read_text())
    assert head["schema"] == 1 and head["source"] == str(masks.resolve()) and head["n_unreadable_masks"] == 1
    # ImageFolder labels as class ids, aligned with rows
    assert store.image_classes == ("cats", "dogs")
    rows = {im["row"]: im["label"] for im in store.images if im["row"] >= 0}
    assert [store.image_classes[i] for i in store.image_labels] == [rows[r] for r in range(store.n_images)]
    # resume: a complete store with matching labels is left alone; deleted labels are rewritten
    fpath = layout.store_patch_labels_fpath(out)
    before = fpath.stat().st_mtime_ns
    assert run(Config(model=tiny_vit, images=str(image_dir), layers=(1,), out=out, masks=masks, dtype="float32",
                      batch_size=4, images_per_shard=4, device="cpu")).already_complete
    assert fpath.stat().st_mtime_ns == before
    saved = np.asarray(lab).copy()
    layout.store_classes_fpath(out).unlink()
    assert open_store(out).patch_labels is None
    run(Config(model=tiny_vit, images=str(image_dir), layers=(1,), out=out, masks=masks, dtype="float32",
               batch_size=4, images_per_shard=4, device="cpu"))
    np.testing.assert_array_equal(open_store(out).patch_labels, saved)
    assert not [p for p in layout.store_labels_dpath(out).iterdir() if p.name.startswith(".")]


def test_store_without_masks_has_no_patch_labels(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    assert store.patch_labels is None and store.classes is None
    assert store.image_classes == ("cats", "dogs") and store.image_labels.shape == (store.n_images,)


def _extract_cli(tiny_vit: str, images: Path, out: Path, masks: Path) -> object:
    return runner.invoke(app, ["extract", "--model", tiny_vit, "--images", str(images), "--layers", "1",
                               "--out", str(out), "--masks", str(masks), "--device", "cpu", "--dtype", "float32"])


def test_cli_errors_are_one_line(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    masks = write_masks(image_dir, tmp_path / "masks")
    # missing class file
    os.rename(masks / "classes.txt", tmp_path / "classes.txt")
    r = _extract_cli(tiny_vit, image_dir, tmp_path / "s1", masks)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "has no class file (classes.txt in it, or objectInfo150.csv" in r.stderr
    os.rename(tmp_path / "classes.txt", masks / "classes.txt")
    # a mask of the wrong size: refused before anything is computed
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(masks / "cats" / "img03.png")
    r = _extract_cli(tiny_vit, image_dir, tmp_path / "s2", masks)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "img03.png is 12x10 but its image" in r.stderr and "is 48x40" in r.stderr
    assert not (tmp_path / "s2").exists()
    # masks that match no image
    other = tmp_path / "unrelated"
    other.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(other / "zzz.png")
    (other / "classes.txt").write_text("other\na\n")
    r = _extract_cli(tiny_vit, image_dir, tmp_path / "s3", other)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "no image has a mask" in r.stderr


def test_resume_with_other_masks_is_refused(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    m1 = write_masks(image_dir, tmp_path / "m1")
    m2 = write_masks(image_dir, tmp_path / "m2", seed=1)
    r = _extract_cli(tiny_vit, image_dir, tmp_path / "s", m1)
    assert r.exit_code == 0, r.output
    assert "labels" in r.stdout and "3 classes" in r.stdout
    r = _extract_cli(tiny_vit, image_dir, tmp_path / "s", m2)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert f"masks {m1.resolve()} vs {m2.resolve()}" in r.stderr


def test_two_ranks_write_the_same_labels(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    """Under torchrun (gloo, CPU), rank 0 writes the labels once the store is complete: same bytes as one process."""
    from test_dist_extract import _extract_args, _finish, _torchrun

    masks = write_masks(image_dir, tmp_path / "masks")
    run(Config(model=tiny_vit, images=str(image_dir), layers=(1,), out=tmp_path / "one", masks=masks,
               dtype="float32", batch_size=2, images_per_shard=2, device="cpu"))
    code, _, err = _finish(
        _torchrun(2, [*_extract_args(tiny_vit, image_dir, tmp_path / "two", "1"), "--masks", str(masks)])
    )
    assert code == 0, err
    for fpath in (layout.store_patch_labels_fpath, layout.store_classes_fpath):
        assert fpath(tmp_path / "one").read_bytes() == fpath(tmp_path / "two").read_bytes()


def test_the_mask_pass_advances_the_progress_to_its_total(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    masks = write_masks(image_dir, tmp_path / "masks")
    totals, done = [], []
    run(Config(model=tiny_vit, images=str(image_dir), layers=(1,), out=tmp_path / "s", masks=masks, dtype="float32",
               device="cpu"), progress=done.append, on_total=totals.append)
    assert totals == [2 * 13] and sum(done) == 2 * 13  # 13 listed images (one corrupt), activations then masks
