"""The evaluations' Configs, torch-free so `saevctl --help` stays light: each option is declared once, in the
shared mixins of `saevctl.config` or in the eval mixins here, and `eval all` reuses the fields of the others.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saevctl.config import (
    ConfigBase,
    DeviceOpts,
    RerunOpts,
    SaeRef,
    SaeTarget,
    StatsOpts,
    VerdictOpts,
    check_finite,
    opt,
)
from saevctl.edit.clamps import parse_clamp  # torch-free, so a Config can check --value when it is built
from saevctl.errors import InputError, ProbeError

MIN_AUROC = 0.8
MIN_BOOT = 10
"""Fewest bootstrap resamples that still give a 95% interval worth printing."""


def _positive(name: str, value: int | None) -> None:
    check_finite(name, value, low=1)


def _image_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"--{name.replace('_', '-')} {value} keeps no images",
                         "pass a positive number, or leave it out")


def _require(value: object, flag: str, hint: str) -> None:
    """A field optional for `eval all` (which skips what it lacks) but needed by one evaluation."""
    if value is None:
        raise InputError(f"missing {flag}", f"pass {hint}")


# --- options several evaluations share ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImageEval(StatsOpts, SaeTarget):
    """Images run through the ViT with the SAE spliced in front of a task head (splice, edits, all)."""

    images: str | None = opt(None, short="-i")
    """Image folder (ImageFolder labels give classify accuracy), .txt list of paths, or demo[:N]; edits use only
    images with a mask, and eval all skips the splice and the edits without images."""
    masks: str | None = None
    """Mask folder with its class file (classes.txt or objectInfo150.csv; see saevctl extract --masks), masks named
    like the images, or the NAME of a mask set of the SAE's store: a segment head's splice scores mIoU on them (else
    agreement with the original model), and the edits need them."""
    batch_size: int = opt(16, short="-b")
    """Images per forward pass (the splice runs 3 variants of each from the SAE's layer on)."""
    max_images: int | None = None
    """Use only the first N images."""
    n_workers: int = opt(2, hidden=True)
    """Threads decoding images ahead of the forward pass."""

    def check(self) -> None:
        super().check()
        _positive("batch_size", self.batch_size)
        _positive("n_workers", self.n_workers)
        _image_limit("max_images", self.max_images)
        if self.n_boot < MIN_BOOT:
            raise InputError(f"--n-boot {self.n_boot} is too few resamples for a confidence interval",
                             f"pass --n-boot {MIN_BOOT} or more (1000 is usual)")


@dataclass(frozen=True, kw_only=True)
class StoreOpt(ConfigBase):
    store: Path | None = None
    """Activation store of the SAE's model and layer: reconstruction and the vision metrics run on it and the splice's
    ablation mean comes from it (default: the store the SAE was trained on; eval splice alone makes a first pass
    over the images)."""


@dataclass(frozen=True, kw_only=True)
class SummaryOut(ConfigBase):
    out: Path | None = opt(None, short="-o")
    """JSON summary path (default: <evaluation>.json, e.g. splice.json, in the SAE's eval folder, beside the index
    when it holds the SAE, else ./eval/<name>)."""


@dataclass(frozen=True, kw_only=True)
class EditOpts(VerdictOpts):
    min_auroc: float = MIN_AUROC
    """A class is covered, and its edit tested, when its best patch-level feature reaches this AUROC."""
    value: str = "-2x"
    """What each class's feature is set to on the class's patches: Nx (N times its max activation) or a number."""

    def check(self) -> None:
        super().check()
        check_finite("min_auroc", self.min_auroc, low=0, high=1)
        try:
            parse_clamp(f"0={self.value}")  # a bad --value fails before any work
        except ProbeError as e:
            raise InputError(f"bad --value {self.value!r}",
                             "write Nx (times the feature's max, e.g. -2x) or a number") from e


@dataclass(frozen=True, kw_only=True)
class VisionPass(ConfigBase):
    """The pass over the store behind the vision metrics (spatial coherence, sparse probing, absorption)."""

    vision_max_images: int | None = None
    """Spatial coherence, sparse probing and absorption: read only the first N stored images (default: all)."""

    def check(self) -> None:
        super().check()
        _image_limit("vision_max_images", self.vision_max_images)


@dataclass(frozen=True, kw_only=True)
class LabelOpts(ConfigBase):
    labels: str = "auto"
    """Image labels of sparse probing and absorption: image (the store's ImageFolder labels), mask (an image has a
    class of the store's default mask set when any of its patches has it), mask:NAME (the same with another mask
    set), or auto (image labels when the store has them, else the default mask set)."""
    min_positives: int = 10
    """A class is probed and tested for absorption only when at least this many images have it and as many lack it."""

    def check(self) -> None:
        super().check()
        _positive("min_positives", self.min_positives)
        if self.labels not in ("auto", "image", "mask") and not (self.labels.startswith("mask:") and self.labels[5:]):
            raise InputError(f"unknown --labels {self.labels!r}", "use auto, image, mask or mask:NAME (a mask set)")


@dataclass(frozen=True, kw_only=True)
class ProbeOpts(LabelOpts):
    probe_k: tuple[int, ...] = (1, 2, 5, 20)
    """Sparse probing: how many features (SAE latents, or raw dimensions for the comparison) each probe may use."""

    def check(self) -> None:
        super().check()
        if not self.probe_k:
            raise InputError("--probe-k lists no sizes", "pass sizes such as --probe-k 1,2,5,20")
        for k in self.probe_k:
            _positive("probe_k", k)


@dataclass(frozen=True, kw_only=True)
class AbsorbOpts(LabelOpts):
    absorb_cos: float = 0.3
    """Absorption: another feature can absorb a class's best feature when their decoder directions' cosine exceeds
    this (0.3 is 6 standard deviations of two random directions' cosine at d = 384)."""

    def check(self) -> None:
        super().check()
        check_finite("absorb_cos", self.absorb_cos, low=-1, high=1)


# --- one Config per command ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SpliceConfig(RerunOpts, SummaryOut, StoreOpt, ImageEval):
    """`eval splice`: the head's metrics with the SAE's reconstruction spliced in, next to a mean ablation."""

    def check(self) -> None:
        super().check()
        _require(self.images, "--images", "--images DIR")


@dataclass(frozen=True, kw_only=True)
class EditsConfig(RerunOpts, SummaryOut, EditOpts, ImageEval):
    """`eval edits`: suppress each labelled class's feature on its patches (needs a segment head and masks)."""

    features: tuple[str, ...] = opt((), flag="--feature", short="-f", repeat=True)
    """CLASS=FEATURE pairs (class name or mask id), repeatable or comma-separated: test these pairs instead of the
    index's labels."""
    controls: bool = opt(True, flag="--controls/--no-controls")
    """Run the two controls: a random feature of similar frequency and a random direction of the edit's norm."""
    level: Literal["patch", "image"] = "patch"
    """What the edit is measured on: patch (a segment head's class of each patch; target = the patches predicted as
    the class) or image (a classify head's prediction of the whole image, e.g. --head timm, the ViT's own
    classifier: prediction flips, and flips against ImageFolder labels)."""
    freq_images: int = opt(128, hidden=True)
    """Without a mined index, feature max and frequency are measured on this many images first."""

    def check(self) -> None:
        super().check()
        _require(self.images, "--images", "--images DIR")
        _require(self.masks, "--masks", "--masks DIR")
        _positive("freq_images", self.freq_images)


@dataclass(frozen=True, kw_only=True)
class ReconConfig(RerunOpts, SummaryOut, StoreOpt, SaeRef, DeviceOpts):
    """`eval recon`: reconstruction over a store, streamed."""

    batch_tokens: int = 4096
    """Tokens encoded at once (memory: batch_tokens x n_latents floats)."""
    max_images: int | None = None
    """Use only the first N stored images."""

    def check(self) -> None:
        super().check()
        _positive("batch_tokens", self.batch_tokens)
        _image_limit("max_images", self.max_images)


BaselineKind = Literal["untrained", "random-decoder", "pca", "kmeans"]
BASELINE_KINDS: tuple[str, ...] = typing.get_args(BaselineKind)


@dataclass(frozen=True, kw_only=True)
class BaselineOpts(ConfigBase):
    """How the null baselines are built (each a TopK SAE of the SAE's width, k = the SAE's mean L0)."""

    baseline_kinds: tuple[BaselineKind, ...] = opt(typing.get_args(BaselineKind))
    """Null baselines, a comma list: untrained (random tied SAE), random-decoder (frozen random decoder, trained
    encoder), pca and kmeans (dictionaries of principal directions or spherical k-means centroids)."""
    baseline_sample: int = 65536
    """Tokens sampled from the store for the SAE's mean L0 (the baselines' k) and the PCA and k-means
    dictionaries."""
    baseline_train_tokens: int | None = None
    """Tokens the random-decoder baseline trains on (default: as many as the SAE was trained on, else one pass over
    the store)."""
    kmeans_iters: int = opt(10, hidden=True)
    """Spherical k-means iterations."""
    rebuild_baselines: bool = False
    """Build the baselines afresh even when those cached beside the SAE match it, the store and these settings."""

    def check(self) -> None:
        super().check()
        if not self.baseline_kinds:
            raise InputError("--baseline-kinds names no baseline", f"give one or more of {', '.join(BASELINE_KINDS)}")
        _positive("baseline_sample", self.baseline_sample)
        _positive("baseline_train_tokens", self.baseline_train_tokens)
        _positive("kmeans_iters", self.kmeans_iters)


@dataclass(frozen=True, kw_only=True)
class SuiteOpts(AbsorbOpts, ProbeOpts, VisionPass, EditOpts, StoreOpt, ImageEval):
    """What eval all and eval baselines evaluate, on the SAE and on each baseline alike."""

    recon_max_images: int | None = None
    """Reconstruction: use only the first N stored images."""
    vision: bool = opt(False, flag="--vision/--no-vision")
    """Also score spatial coherence, sparse probing and absorption on the store (one more pass over it; see eval
    spatial, eval sparse-probe and eval absorption)."""

    def check(self) -> None:
        super().check()
        _image_limit("recon_max_images", self.recon_max_images)


@dataclass(frozen=True, kw_only=True)
class AllConfig(RerunOpts, BaselineOpts, SuiteOpts):
    """`eval all`: every evaluation the inputs allow, then the report card."""

    out: Path | None = opt(None, short="-o")
    """Folder of the card and the summaries (default: beside the index when it holds the SAE, else ./eval/<name>)."""
    baselines: bool = opt(False, flag="--baselines/--no-baselines")
    """Also build (or reuse) the null baselines, score each on every part that ran, and show the SAE's margin over
    the best of them on the card (see eval baselines)."""


@dataclass(frozen=True, kw_only=True)
class BaselinesConfig(BaselineOpts, SuiteOpts):
    """`eval baselines`: the SAE against null baselines of its width and L0, on every evaluation the inputs allow."""

    out: Path | None = opt(None, short="-o")
    """Folder of baselines.json and the summaries, the SAE's and each baseline's (default: as for eval all)."""


@dataclass(frozen=True, kw_only=True)
class CardQuery(SaeRef):
    """`eval card`: where the card of one SAE was written."""

    out: Path | None = opt(None, short="-o")
    """The folder eval all wrote to, when it was given --out (default: beside the index, else ./eval/<name>)."""


@dataclass(frozen=True, kw_only=True)
class StabilityConfig(ConfigBase):
    """`eval stability`: how many features two or more SAEs share (seeds, widths), by one-to-one direction matching."""

    saes: tuple[Path, ...] = opt((), argument=True, repeat=True)
    """SAE checkpoint folders to compare, two or more of the same model and width d: every pair is matched."""
    out: Path = opt(Path("eval/stability"), short="-o")
    """Folder of stability.json (the summary) and stability.png (the matched-cosine distributions)."""
    index: Path | None = None
    """A mined index holding these SAEs (mined from one store): adds the overlap of matched features' top exemplar
    images, next to random pairs'. Without it, directions only."""

    def check(self) -> None:
        super().check()
        if len(self.saes) < 2:
            raise InputError(f"eval stability needs two or more SAEs, got {len(self.saes)}",
                             "pass their checkpoint folders: saevctl eval stability SAE_A SAE_B")


@dataclass(frozen=True, kw_only=True)
class VisionBase(SummaryOut, VisionPass, StoreOpt, SaeRef, DeviceOpts):
    """What the three vision metrics share: the SAE, its store, the pass over it and the summary's path."""


@dataclass(frozen=True, kw_only=True)
class SpatialConfig(VisionBase):
    """`eval spatial`: Moran's I of each feature's activation map on the patch grid."""


@dataclass(frozen=True, kw_only=True)
class SparseProbeConfig(ProbeOpts, StatsOpts, VisionBase):
    """`eval sparse-probe`: k-sparse logistic probes for image labels on the SAE's codes and on the raw activations."""


@dataclass(frozen=True, kw_only=True)
class AbsorptionConfig(AbsorbOpts, StatsOpts, VisionBase):
    """`eval absorption`: how often a class's best feature is silent while a feature with a close decoder fires."""
