"""Several mask sets per store (issue 18): `extract --masks shape=DIR --masks colour=DIR` stores each set under its
name, finds a class file where ADE20K puts it (beside the mask folder's parent) through a symlinked mask tree, keeps
one-set stores as they were, and refuses a resume with other sets; `features label --masks NAME` labels from one set;
probes and evaluations edit the patches of a mask class (`--patches mask:CLASS`, `mask:SET/CLASS`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.data.masks import open_masks, patch_labels
from saevctl.data.preprocess import Preprocess
from saevctl.store import open_store

from test_masks import write_masks
from test_mine import make_sae

runner = CliRunner()
SHAPE = ("other", "sky", "grass", "tree")
COLOUR = ("other", "red", "sky")  # "sky" is in both sets: mask:sky is ambiguous


@pytest.fixture(scope="module", autouse=True)
def wide_console() -> None:
    from saevctl.console import console

    console.width = 250


def _ok(*args: object) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def _fails(text: str, *args: object) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    return r.stderr


def _colour_world(image_dir: Path, root: Path) -> Path:
    """ADE20K's layout reached through symlinks: world/annotations/colour -> real/, whose class folders link on to
    elsewhere/; the class file is world/classes.txt, beside the mask folder's parent, and nowhere the links lead."""
    from PIL import Image

    elsewhere = write_masks(image_dir, root / "elsewhere", seed=1, classes=COLOUR)
    (elsewhere / "classes.txt").unlink()
    for fpath in sorted(elsewhere.rglob("*.png"))[:3]:  # three images without red
        with Image.open(fpath) as im:
            Image.fromarray(np.full((im.height, im.width), 2, np.uint8), "L").save(fpath)
    (root / "real").mkdir()
    for sub in ("cats", "dogs"):
        os.symlink(elsewhere / sub, root / "real" / sub, target_is_directory=True)
    (root / "world" / "annotations").mkdir(parents=True)
    os.symlink(root / "real", root / "world" / "annotations" / "colour", target_is_directory=True)
    (root / "world" / "classes.txt").write_text("\n".join(COLOUR) + "\n")
    return root / "world" / "annotations" / "colour"


@pytest.fixture(scope="module")
def world(tiny_vit: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("masksets")
    shape = write_masks(image_dir, root / "shape", classes=SHAPE)
    colour = _colour_world(image_dir, root)
    store = root / "store"
    args = ["extract", "--model", tiny_vit, "--images", image_dir, "--layers", "1", "--out", store, "--masks",
            f"shape={shape}", "--masks", f"colour={colour}", "--dtype", "float32", "--device", "cpu"]
    out = _ok(*args)
    sae = make_sae(store, root / "sae", layer=1, n_latents=32, train={"store": str(store)})
    sae.save(root / "sae")
    return {"root": root, "store": store, "shape": shape, "colour": colour, "args": args, "out": out,
            "sae": root / "sae"}


def test_two_sets_are_stored_under_their_names(world: dict, image_dir: Path) -> None:
    store = open_store(world["store"])
    assert store.mask_sets() == {"shape": None, "colour": "colour"}
    assert store.classes == SHAPE and store.classes_of("colour") == COLOUR
    assert layout.store_patch_labels_fpath(world["store"]).is_file()  # the default set where one-set stores have it
    assert layout.store_patch_labels_fpath(world["store"], "colour").is_file()
    assert "(set shape, default)" in world["out"] and "(set colour)" in world["out"]
    colour = open_masks(world["colour"])
    assert colour.classes == COLOUR and len(colour.by_stem) == 12  # found through both levels of links
    pre = Preprocess.from_dict(store.model["preprocess"])
    lab = store.patch_labels_of("colour")
    for im in store.images:
        if im["row"] >= 0:
            want = patch_labels(colour.path_for(im["path"]), (im["width"], im["height"]), pre, (4, 4))
            np.testing.assert_array_equal(lab[im["row"]], want)
    assert not np.array_equal(np.asarray(lab), np.asarray(store.patch_labels))
    with pytest.raises(Exception, match="has no mask set 'nope' \\(its sets: shape, colour\\)"):
        store.mask_set("nope")


def test_resume_keeps_the_sets_and_refuses_other_ones(world: dict, image_dir: Path) -> None:
    before = layout.store_patch_labels_fpath(world["store"], "colour").stat().st_mtime_ns
    assert "(already complete)" in _ok(*world["args"])
    assert layout.store_patch_labels_fpath(world["store"], "colour").stat().st_mtime_ns == before
    other = write_masks(image_dir, world["root"] / "other", seed=2, classes=COLOUR)
    args = [a if not str(a).startswith("colour=") else f"colour={other}" for a in world["args"]]
    _fails("further mask sets colour=", *args)
    _fails("two mask sets are named 'shape'", *world["args"][:-4], "--masks", f"shape={other}", "--masks",
           f"shape={world['shape']}")


def test_label_from_a_named_set(world: dict, tmp_path: Path) -> None:
    from saevctl.mine import Config as MineConfig
    from saevctl.mine import Index
    from saevctl.mine import run as mine

    index = tmp_path / "index.duckdb"
    mine(MineConfig(sae=world["sae"], store=world["store"], index=index, device="cpu", set_defaults=False))
    ix = ["--sae", world["sae"], "--index", index, "--device", "cpu", "--level", "patch"]
    out = _ok("features", "label", *ix, "--masks", "colour")
    assert "patch:colour level: best feature per class" in out
    _ok("features", "label", *ix)  # the default set: level patch, as before
    with Index.open(index) as idx:
        sae_id = idx.resolve_sae(str(world["sae"]))
        assert {r["class_name"] for r in idx.class_features(sae_id, "patch:colour")} == {"red", "sky"}
        assert {r["class_name"] for r in idx.class_features(sae_id, "patch")} == {"sky", "grass", "tree"}
        assert idx.label_levels(sae_id) == ["patch"]  # features list and the report keep the default set's
    _fails("has no mask set 'nope'", "features", "label", *ix, "--masks", "nope")


# --- --patches mask:CLASS -------------------------------------------------------------------------------------


def _class_patches(store: Path, masks_dpath: Path, image: str, class_id: int) -> np.ndarray:
    """The reference: the image's patches whose majority class in the mask is `class_id`."""
    from PIL import Image

    pre = Preprocess.from_dict(open_store(store).model["preprocess"])
    with Image.open(image) as im:
        size = im.size
    return patch_labels(open_masks(masks_dpath).path_for(image), size, pre, (4, 4)) == class_id


def test_probe_edits_the_patches_of_a_mask_class(world: dict, image_dir: Path, tmp_path: Path) -> None:
    from saevctl.probe import Config, run

    img = str(sorted(image_dir.rglob("*.png"))[-1])
    common = {"image": img, "clamps": ("0=0",), "sae": world["sae"], "head": "timm", "device": "cpu"}
    res = run(Config(patches="mask:shape/tree", out=tmp_path / "a.png", **common), figure=False)
    np.testing.assert_array_equal(res.edited_hw.reshape(-1), _class_patches(world["store"], world["shape"], img, 3))
    res = run(Config(patches="mask:red", out=tmp_path / "b.png", **common), figure=False)  # only colour has red
    np.testing.assert_array_equal(res.edited_hw.reshape(-1), _class_patches(world["store"], world["colour"], img, 1))
    assert res.edited_hw.any()
    no_red = str(next(p for p in sorted(image_dir.rglob("*.png"))
                      if not _class_patches(world["store"], world["colour"], str(p), 1).any()))
    res = run(Config(patches="mask:red", out=tmp_path / "d.png", **{**common, "image": no_red}), figure=False)
    assert not res.edited_hw.any() and res.notes == ["mask colour/red covers no patch of this image, so nothing "
                                                     "was edited"]
    # an explicit --masks folder instead of the store's sets
    res = run(Config(patches="mask:grass", masks=(str(world["shape"]),), out=tmp_path / "c.png", **common),
              figure=False)
    np.testing.assert_array_equal(res.edited_hw.reshape(-1), _class_patches(world["store"], world["shape"], img, 2))
    args = ["probe", "--sae", world["sae"], "--image", img, "--clamp", "0=0", "--head", "timm"]
    _fails("class 'sky' is in several mask sets (colour, shape)", *args, "--patches", "mask:sky")
    _fails("no class 'sea' in the mask sets (shape, colour)", *args, "--patches", "mask:sea")
    _fails("no mask set 'paint'", *args, "--patches", "mask:paint/red")


def test_batch_probe_on_a_mask_class(world: dict, image_dir: Path, tmp_path: Path) -> None:
    from saevctl.probe.batch import BatchConfig, run_batch

    res = run_batch(BatchConfig(images=str(image_dir), clamps=("0=0",), sae=world["sae"], head="timm",
                                patches="mask:colour/red", out=tmp_path / "m.png", device="cpu", n_boot=50))
    lab = open_store(world["store"]).patch_labels_of("colour")
    with_red = int((np.asarray(lab) == 1).any(1).sum())
    assert res.n_images == with_red == res.n_fired == 9
    assert "3 images without mask colour/red in their mask were left out" in res.notes
    summary = json.loads(res.summary.read_text())
    assert summary["patches"] == "mask:colour/red" and len(summary["per_image"]["paths"]) == with_red


def test_eval_edits_reads_a_set_by_name(world: dict, image_dir: Path, tmp_path: Path) -> None:
    from saevctl.edit.maskpatches import eval_mask_folder
    from saevctl.eval.edits import EditsConfig, run_edits

    assert eval_mask_folder("colour", world["sae"]) == (world["colour"], "patch:colour")  # symlinks kept
    assert eval_mask_folder(str(world["shape"]), world["sae"])[1] == "patch"
    res = run_edits(EditsConfig(images=str(image_dir), masks="colour", sae=world["sae"], head="timm", level="image",
                                features=("red=0",), value="5", out=tmp_path / "e.json", device="cpu", n_boot=50))
    lab = open_store(world["store"]).patch_labels_of("colour")
    assert res.rows[0]["class"] == "red" and res.rows[0]["n_images"] == int((np.asarray(lab) == 1).any(1).sum())
