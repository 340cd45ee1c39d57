"""Shared fixtures: an isolated home and working directory per test, a tiny real timm ViT saved as
`local-dir:`, a folder of real image files (one corrupt), and a small store extracted from them."""

from __future__ import annotations

# Runtime checks of every saevctl annotation (jaxtyping shapes and dtypes, beartype for the rest; see
# typecheck.py) while the tests run: the hook must be installed before the first saevctl import.
from jaxtyping import install_import_hook

install_import_hook("saevctl", "typecheck.typechecker")

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

TINY_ARGS = {"img_size": 32, "patch_size": 8, "depth": 4, "num_classes": 3, "embed_dim": 32, "num_heads": 2}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own SAEVCTL_HOME and working directory (the model cache stays shared)."""
    home = tmp_path / "saevctl-home"
    monkeypatch.setenv("SAEVCTL_HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def make_tiny_vit(dpath: Path, seed: int = 0, **overrides: object) -> Path:
    """A random-init timm ViT saved the way timm's local-dir: loader reads it."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    args = {**TINY_ARGS, **overrides}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    save_for_hf(model, str(dpath), safe_serialization=True, model_args=args)
    return dpath


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Model spec of a tiny ViT: 32 px, 8 px patches (4x4 grid), 4 blocks, width 32, 3 classes."""
    return "local-dir:" + str(make_tiny_vit(tmp_path_factory.mktemp("tinyvit") / "vit"))


def draw_image(rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A real picture with structure: a gradient background and a few coloured shapes."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, rng.integers(0, 255))], -1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(4, 16)), y0 + int(rng.integers(4, 16))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return img


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 real PNG/JPEG files in two class subfolders plus one corrupt file (ImageFolder layout)."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    rng = np.random.default_rng(0)
    for i in range(12):
        cls = "cats" if i % 2 else "dogs"
        (root / cls).mkdir(parents=True, exist_ok=True)
        ext = ".png" if i % 3 else ".jpg"
        draw_image(rng).save(root / cls / f"img{i:02d}{ext}")
    (root / "dogs" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    return root


@pytest.fixture(scope="session")
def tiny_store(tiny_vit: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete store of the tiny ViT at layers 1 and 3 (patches + cls), float32, 4 images per shard."""
    from saevctl.extract import Config, run

    out = tmp_path_factory.mktemp("stores") / "tiny"
    old = os.environ.get("SAEVCTL_HOME")
    run(Config(model=tiny_vit, images=str(image_dir), layers=(1, 3), out=out, dtype="float32",
               batch_size=4, images_per_shard=4, device="cpu"))
    assert old == os.environ.get("SAEVCTL_HOME")
    return out
