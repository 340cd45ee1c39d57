"""The extraction Config: which model, which images, which blocks and tokens, and how the store is written.

Torch-free, so that `saevctl extract --help` is built from it without loading the pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saevctl.config import DeviceOpts, check_finite, opt
from saevctl.errors import InputError

StoreDtype = Literal["float16", "bfloat16", "float32"]
# The store's token kinds (saevctl.store.format.TOKEN_KINDS, which needs numpy; pipeline.py asserts they agree).
TOKEN_KINDS = ("patches", "cls", "registers")


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Config(DeviceOpts):
    model: str = opt("demo", short="-m")
    """Model spec: demo, timm:NAME, local-dir:/path, hf-hub:org/name, open_clip:ARCH/PRETRAINED."""
    images: str | None = opt(None, short="-i")
    """Images to extract (required): a folder (recursive; ImageFolder labels from subfolders), a .txt list of
    paths, demo[:N] (the offline demo, 2,048 scikit-image crops), WebDataset tars wds:/path/{000000..000099}.tar,
    or a Hugging Face dataset hf:NAME[:split] or hf:/saved/folder[:split]."""
    layers: tuple[int, ...] = opt((-1,), short="-l")
    """Comma list of blocks to store, 0-based; negative counts from the end."""
    out: Path = opt(Path("store"), short="-o")
    """Store folder; re-running the same command (same settings) resumes it."""
    tokens: tuple[str, ...] = ()
    """Comma list of token kinds to store: patches, cls, registers (default patches, plus cls when the model has
    one)."""
    dtype: StoreDtype = "float16"
    """Storage dtype: float16 (half of fp32, 11-bit mantissa; refuses values beyond its range), bfloat16 or
    float32."""
    batch_size: int = opt(32, short="-b")
    """Images per forward pass."""
    compute: Literal["auto", "float32", "bfloat16"] = "auto"
    """Forward precision: auto (bfloat16 autocast on a GPU for a 16-bit store, float32 on a CPU), float32, or
    bfloat16 autocast (on a CPU with AMX or AVX-512 BF16 about 3x faster than float32). With bfloat16 a few images
    of the first batch also run in float32, and each layer's relative error is printed and kept in the store's
    compute.json."""
    max_images: int | None = None
    """Use only the first N images of the source."""
    images_per_shard: int = 512
    """Images per shard (rounded up to a multiple of --batch-size), the unit of resume."""
    masks: tuple[str, ...] = opt((), repeat=True)
    """Folder of per-image PNG class masks named <image stem>.png, with its class file (classes.txt, or ADE20K's
    objectInfo150.csv, in it, its parent or grandparent): stores each patch's majority class beside the
    activations. Several mask sets: NAME=DIR, repeated (--masks shape=DIR --masks colour=DIR); the first is the
    default set of readers."""
    n_workers: int = opt(factory=_default_workers, hidden=True)
    """Threads decoding images ahead of the forward pass (default: one per core, up to 4)."""

    def check(self) -> None:
        super().check()
        if self.images is None:
            raise InputError("missing --images", "pass --images DIR (or --images demo for the offline demo photos)")
        bad = [t for t in self.tokens if t not in TOKEN_KINDS]
        if bad:  # checked here, not as a Literal, to name every unknown kind in one line
            raise InputError(f"unknown token kind(s) {bad}", f"use a comma list of {', '.join(TOKEN_KINDS)}")
        for name in ("batch_size", "images_per_shard", "n_workers"):
            check_finite(name, getattr(self, name), low=1)
        if self.max_images is not None and self.max_images < 1:
            raise InputError(f"--max-images {self.max_images} keeps no images",
                             "pass a positive number, or leave it out")
        if not self.layers:
            raise InputError("no layers given", "pass --layers, e.g. --layers 6,11")
