"""WebDataset tar shards as an image source: brace expansion, grouping by key, labels, offset reads, and the
same activations as the same images read from files."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.data import open_image, resolve_images, wds
from saevctl.errors import InputError
from saevctl.extract import Config, run


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _image_files(image_dir: Path) -> list[Path]:
    """The fixture's 13 files (one corrupt) in the folder source's order."""
    return [Path(r.path) for r in resolve_images(str(image_dir)).records]


@pytest.fixture
def shards(image_dir: Path, tmp_path: Path) -> tuple[str, list[Path]]:
    """Two tars holding the fixture's images in folder order: labels as .cls in the first, .txt in the second,
    plus samples without an image (skipped) and a sub-folder key."""
    files = _image_files(image_dir)
    root = tmp_path / "wds"
    root.mkdir()
    half = 7
    for t, chunk in enumerate((files[:half], files[half:])):
        with tarfile.open(root / f"shard-{t:06d}.tar", "w") as tf:
            for i, p in enumerate(chunk):
                key = f"s{t}/{i:05d}" if i == 2 else f"{t}-{i:05d}"
                _add(tf, f"{key}.json", b'{"meta": 1}')
                _add(tf, f"{key}{p.suffix.lower()}", p.read_bytes())
                _add(tf, f"{key}.{'cls' if t == 0 else 'txt'}", p.parent.name.encode() + b"\n")
            _add(tf, "orphan.json", b"{}")
    return f"wds:{root}/shard-{{000000..000001}}.tar", files


@given(lo=st.integers(0, 300), n=st.integers(0, 40), width=st.integers(1, 6))
def test_expand_numeric_range(lo: int, n: int, width: int) -> None:
    a, b = f"{lo:0{width}d}", f"{lo + n:0{width}d}"
    pad = max(len(a), len(b)) if (a.startswith("0") or b.startswith("0")) else 0
    assert wds.expand_braces(f"x/{{{a}..{b}}}.tar") == [f"x/{i:0{pad}d}.tar" for i in range(lo, lo + n + 1)]


def test_expand_lists_and_groups() -> None:
    assert wds.expand_braces("a{1,2}-{00..02}") == ["a1-00", "a1-01", "a1-02", "a2-00", "a2-01", "a2-02"]
    assert wds.expand_braces("plain.tar") == ["plain.tar"]
    assert wds.expand_braces("{3..1}") == ["3", "2", "1"]
    with pytest.raises(InputError, match="cannot expand"):
        wds.expand_braces("x{abc}.tar")


def test_listing_groups_by_key_with_labels(shards: tuple[str, list[Path]]) -> None:
    spec, files = shards
    src = resolve_images(spec)
    assert src.kind == "wds"
    assert len(src.records) == 13  # the orphan .json samples are skipped
    assert [r.id for r in src.records] == list(range(13))
    assert [r.label for r in src.records] == [p.parent.name for p in files]
    assert src.records[2].path.endswith("shard-000000.tar#s0/00002" + files[2].suffix.lower())
    assert resolve_images(spec).fingerprint() == src.fingerprint()
    assert len(resolve_images(spec, max_images=4).records) == 4
    for rec, p in zip(src.records, files, strict=True):
        if p.name.startswith("zz_corrupt"):
            with pytest.raises(InputError, match="cannot read image"):
                open_image(rec.path)
        else:
            assert np.array_equal(np.asarray(open_image(rec.path)), np.asarray(open_image(str(p))))


def test_reads_by_offset_after_a_fresh_index_and_from_threads(shards: tuple[str, list[Path]]) -> None:
    spec, files = shards
    src = resolve_images(spec)
    wds._INDEX._members.clear()  # a later stage in a new process: the tar is indexed on first read
    want = {
        r.path: np.asarray(open_image(str(p)))
        for r, p in zip(src.records, files, strict=True)
        if "corrupt" not in p.name
    }
    bad: list[str] = []

    def read_all() -> None:
        for _ in range(3):
            for path, arr in want.items():
                if not np.array_equal(np.asarray(open_image(path)), arr):
                    bad.append(path)

    threads = [threading.Thread(target=read_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_same_activations_as_image_files(shards: tuple[str, list[Path]], tiny_vit: str, tmp_path: Path) -> None:
    spec, files = shards
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
    a = run(Config(images=spec, out=tmp_path / "from-wds", **common))
    b = run(Config(images=str(lst), out=tmp_path / "from-files", **common))
    assert a.manifest["n_rows"] == b.manifest["n_rows"] == 12 and a.manifest["n_failed"] == 1
    npys = sorted(p.relative_to(a.out) for p in (a.out / "shards").rglob("*.npy"))
    assert npys and npys == sorted(p.relative_to(b.out) for p in (b.out / "shards").rglob("*.npy"))
    for rel in npys:
        assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes(), rel
    assert a.manifest["config"]["images"]["kind"] == "wds"


def test_errors_are_one_line(tmp_path: Path) -> None:
    gz = tmp_path / "x.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        _add(tf, "a.png", b"123")
    runner = CliRunner()
    cases = [
        (f"wds:{tmp_path}/missing-{{0..1}}.tar", "WebDataset shard"),
        (f"wds:{gz}", "is not an uncompressed tar"),
        (f"wds:{tmp_path}/x{{abc}}.tar", "cannot expand"),
    ]
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:
        _add(tf, "a.json", b"{}")
    cases.append((f"wds:{empty}", "no images in the WebDataset shards"))
    for spec, msg in cases:
        res = runner.invoke(app, ["extract", "--images", spec, "--out", str(tmp_path / "s"), "--device", "cpu"])
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.stderr


def test_images_are_read_by_offset_without_rescanning(shards: tuple[str, list[Path]]) -> None:
    """Zero the tar's first header after listing: a rescan would find an empty tar, a read by offset does not."""
    spec, files = shards
    src = resolve_images(spec)
    tar = Path(src.records[0].path.removeprefix("wds:").partition("#")[0])
    with open(tar, "r+b") as f:
        f.write(b"\0" * 512)
    assert wds._scan(str(tar)) == {}  # a zero block reads as the end of the archive
    assert np.array_equal(np.asarray(open_image(src.records[1].path)), np.asarray(open_image(str(files[1]))))
