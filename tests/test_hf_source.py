"""Hugging Face datasets as an image source, tested with real folders written by `save_to_disk`: splits,
ClassLabel names, the same activations as the same image files, and a fast one-line error offline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.data import open_image, resolve_images
from saevctl.errors import InputError
from saevctl.extract import Config, run

datasets = pytest.importorskip("datasets")


def _image_files(image_dir: Path) -> list[Path]:
    return [Path(r.path) for r in resolve_images(str(image_dir)).records]


@pytest.fixture
def saved(image_dir: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A DatasetDict (train: the fixture's 13 images as embedded bytes, one corrupt; validation: 3) on disk."""
    files = _image_files(image_dir)
    features = datasets.Features({
        "caption": datasets.Value("string"),
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=["dogs", "cats"]),
    })
    train = datasets.Dataset.from_dict({
        "caption": [p.name for p in files],
        "image": [{"bytes": p.read_bytes(), "path": None} for p in files],
        "label": [p.parent.name for p in files],
    }, features=features)
    dpath = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "validation": train.select([5, 1, 3])}).save_to_disk(str(dpath))
    return dpath, files


def test_lists_rows_with_class_names(saved: tuple[Path, list[Path]]) -> None:
    dpath, files = saved
    src = resolve_images(f"hf:{dpath}")
    assert src.kind == "hf" and src.spec == f"hf:{dpath}"
    assert [r.label for r in src.records] == [p.parent.name for p in files]
    assert [r.path for r in src.records[:2]] == [f"hf:{dpath}#0", f"hf:{dpath}#1"]
    val = resolve_images(f"hf:{dpath}:validation")
    assert [r.label for r in val.records] == [files[i].parent.name for i in (5, 1, 3)]
    assert np.array_equal(np.asarray(open_image(val.records[0].path)), np.asarray(open_image(str(files[5]))))
    with pytest.raises(InputError, match=r"has no split 'test' .it has train, validation"):
        resolve_images(f"hf:{dpath}:test")
    assert len(resolve_images(f"hf:{dpath}", max_images=2).records) == 2


def test_same_activations_as_image_files(saved: tuple[Path, list[Path]], tiny_vit: str, tmp_path: Path) -> None:
    dpath, files = saved
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\t{p.parent.name}\n" for p in files))
    common = {
        "model": tiny_vit,
        "layers": (1, 3),
        "dtype": "float32",
        "batch_size": 4,
        "images_per_shard": 4,
        "device": "cpu",
    }
    a = run(Config(images=f"hf:{dpath}:train", out=tmp_path / "from-hf", **common))
    b = run(Config(images=str(lst), out=tmp_path / "from-files", **common))
    assert a.manifest["n_rows"] == 12 and a.manifest["n_failed"] == 1
    npys = sorted(p.relative_to(a.out) for p in (a.out / "shards").rglob("*.npy"))
    assert npys and npys == sorted(p.relative_to(b.out) for p in (b.out / "shards").rglob("*.npy"))
    for rel in npys:
        assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes(), rel


def test_single_dataset_of_file_paths(image_dir: Path, tmp_path: Path) -> None:
    """A plain Dataset (no splits) whose image cells point at files; no ClassLabel column, so no labels."""
    files = [p for p in _image_files(image_dir) if "corrupt" not in p.name]
    ds = datasets.Dataset.from_dict(
        {"img": [str(p) for p in files]}, features=datasets.Features({"img": datasets.Image()})
    )
    ds.save_to_disk(str(tmp_path / "plain"))
    src = resolve_images(f"hf:{tmp_path / 'plain'}")
    assert len(src.records) == len(files) and all(r.label is None for r in src.records)
    assert np.array_equal(np.asarray(open_image(src.records[4].path)), np.asarray(open_image(str(files[4]))))


def test_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_images = tmp_path / "no-images"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(no_images))
    # A hub address that refuses at once, whether or not this machine has a network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    cases = [
        (
            "hf:ILSVRC/imagenet-1k:validation",
            "cannot reach the Hugging Face hub at 127.0.0.1 to load ILSVRC/imagenet-1k",
        ),
        (f"hf:{tmp_path}/missing", "is not a dataset saved with save_to_disk"),
        (f"hf:{no_images}", "has no image column (columns: text)"),
    ]
    runner = CliRunner()
    for spec, msg in cases:
        t0 = time.monotonic()
        res = runner.invoke(app, ["extract", "--images", spec, "--out", str(tmp_path / "s"), "--device", "cpu"])
        assert time.monotonic() - t0 < 10
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.stderr
    assert "save_to_disk" in runner.invoke(app, ["extract", "--images", cases[0][0]]).stderr
