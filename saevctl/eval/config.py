"""The evaluations' Configs, torch-free so `saevctl --help` stays light: each option is declared once, in the
shared mixins of `saevctl.config` or in the eval mixins here, and `eval all` reuses the fields of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saevctl.config import ConfigBase, DeviceOpts, SaeRef, SaeTarget, StatsOpts, check_finite, opt
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
    masks: Path | None = None
    """Mask folder with its class file (classes.txt or objectInfo150.csv; see saevctl extract --masks), masks named
    like the images: a segment head's splice scores mIoU on them (else agreement with the original model), and the
    edits need them."""
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
    """Activation store of the SAE's model and layer: reconstruction runs on it and the splice's ablation mean comes
    from it (default: the store the SAE was trained on; eval splice alone makes a first pass over the images)."""


@dataclass(frozen=True, kw_only=True)
class SummaryOut(ConfigBase):
    out: Path | None = opt(None, short="-o")
    """JSON summary path (default: splice.json, edits.json or recon.json in the SAE's eval folder, beside the
    index when it holds the SAE, else ./eval/<name>)."""


@dataclass(frozen=True, kw_only=True)
class EditOpts(ConfigBase):
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


# --- one Config per command ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SpliceConfig(SummaryOut, StoreOpt, ImageEval):
    """`eval splice`: the head's metrics with the SAE's reconstruction spliced in, next to a mean ablation."""

    def check(self) -> None:
        super().check()
        _require(self.images, "--images", "--images DIR")


@dataclass(frozen=True, kw_only=True)
class EditsConfig(SummaryOut, EditOpts, ImageEval):
    """`eval edits`: suppress each labelled class's feature on its patches (needs a segment head and masks)."""

    features: tuple[str, ...] = opt((), flag="--feature", short="-f", repeat=True)
    """CLASS=FEATURE pairs (class name or mask id), repeatable or comma-separated: test these pairs instead of the
    index's labels."""
    controls: bool = opt(True, flag="--controls/--no-controls")
    """Run the two controls: a random feature of similar frequency and a random direction of the edit's norm."""
    freq_images: int = opt(128, hidden=True)
    """Without a mined index, feature max and frequency are measured on this many images first."""

    def check(self) -> None:
        super().check()
        _require(self.images, "--images", "--images DIR")
        _require(self.masks, "--masks", "--masks DIR")
        _positive("freq_images", self.freq_images)


@dataclass(frozen=True, kw_only=True)
class ReconConfig(SummaryOut, StoreOpt, SaeRef, DeviceOpts):
    """`eval recon`: reconstruction over a store, streamed."""

    batch_tokens: int = 4096
    """Tokens encoded at once (memory: batch_tokens x n_latents floats)."""
    max_images: int | None = None
    """Use only the first N stored images."""

    def check(self) -> None:
        super().check()
        _positive("batch_tokens", self.batch_tokens)
        _image_limit("max_images", self.max_images)


@dataclass(frozen=True, kw_only=True)
class AllConfig(EditOpts, StoreOpt, ImageEval):
    """`eval all`: every evaluation the inputs allow, then the report card."""

    out: Path | None = opt(None, short="-o")
    """Folder of the card and the summaries (default: beside the index when it holds the SAE, else ./eval/<name>)."""
    recon_max_images: int | None = None
    """Reconstruction: use only the first N stored images."""

    def check(self) -> None:
        super().check()
        _image_limit("recon_max_images", self.recon_max_images)


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

    def check(self) -> None:
        super().check()
        if len(self.saes) < 2:
            raise InputError(f"eval stability needs two or more SAEs, got {len(self.saes)}",
                             "pass their checkpoint folders: saevctl eval stability SAE_A SAE_B")
