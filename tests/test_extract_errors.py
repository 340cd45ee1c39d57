"""Every bad input of `saevctl extract` gives exit 2 and one stderr line naming the problem and the fix;
`--debug` shows the traceback; help and version work without importing torch."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.store import open_store

from conftest import make_tiny_vit


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def extract_args(model: str, images: str | Path, out: str | Path, *more: str) -> list[str]:
    return ["extract", "--model", model, "--images", str(images), "--out", str(out), "--device", "cpu", *more]


def assert_one_line_error(res: Result, *phrases: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, and the line names problem and fix."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: ") and line.endswith(".")
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    assert "Traceback" not in res.output
    return line


def test_missing_image_folder(tiny_vit: str, tmp_path: Path) -> None:
    res = cli(*extract_args(tiny_vit, tmp_path / "no-such-folder", tmp_path / "out", "--layers", "1"))
    assert_one_line_error(res, f"image folder {tmp_path / 'no-such-folder'} does not exist",
                          "Pass an existing folder, a .txt list of paths, or demo")
    assert not (tmp_path / "out").exists()


def test_empty_image_folder(tiny_vit: str, tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    res = cli(*extract_args(tiny_vit, tmp_path / "empty", tmp_path / "out", "--layers", "1"))
    assert_one_line_error(res, "no images found in", "searched recursively", "or pass --images demo")


@pytest.mark.parametrize(
    "model,phrases",
    [
        ("nonsense", ("unknown model name 'nonsense'", "Use one of: demo, timm:NAME, local-dir:/path")),
        ("timm:not_a_real_vit", ("unknown timm model 'not_a_real_vit'", "local-dir:/path")),
        ("open_clip:NoSuchArch/openai", ("unknown open_clip architecture 'NoSuchArch'", "open_clip.list_models()")),
        ("local-dir:/no/such/dir", ("/no/such/dir is not a timm model folder", "config.json and model.safetensors")),
    ],
)
def test_unknown_model_name(image_dir: Path, tmp_path: Path, model: str, phrases: tuple[str, ...]) -> None:
    assert_one_line_error(cli(*extract_args(model, image_dir, tmp_path / "out")), *phrases)


@pytest.mark.parametrize("layers", ["1,4", "-5", "99"])
def test_layer_outside_the_model(tiny_vit: str, image_dir: Path, tmp_path: Path, layers: str) -> None:
    res = cli(*extract_args(tiny_vit, image_dir, tmp_path / "out", "--layers", layers))
    assert_one_line_error(res, "is outside", "which has blocks 0..3", "Choose layers between 0 and 3")


def test_output_folder_holding_something_else(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    res = cli(*extract_args(tiny_vit, image_dir, tmp_path / "thesis", "--layers", "1"))
    assert_one_line_error(
        res, "already holds other files and is not an activation store", "Choose an empty or new --out"
    )
    assert sorted(p.name for p in (tmp_path / "thesis").iterdir()) == ["chapter1.tex"]
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(cli(*extract_args(tiny_vit, image_dir, tmp_path / "afile")), "is a file", "folder path")


def test_existing_store_of_another_model_or_layer_set(
    tiny_vit: str, image_dir: Path, tiny_store: Path, tmp_path: Path
) -> None:
    same = ["--layers", "1,3", "--dtype", "float32", "--batch-size", "4", "--images-per-shard", "4"]
    before = {p: p.read_bytes() for p in tiny_store.rglob("*") if p.is_file()}
    other_model = "local-dir:" + str(make_tiny_vit(tmp_path / "other-vit", seed=7))
    res = cli(*extract_args(other_model, image_dir, tiny_store, *same))
    assert_one_line_error(res, "was made with other settings", f"model {tiny_vit} vs {other_model}",
                          "Use a new --out folder, or delete that store to replace it")
    res = cli(*extract_args(tiny_vit, image_dir, tiny_store, *same[:-6], "--layers", "1,2", *same[2:]))
    assert_one_line_error(res, "(layers [1, 3] vs [1, 2])")
    res = cli(*extract_args(tiny_vit, image_dir, tiny_store, *same[:2], "--dtype", "float16", *same[4:]))
    assert_one_line_error(res, "(dtype float32 vs float16)")
    assert {p: p.read_bytes() for p in tiny_store.rglob("*") if p.is_file()} == before


def test_store_of_other_weights_under_the_same_name(image_dir: Path, tmp_path: Path) -> None:
    vit = make_tiny_vit(tmp_path / "vit", seed=1)
    args = extract_args(f"local-dir:{vit}", image_dir, tmp_path / "s", "--layers", "1", "--max-images", "4")
    assert cli(*args).exit_code == 0
    make_tiny_vit(vit, seed=2)  # retrained in place
    assert_one_line_error(cli(*args), f"model local-dir:{vit} now has other weights (sha256")


def test_no_disk_space_before_starting(
    tiny_vit: str, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage

    def nearly_full(path: str | os.PathLike[str]) -> object:
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    res = cli(*extract_args(tiny_vit, image_dir, tmp_path / "out", "--layers", "1,3"))
    assert_one_line_error(res, f"not enough disk space at {tmp_path / 'out'}", "1.0 KB free",
                          "choose another --out, use --max-images")
    assert not layout.store_shards_dpath(tmp_path / "out").exists()  # nothing but the empty store's manifest


def test_disk_full_while_writing_leaves_a_resumable_store(
    tiny_vit: str, image_dir: Path, tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of a shard's files: one error line, no half shard, and the rerun completes the
    store byte for byte as an undisturbed run would (the session's tiny_store has the same settings)."""
    from saevctl.store import writer

    real_write = writer.write_rows
    saves = {"n": 0}

    def filling_disk(f: Any, arr: np.ndarray) -> None:
        saves["n"] += 1
        if saves["n"] > 6:  # shard 0 holds 4 arrays of one batch; shard 1 fails on its third
            f.write(b"half a batch")
            raise OSError(errno.ENOSPC, "No space left on device", f.name)
        real_write(f, arr)

    out = tmp_path / "s"
    args = extract_args(tiny_vit, image_dir, out, "--layers", "1,3", "--dtype", "float32", "--batch-size", "4",
                        "--images-per-shard", "4")
    monkeypatch.setattr(writer, "write_rows", filling_disk)
    res = cli(*args)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: no space left on the device while writing {layout.store_shard_dpath(out, 1)}. "
        "Free some disk space or choose another --out, then run the same command again to resume."
    ]
    assert res.stderr.splitlines()[-1] == errors[0] and "Traceback" not in res.stderr
    shards = sorted(p.name for p in layout.store_shards_dpath(out).iterdir())
    assert shards == ["000000"]  # no half shard, no temp folder left behind
    assert not json.loads(layout.store_manifest_fpath(out).read_text())["complete"]

    monkeypatch.setattr(writer, "write_rows", real_write)  # space freed
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "(1 resumed)" in res.stdout
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    want = {p.relative_to(tiny_store).as_posix(): p.read_bytes() for p in tiny_store.rglob("*") if p.is_file()}
    assert sorted(got) == sorted(want)
    for name in want:
        if name != "manifest.json":
            assert got[name] == want[name], name
    def without_time(b: bytes) -> dict[str, object]:
        return {k: v for k, v in json.loads(b).items() if k != "written_at"}

    assert without_time(got["manifest.json"]) == without_time(want["manifest.json"])


def test_unreadable_images_are_skipped_counted_and_listed(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    res = cli(*extract_args(tiny_vit, image_dir, tmp_path / "s", "--layers", "2"))
    assert res.exit_code == 0, res.output
    assert "12 stored, 1 unreadable (listed in images.jsonl)" in res.stdout
    rows = [json.loads(x) for x in layout.store_images_fpath(tmp_path / "s").read_text().splitlines()]
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(rows) == 13 and len(bad) == 1
    assert bad[0]["status"] == "unreadable" and bad[0]["path"].endswith("zz_corrupt.jpg") and bad[0]["row"] == -1
    assert open_store(tmp_path / "s").layer(2).patches.shape == (12, 16, 32)


def test_all_images_unreadable_still_makes_a_store(tiny_vit: str, tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(b"junk")
    res = cli(*extract_args(tiny_vit, tmp_path / "imgs", tmp_path / "s", "--layers", "2"))
    assert res.exit_code == 0, res.output
    assert "0 stored, 3 unreadable" in res.stdout
    assert open_store(tmp_path / "s").layer(2).patches.shape == (0, 16, 32)


@pytest.mark.parametrize(
    "option,phrases",
    [
        (["--tokens", "registers"], ("has no registers tokens (it has patches, cls)", "Drop them from --tokens")),
        (["--tokens", "patches,pixels"], ("unknown token kind(s) ['pixels']", "patches, cls, registers")),
        (["--dtype", "int8"], ("unknown --dtype 'int8'", "float16, bfloat16, float32")),
        (["--layers", "six"], ("bad --layers 'six'", "comma-separated integers")),
        (["--batch-size", "0"], ("must be positive",)),
        (["--max-images", "0"], ("--max-images 0 keeps no images",)),
        (["--images", "demo:0"], ("bad demo size", "at least 1")),
    ],
)
def test_bad_options(
    tiny_vit: str, image_dir: Path, tmp_path: Path, option: list[str], phrases: tuple[str, ...]
) -> None:
    args = extract_args(tiny_vit, image_dir, tmp_path / "out", "--layers", "1")
    if option[0] == "--images":
        args[args.index("--images") + 1] = option[1]
    else:
        args += option
    assert_one_line_error(cli(*args), *phrases)


def test_cuda_without_a_gpu(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = extract_args(tiny_vit, image_dir, tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    assert_one_line_error(cli(*args), "no CUDA GPU is visible", "--device cpu or auto")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "saevctl", "--debug", "extract", "--images", str(tmp_path / "missing"),
           "--model", "demo"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "SAEVCTL_HOME": str(tmp_path)}
    )
    assert proc.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in proc.stderr
    assert "saevctl.errors.InputError: image folder" in proc.stderr
    res = cli(*cmd[4:])  # the same command without --debug: one line (in-process, to save a start-up)
    assert_one_line_error(res, "image folder", "does not exist")


def test_help_and_version() -> None:
    import saevctl

    res = cli("--help")
    assert res.exit_code == 0 and "extract" in res.stdout and "sparse autoencoders" in res.stdout
    res = cli("extract", "--help")
    assert res.exit_code == 0
    for option in ("--model", "--images", "--layers", "--out", "--tokens", "--dtype", "--batch-size", "--device",
                   "--max-images"):
        assert option in res.stdout
    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"saevctl {saevctl.__version__}"


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys, saevctl.cli as c\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "for args in (['--help'], ['extract', '--help'], ['--version']):\n"
        "    try:\n"
        "        c.main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        "    assert 'torch' not in sys.modules, args\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--images" in proc.stdout and "saevctl " in proc.stdout


def test_config_file(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    toml = tmp_path / "extract.toml"
    toml.write_text(f'model = "{tiny_vit}"\nimages = "{image_dir}"\nlayers = [2]\ndtype = "bfloat16"\nmax_images = 3\n')
    res = cli("extract", "--config", str(toml), "--out", str(tmp_path / "s"), "--device", "cpu", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "s")
    assert store.layers == [2] and store.dtype == "float32" and store.n_images == 3  # the command line wins
    toml.write_text('layers = [2]\nbatchsize = 4\n')
    assert_one_line_error(cli("extract", "--config", str(toml)), "unknown config keys ['batchsize']", "batch_size")
    assert_one_line_error(cli("extract", "--config", str(tmp_path / "none.toml")), "does not exist")


def test_images_must_be_named() -> None:
    """A bare `saevctl extract` does not start the 2,048-image demo on its own: the image source is asked for."""
    assert_one_line_error(cli("extract"), "missing --images", "Pass --images DIR (or --images demo")
    assert_one_line_error(cli("extract", "--model", "demo", "--out", "x"), "missing --images")
    assert not Path("x").exists()
