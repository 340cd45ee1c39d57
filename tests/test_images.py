"""Image sources: folders (recursive), ImageFolder labels, list files, the demo set; odd pixel formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saevctl.data import open_image, resolve_images
from saevctl.data.images import DEFAULT_DEMO_N, DEMO_PHOTOS
from saevctl.errors import InputError

from conftest import draw_image


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "pics"
    for rel in ["b.png", "a/z.JPG", "a/deeper/m.webp", "c.bmp", "a/y.jpeg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        draw_image(rng).save(root / rel)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"x")
    (root / ".ipynb_checkpoints").mkdir()
    draw_image(rng).save(root / ".ipynb_checkpoints" / "copy.png")
    src = resolve_images(str(root))
    assert src.kind == "folder"  # files at several depths: no class labels
    rels = [Path(r.path).relative_to(root.resolve()).as_posix() for r in src.records]
    assert rels == ["a/deeper/m.webp", "a/y.jpeg", "a/z.JPG", "b.png", "c.bmp"]
    assert [r.id for r in src.records] == list(range(5))
    assert all(r.label is None and Path(r.path).is_absolute() for r in src.records)
    assert resolve_images(str(root)).records == src.records  # stable across runs


def test_imagefolder_labels_from_subfolders(image_dir: Path) -> None:
    src = resolve_images(str(image_dir))
    assert src.kind == "imagefolder"
    assert src.labels == ["cats", "dogs"]
    assert len(src.records) == 13
    for r in src.records:
        assert Path(r.path).parent.name == r.label
    assert src.records[-1].path.endswith("dogs/zz_corrupt.jpg")


def test_relative_folder_argument_stores_absolute_paths(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image_dir.parent)
    rel = resolve_images(image_dir.name)
    absolute = resolve_images(str(image_dir))
    assert rel.records == absolute.records and rel.fingerprint() == absolute.fingerprint()
    assert rel.spec == str(image_dir.resolve())


def test_list_file_with_labels_comments_and_relative_paths(image_dir: Path, tmp_path: Path) -> None:
    lst = tmp_path / "sub" / "list.txt"
    lst.parent.mkdir()
    cat = next((image_dir / "cats").iterdir())
    lines = ["# my images", "", f"{cat}\tkitty", "../missing.png", f"{image_dir / 'dogs' / 'img00.jpg'}"]
    lst.write_text("\n".join(lines) + "\n")
    src = resolve_images(str(lst))
    assert src.kind == "list"
    assert [(r.id, r.label) for r in src.records] == [(0, "kitty"), (1, None), (2, None)]
    assert src.records[1].path == str(tmp_path / "sub" / ".." / "missing.png")
    with pytest.raises(InputError, match="does not exist"):
        open_image(src.records[1].path)
    assert open_image(src.records[0].path).mode == "RGB"
    assert len(resolve_images(str(lst), max_images=2).records) == 2


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        resolve_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no pictures here")
    with pytest.raises(InputError, match="no images found"):
        resolve_images(str(tmp_path / "empty"))
    (tmp_path / "list.txt").write_text("# only a comment\n")
    with pytest.raises(InputError, match="names no images"):
        resolve_images(str(tmp_path / "list.txt"))
    draw_image(np.random.default_rng(0)).save(tmp_path / "one.png")
    with pytest.raises(InputError, match="single image file"):
        resolve_images(str(tmp_path / "one.png"))
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match=r"cannot read .* as a text list"):
        resolve_images(str(tmp_path / "blob.dat"))
    for bad in ("demo:0", "demo:-3", "demo:many"):
        with pytest.raises(InputError, match="bad demo size"):
            resolve_images(bad)


def test_demo_is_deterministic_and_ids_are_stable() -> None:
    a, b = resolve_images("demo:40"), resolve_images("demo:40")
    assert a.records == b.records and a.fingerprint() == b.fingerprint()
    assert [r.id for r in a.records] == list(range(40))
    assert resolve_images("demo:25").records == a.records[:25]  # a smaller demo is a prefix: ids mean the same image
    assert resolve_images("demo", max_images=40).records == a.records
    assert len(resolve_images("demo").records) == DEFAULT_DEMO_N
    assert {r.label for r in a.records} == set(DEMO_PHOTOS)
    assert len({r.path for r in a.records}) == 40  # crops and flips make distinct images
    for rec in (a.records[3], a.records[17], a.records[39]):
        x, y = np.asarray(open_image(rec.path)), np.asarray(open_image(rec.path))
        assert x.ndim == 3 and x.shape[2] == 3 and x.dtype == np.uint8
        assert np.array_equal(x, y)


def test_demo_crops_are_real_crops_of_the_photos() -> None:
    recs = resolve_images("demo:30").records
    crop = next(r for r in recs if "#" in r.path and r.path.endswith(",0"))
    name, spec = crop.path.removeprefix("skimage:").split("#")
    left, top, side, _ = (int(v) for v in spec.split(","))
    whole = np.asarray(open_image(f"skimage:{name}"))
    assert np.array_equal(np.asarray(open_image(crop.path)), whole[top : top + side, left : left + side])
    flipped = next(r for r in recs if "#" in r.path and r.path.endswith(",1"))
    name, spec = flipped.path.removeprefix("skimage:").split("#")
    left, top, side, _ = (int(v) for v in spec.split(","))
    whole = np.asarray(open_image(f"skimage:{name}"))
    assert np.array_equal(np.asarray(open_image(flipped.path)), whole[top : top + side, left : left + side][:, ::-1])


def test_pixel_formats_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(open_image(str(tmp_path / "rgba.png")))
    assert out.shape == (8, 8, 3)
    assert out[0, 0].tolist() == [200, 0, 0] and out[7, 7].tolist() == [255, 255, 255]  # transparent -> white

    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "grey.jpg")
    out = np.asarray(open_image(str(tmp_path / "grey.jpg")))
    assert out.shape == (8, 8, 3) and (out == out[..., :1]).all() and abs(int(out[0, 0, 0]) - 77) <= 2

    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    out = np.asarray(open_image(str(tmp_path / "grey16.png")))
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out[..., 0], np.round(grey16 / 257.0), atol=1)  # scaled, not clipped to white

    Image.fromarray(rgba, "RGBA").convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgba[..., :3]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("palette.png", "cmyk.jpg"):
        img = open_image(str(tmp_path / name))
        assert img.mode == "RGB" and img.size == (8, 8)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8 not a jpeg", b"\x89PNG\r\n\x1a\n truncated"])
def test_corrupt_files_raise_input_error(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "bad.png"
    f.write_bytes(content)
    with pytest.raises(InputError, match=r"cannot read image .*bad.png") as info:
        open_image(str(f))
    assert info.value.one_line().endswith("The file is corrupt or not an image.")


def test_truncated_real_image_is_unreadable(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    draw_image(np.random.default_rng(3), (64, 64)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read image"):
        open_image(str(tmp_path / "cut.jpg"))


def test_demo_size_table_matches_the_photos():
    from saevctl.data.images import DEMO_SIZES, _demo_array

    assert {n: _demo_array(n).shape[:2] for n in DEMO_SIZES} == DEMO_SIZES
