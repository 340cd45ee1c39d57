"""The demo's images and labels (saevctl.data.demo): greyscale photos as RGB, shapes drawn exactly where their
masks say, and `--masks demo` as a mask folder every mask reader takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from saevctl.data import demo
from saevctl.data.images import open_image, resolve_images, source_of
from saevctl.data.masks import check_masks, open_masks, parse_mask_spec, patch_labels
from saevctl.data.preprocess import Preprocess
from saevctl.errors import InputError


def test_greyscale_photos_come_as_rgb_and_every_photo_is_in_a_small_demo() -> None:
    recs = resolve_images("demo:40").records
    assert {r.label for r in recs} == set(demo.COLOUR_PHOTOS) | set(demo.GREY_PHOTOS)
    arr = np.asarray(open_image("skimage:camera"))
    assert arr.shape == (512, 512, 3) and (arr == arr[..., :1]).all()
    assert {source_of(r.path) for r in recs} == {f"skimage:{n}" for n in demo.DEMO_PHOTOS}


def test_shapes_are_drawn_exactly_where_their_masks_say() -> None:
    crops = [r.path for r in resolve_images("demo:260").records if "#" in r.path]
    shaped = [p for p in crops if "+" in p]
    assert 0.35 < len(shaped) / len(crops) < 0.65
    assert {p.split("+")[1].split(":")[0] for p in shaped} == set(demo.SHAPES)
    for path in shaped[:6]:
        img, bare = np.asarray(open_image(path)), np.asarray(open_image(demo.without_shape(path)))
        mask = np.asarray(demo.demo_mask(path))
        kind, colour = path.split("+")[1].split(":")[0], path.rsplit(",", 1)[1]
        inside = mask == demo.CLASSES.index(kind)
        assert mask.shape == img.shape[:2] and set(np.unique(mask)) == {demo.CLASSES.index("photo"), int(mask.max())}
        assert inside.mean() > 0.02
        assert (img[inside] == demo.COLOURS[colour]).all()
        assert (img[~inside] == bare[~inside]).all()  # nothing drawn outside the mask


def test_masks_demo_is_a_folder_every_mask_reader_takes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEVCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "DEFAULT_DEMO_N", 40)
    masks = open_masks("demo")
    assert masks.classes == demo.CLASSES and masks.dpath == demo.demo_masks_dpath()
    assert parse_mask_spec("demo") == ("shapes", masks.dpath)
    recs = resolve_images("demo:40").records
    assert all(masks.path_for(r.path) is not None for r in recs)
    assert check_masks(masks, recs) == 40
    rec = next(r for r in recs if "+" in r.path)
    kind = rec.path.split("+")[1].split(":")[0]
    pre = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), mode="letterbox", interpolation="box")
    fpath = masks.path_for(rec.path)
    assert fpath is not None
    labels = patch_labels(fpath, open_image(rec.path).size, pre, (16, 16), image=rec.path)
    assert demo.CLASSES.index(kind) in labels and demo.CLASSES.index("photo") in labels
    before = {p: p.stat().st_mtime_ns for p in masks.dpath.iterdir()}
    assert open_masks("demo").dpath == masks.dpath  # written once
    assert {p: p.stat().st_mtime_ns for p in masks.dpath.iterdir()} == before


@pytest.mark.parametrize("path", ["skimage:coffee#1,2", "skimage:coffee#1,2,30,0+star:5,5,4,red",
                                  "skimage:coffee#1,2,30,0+disc:5,5,4,mauve", "skimage:nosuchphoto"])
def test_bad_demo_paths_are_one_line(path: str) -> None:
    with pytest.raises(InputError, match="demo"):
        open_image(path)
