"""The probe stage's Configs, torch-free so `saevctl --help` stays light: one image (`Config`), many images against
controls (`BatchConfig`), what `saevctl probe` takes (`ProbeConfig`, either of them), and `heads train|list`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saevctl.config import (
    MAX_SEED,
    ConfigBase,
    DeviceOpts,
    RerunOpts,
    SaeTarget,
    StatsOpts,
    VerdictOpts,
    check_finite,
    opt,
)
from saevctl.errors import InputError, ProbeError


@dataclass(frozen=True, kw_only=True)
class ProbeEdit(ConfigBase):
    """The edit a probe makes (features, values, patches) and where its figure goes; mixed in after `SaeTarget`
    (the SAE and head it tests), so the edit's options lead in --help."""

    clamps: tuple[str, ...] = opt(flag="--clamp", short="-c", repeat=True)
    """FEATURE=VALUE edits, repeatable or comma-separated: 6909=0 ablates, 6909=3.5 sets, 6909=2x sets twice its max
    activation (needs a mined index), top=V edits the image's most active feature (one --image only)."""
    patches: str = opt("fired", short="-p")
    """all, fired (default: where each edited feature fires), r,c;r,c (grid row,column), box:x0,y0,x1,y1
    (model-input pixels), or mask:CLASS (each image's patches of a mask class; mask:SET/CLASS with several sets)."""
    masks: tuple[str, ...] = opt((), repeat=True)
    """For --patches mask:CLASS: a mask folder (PNG masks named like the images, with its class file), NAME=DIR, or
    the NAME of a mask set of the SAE's store; repeatable (default: every mask set of the store the SAE was trained
    on)."""
    out: Path | None = opt(None, short="-o")
    """PNG path (default probes/<image>_<clamps>.png, in batch mode probes/batch_<clamps>.png); batch mode writes a
    JSON summary beside it."""
    fast: bool = opt(True, hidden=True)
    """Edit through the chosen features' columns only (False: the full encode/decode reference)."""

    def check(self) -> None:
        super().check()
        if not self.clamps:
            raise ProbeError("no --clamp given", "pass at least one edit, e.g. --clamp 6909=0")


@dataclass(frozen=True, kw_only=True)
class BatchOpts(StatsOpts, VerdictOpts):
    """How a batch probe runs: images per pass and the two controls (a random feature of similar firing frequency,
    a random direction of the same norm) whose effects are compared with bootstrap CIs, and the verdict's floor."""

    batch_size: int = opt(16, short="-b")
    """Batch mode: images per forward pass (each pass runs 4 variants from the SAE's layer on)."""
    max_images: int | None = None
    """Batch mode: use only the first N images."""
    controls: bool = opt(True, flag="--controls/--no-controls")
    """Batch mode: run the two controls (off: only the feature edit)."""
    freq_images: int = 128
    """Batch mode without a mined index: firing frequencies are measured on this many of the images first."""
    n_workers: int = opt(2, hidden=True)
    """Threads decoding images ahead of the forward pass."""

    def check(self) -> None:
        super().check()
        check_finite("batch_size", self.batch_size, low=1)
        if self.n_boot < 10:
            raise ProbeError(f"--n-boot {self.n_boot} is too few resamples for a confidence interval",
                             "pass --n-boot 10 or more (1000 is usual)")
        check_finite("max_images", self.max_images, low=1)
        check_finite("freq_images", self.freq_images, low=1)
        check_finite("n_workers", self.n_workers, low=1)


@dataclass(frozen=True, kw_only=True)
class Config(SaeTarget, ProbeEdit):
    """One probe: the edit on one image, before/after tables and a PNG."""

    image: str
    """Image file, or a demo photo as skimage:NAME (e.g. skimage:chelsea)."""


@dataclass(frozen=True, kw_only=True)
class BatchConfig(BatchOpts, SaeTarget, ProbeEdit):
    """A batch probe: the edit over many images next to the two controls, with bootstrap confidence intervals."""

    images: str
    """Image folder, .txt list of paths, or demo[:N]."""


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(RerunOpts, BatchOpts, SaeTarget, ProbeEdit):
    """What `saevctl probe` takes: --image makes it a `Config`, --images a `BatchConfig` (batch options then apply)."""

    image: str | None = None
    """One image file (or skimage:NAME, e.g. skimage:chelsea): before/after tables and a PNG."""
    images: str | None = opt(None, short="-i")
    """Batch mode: image folder, .txt list of paths, or demo[:N]; effect sizes next to two controls, with 95%
    bootstrap CIs."""

    def check(self) -> None:
        super().check()
        if (self.image is None) == (self.images is None):
            raise ProbeError("give exactly one of --image (one picture) and --images (batch mode)",
                             "e.g. --image cat.jpg")

    def pick(self) -> Config | BatchConfig:
        """The one-image or the batch Config these options describe (a field of the other mode is left out)."""
        target: type[Config] | type[BatchConfig] = Config if self.image is not None else BatchConfig
        return target(**{f.name: getattr(self, f.name) for f in dataclasses.fields(target)})


@dataclass(frozen=True, kw_only=True)
class HeadTrainConfig(RerunOpts, DeviceOpts):
    """`heads train`: fit a linear head on a frozen ViT's tokens and evaluate it on held-out images."""

    task: Literal["classify", "segment"] = opt(short="-t", example="--task classify or --task segment")
    """classify (labels from ImageFolder subfolders) or segment (PNG masks of class indices)."""
    images: str = opt(short="-i", example="--images DIR")
    """Image folder (ImageFolder layout for classify), .txt list of paths, or demo[:N]."""
    model: str = opt("demo", short="-m")
    """Model spec the head reads: demo, timm:NAME, local-dir:/path, hf-hub:org/name, open_clip:ARCH/PRETRAINED."""
    masks: Path | None = None
    """segment: folder of PNG masks of class indices, one per image with the same file stem (searched recursively),
    each the size of its image."""
    class_names: Path | None = None
    """segment: one class name per line (line i names mask value i), or ADE20K's objectInfo150.csv (default: the
    mask folder's own class file as `extract --masks` finds it; value 0 then means 'other')."""
    out: Path | None = opt(None, short="-o")
    """Head folder (default heads/<task>)."""
    layer: int = opt(-1, short="-l")
    """Block whose output the head reads; -1 (the last, the default) means the final tokens after the model's norm."""
    pool: Literal["auto", "cls", "mean"] = "auto"
    """classify: cls, mean (of the patch tokens), or auto (cls when the model has a CLS token)."""
    val_fraction: float = 0.2
    """Share of the images held out for validation."""
    epochs: int = 300
    """Passes of AdamW over the cached token features."""
    lr: float = 1e-2
    """AdamW learning rate (features are standardised first)."""
    weight_decay: float = opt(1e-3, hidden=True)
    """AdamW weight decay."""
    ignore_index: int = 255
    """segment: mask value that marks unlabelled pixels."""
    batch_size: int = opt(32, short="-b")
    """Images per forward pass while caching features."""
    max_images: int | None = None
    """Use only the first N images."""
    seed: int = 0
    """Seed for the validation split and the initialisation."""

    def check(self) -> None:
        super().check()
        if self.task == "segment" and self.masks is None:
            raise InputError("--task segment needs --masks DIR", "pass the folder of PNG masks")
        if not 0 < self.val_fraction < 1:
            raise InputError("--val-fraction must be between 0 and 1", "e.g. 0.2")
        check_finite("epochs", self.epochs, low=1)
        check_finite("lr", self.lr, low=0, low_open=True)
        check_finite("weight_decay", self.weight_decay, low=0)
        check_finite("batch_size", self.batch_size, low=1)
        check_finite("max_images", self.max_images, low=1)
        check_finite("ignore_index", self.ignore_index, low=0, high=65535)  # masks hold 8- or 16-bit class ids
        check_finite("seed", self.seed, low=0, high=MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class HeadsQuery(ConfigBase):
    """`heads list`: the ready heads, and the trained heads in one folder."""

    dir: Path | None = None
    """Folder of trained heads (default ./heads)."""
