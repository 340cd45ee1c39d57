"""Extraction end to end on tiny real models: stored values equal a direct forward, dtype errors, token
kinds, the image table, and resume after a real SIGKILL (byte-identical to an uninterrupted run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.errors import InputError, StoreError
from saevctl.extract import Config, run
from saevctl.store import open_store
from saevctl.vit import load_backbone

from conftest import make_tiny_vit
from tiny_models import direct_forward, make_overflowing_vit, make_tiny_clip

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def extract(tmp_path: Path, model: str, images: str, name: str, **kw: object) -> Path:
    out = tmp_path / name
    args = {"layers": (1, 3), "batch_size": 4, "images_per_shard": 4, "device": "cpu", **kw}
    run(Config(model=model, images=images, out=out, **args))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def reference(tiny_vit: str, image_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    return direct_forward(load_backbone(tiny_vit), str(image_dir), [1, 3], batch_size=4)


def test_float32_store_equals_direct_forward(tiny_store: Path, reference: dict[int, dict[str, torch.Tensor]]) -> None:
    store = open_store(tiny_store)
    for layer in (1, 3):
        view = store.layer(layer)
        assert view.patches.shape == (12, 16, 32) and view.cls.shape == (12, 32)
        assert view.patches.torch().dtype == torch.float32
        assert torch.equal(view.patches.torch(), reference[layer]["patches"])
        assert torch.equal(view.cls.torch(), reference[layer]["cls"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_stores_equal_direct_forward_rounded(
    tmp_path: Path, tiny_vit: str, image_dir: Path, reference: dict[int, dict[str, torch.Tensor]], dtype: str
) -> None:
    store = open_store(extract(tmp_path, tiny_vit, str(image_dir), dtype, dtype=dtype))
    assert store.dtype == dtype and store.manifest["config"]["dtype"] == dtype
    for layer in (1, 3):
        for kind in ("patches", "cls"):
            got = store.layer(layer).kind(kind).torch()
            assert got.dtype == TORCH_DTYPES[dtype]
            assert torch.equal(got, reference[layer][kind].to(TORCH_DTYPES[dtype]))  # exactly the rounded forward


def test_float16_error_against_float32_is_small(
    tmp_path: Path, tiny_vit: str, image_dir: Path, tiny_store: Path
) -> None:
    """Measured on this tiny ViT: relative error (Frobenius) about 2.5e-4 for float16 and 2e-3 for bfloat16.

    float16 keeps 11 significant bits, so its rounding error is at most 2^-11 of each value; bfloat16 keeps 8.
    """
    f32 = open_store(tiny_store)
    for dtype, bound, ulp in (("float16", 5e-4, 2.0**-11), ("bfloat16", 4e-3, 2.0**-8)):
        half = open_store(extract(tmp_path, tiny_vit, str(image_dir), dtype, dtype=dtype))
        for layer in (1, 3):
            a32, a16 = f32.layer(layer).patches[:], half.layer(layer).patches[:].astype(np.float32)
            rel = np.linalg.norm(a16 - a32) / np.linalg.norm(a32)
            assert 0 < rel < bound, (dtype, layer, rel)
            normal = np.abs(a32) > 1e-4  # float16 subnormals have absolute, not relative, precision
            assert (np.abs(a16 - a32)[normal] <= ulp * np.abs(a32)[normal] * 1.0001).all()


def test_values_beyond_float16_are_refused_and_bfloat16_works(tmp_path: Path, image_dir: Path) -> None:
    spec = "local-dir:" + str(make_overflowing_vit(tmp_path / "hot"))
    with pytest.raises(StoreError) as info:
        extract(tmp_path, spec, str(image_dir), "f16")
    line = info.value.one_line()
    assert "beyond float16's range (65504)" in line and "--dtype bfloat16" in line
    store = open_store(extract(tmp_path, spec, str(image_dir), "bf16", dtype="bfloat16"))
    patches = store.layer(1).patches.torch().float()
    assert torch.isfinite(patches).all() and patches[..., 0].abs().min() > 9e4

    res = CliRunner().invoke(app, ["extract", "--model", spec, "--images", str(image_dir), "--layers", "1",
                                   "--out", str(tmp_path / "cli16"), "--device", "cpu"])
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == f"error: {line}"
    assert "Traceback" not in res.stderr


def test_registers_are_stored_when_the_model_has_them(tmp_path: Path, image_dir: Path) -> None:
    spec = "local-dir:" + str(make_tiny_vit(tmp_path / "reg-model", seed=5, reg_tokens=4, no_embed_class=True))
    out = extract(tmp_path, spec, str(image_dir), "reg", tokens=("patches", "cls", "registers"), dtype="float32")
    store = open_store(out)
    ref = direct_forward(load_backbone(spec), str(image_dir), [1, 3], batch_size=4)
    assert store.layout.n_reg == 4 and store.manifest["shapes"]["registers"] == [12, 4, 32]
    for layer in (1, 3):
        for kind in ("patches", "cls", "registers"):
            assert torch.equal(store.layer(layer).kind(kind).torch(), ref[layer][kind]), (layer, kind)


def test_registers_on_a_model_without_them_is_an_error(tmp_path: Path, tiny_vit: str, image_dir: Path) -> None:
    with pytest.raises(InputError, match=r"has no registers tokens .it has patches, cls."):
        extract(tmp_path, tiny_vit, str(image_dir), "noreg", tokens=("patches", "registers"))
    assert not (tmp_path / "noreg").exists()  # refused before anything was written


def test_open_clip_extraction_equals_direct_forward(tmp_path: Path, image_dir: Path) -> None:
    arch, ckpt = make_tiny_clip(tmp_path / "clip-model")
    spec = f"open_clip:{arch}/{ckpt}"
    store = open_store(extract(tmp_path, spec, str(image_dir), "clip", layers=(0, 2), dtype="float32"))
    ref = direct_forward(load_backbone(spec), str(image_dir), [0, 2], batch_size=4)
    assert store.model["arch"] == arch and store.layout.n_cls == 1
    for layer in (0, 2):
        assert torch.equal(store.layer(layer).patches.torch(), ref[layer]["patches"])
        assert torch.equal(store.layer(layer).cls.torch(), ref[layer]["cls"])


def test_manifest_and_image_table(tiny_store: Path, tiny_vit: str, image_dir: Path) -> None:
    store = open_store(tiny_store)
    m = store.manifest
    cfg = m["config"]
    bb = load_backbone(tiny_vit)
    assert m["schema_version"] == layout.STORE_SCHEMA and m["complete"] is True
    assert cfg["model"]["spec"] == tiny_vit and cfg["model"]["weights_sha256"] == bb.weights_sha256
    assert cfg["model"]["preprocess"] == bb.preprocess.to_dict()
    assert cfg["model"]["layout"] == {"n_cls": 1, "n_reg": 0, "grid_h": 4, "grid_w": 4}
    assert cfg["layers"] == [1, 3] and cfg["tokens"] == ["patches", "cls"] and cfg["dtype"] == "float32"
    assert m["shapes"] == {"patches": [12, 16, 32], "cls": [12, 32]}
    assert (m["n_images"], m["n_rows"], m["n_failed"]) == (13, 12, 1)
    assert [s["n_rows"] for s in m["shards"]] == [4, 4, 4, 0]
    files = sorted(p.relative_to(tiny_store).as_posix() for p in tiny_store.rglob("*") if p.is_file())
    assert m["bytes"] == sum((tiny_store / f).stat().st_size for f in files if f.startswith("shards/"))
    assert not [f for f in files if "tmp" in f]
    table = store.images
    assert [im["id"] for im in table] == list(range(13))
    for im in table[:12]:
        assert im["status"] == "ok" and (im["width"], im["height"]) == (48, 40)
        assert im["label"] == Path(im["path"]).parent.name and Path(im["path"]).is_file()
    bad = table[12]
    assert bad["status"] == "unreadable" and bad["row"] == -1 and bad["path"].endswith("zz_corrupt.jpg")
    assert bad["width"] is None and "cannot read image" in bad["error"]
    assert m["failed_ids"] == [12]
    assert store.row_image_ids().tolist() == list(range(12))


def test_negative_layers_and_max_images(tmp_path: Path, tiny_vit: str, image_dir: Path) -> None:
    store = open_store(extract(tmp_path, tiny_vit, str(image_dir), "neg", layers=(-1, 1, -3), max_images=5))
    assert store.layers == [1, 3] and store.n_images == 5
    assert len(store.images) == 5


def snapshot(dpath: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(dpath).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(dpath.rglob("*"))
        if p.is_file()
    }


def test_rerunning_a_complete_store_changes_nothing(tmp_path: Path, tiny_vit: str, image_dir: Path) -> None:
    args = ["extract", "--model", tiny_vit, "--images", str(image_dir), "--layers", "1,3", "--out", str(tmp_path / "s"),
            "--device", "cpu", "--batch-size", "4", "--images-per-shard", "4"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "already complete" not in first.stdout and "12 stored, 1 unreadable" in first.stdout
    before = snapshot(tmp_path / "s")
    time.sleep(0.01)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "already complete" in again.stdout and "12 stored, 1 unreadable" in again.stdout
    assert snapshot(tmp_path / "s") == before


def store_bytes(dpath: Path) -> dict[str, bytes]:
    """Every file of a store; the manifest without its timestamp."""
    out = {p.relative_to(dpath).as_posix(): p.read_bytes() for p in sorted(dpath.rglob("*")) if p.is_file()}
    manifest = json.loads(out.pop("manifest.json"))
    manifest.pop("written_at")
    out["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return out


def test_sigkilled_run_resumes_byte_identical(tmp_path: Path, tiny_vit: str, image_dir: Path) -> None:
    """A real process is SIGKILLed right after its first shard lands; the same command finishes the job.

    The images: a list file naming the 13 test files 24 times over (312 images, 24 unreadable), 39 shards.
    """
    files = sorted(str(p) for p in image_dir.rglob("*.*"))
    (tmp_path / "list.txt").write_text("".join(f"{f}\n" for _ in range(24) for f in files))
    args = ["--images", str(tmp_path / "list.txt"), "--model", tiny_vit, "--layers", "0,1,2,3", "--batch-size", "4",
            "--images-per-shard", "8", "--device", "cpu"]
    cmd = [sys.executable, "-m", "saevctl", "extract", *args, "--out"]
    # One compute thread each: the two runs overlap, and tiny matmuls gain nothing from more.
    env = {**os.environ, "SAEVCTL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen([*cmd, str(tmp_path / "uninterrupted")], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = tmp_path / "killed"
    victim = subprocess.Popen([*cmd, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not layout.store_shard_dpath(killed, 0).exists():
            assert victim.poll() is None, victim.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.001)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    manifest = json.loads(layout.store_manifest_fpath(killed).read_text())
    n_done = len([p for p in layout.store_shards_dpath(killed).iterdir() if p.name.isdigit()])
    print(f"killed with {n_done} of 39 shards written")
    assert not manifest["complete"] and 1 <= n_done < 39, n_done  # really killed mid-run

    resumed = subprocess.run([*cmd, str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({n_done} resumed)" in resumed.stdout and "288 stored, 24 unreadable" in resumed.stdout
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()  # type: ignore[union-attr]
    want, got = store_bytes(tmp_path / "uninterrupted"), store_bytes(killed)
    assert sorted(got) == sorted(want) and len(want) == 2 + 39 * 9
    for name in want:
        assert got[name] == want[name], name
    assert open_store(killed).layer(3).patches.shape == (288, 16, 32)
