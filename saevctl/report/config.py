"""The report Config: which index and SAEs, how many exemplars and pages, and how the pictures are drawn.

Torch- and numpy-free, so that `saevctl report --help` is built from it without loading the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saevctl import layout
from saevctl.config import IndexOpt, RerunOpts, check_finite, opt
from saevctl.errors import InputError

IMAGE_FORMATS = ("png", "jpeg")
"""Picture formats of the site (saevctl.report.pictures.FORMATS, which needs PIL; pipeline.py asserts they agree)."""


@dataclass(frozen=True)
class Config(RerunOpts, IndexOpt):
    out: Path = opt(short="-o", factory=layout.default_report_dpath, default_text="./report")
    """Folder of the site; an earlier report there is replaced as a whole."""
    saes: tuple[str, ...] = opt((), flag="--sae", repeat=True)
    """Only these SAEs (id, id prefix or checkpoint path); repeat the option or give a comma list for several
    (default: every SAE in the index)."""
    k: int | None = None
    """Exemplars per feature grid (default: all the index keeps, its --top-k)."""
    cols: int = 5
    """Tiles per grid row."""
    neighbours: int = 10
    """Nearest features by decoder cosine listed on each page."""
    workers: int | None = None
    """Drawing processes; 0 draws in this process (default: one per core up to 8, none for small reports)."""
    max_features: int | None = None
    """Pages only for N live features per SAE, chosen by --pick (default: every live feature)."""
    pick: Literal["interpretable", "freq"] = "interpretable"
    """How --max-features chooses: interpretable (neither dense nor near-dead nor on most images, ranked by peak
    over typical value on a small part of the image; the rule is on the index page) or freq (the most frequent)."""
    image_format: str = opt("png", flag="--format")
    """Picture format, png or jpeg: jpeg grids are about 5x smaller and drawn about 4x faster, for SAEs with tens of
    thousands of live features."""

    def check(self) -> None:
        super().check()
        if self.image_format not in IMAGE_FORMATS:  # not a Literal: the message names the setting, not the flag
            raise InputError(f"unknown image format {self.image_format!r}", "use png or jpeg")
        if self.k is not None and self.k < 1:
            raise InputError(f"--k {self.k} shows no exemplars", "pass a positive --k, or leave it out for all")
        check_finite("cols", self.cols, low=1)
        if self.neighbours < 0:
            raise InputError(f"--neighbours {self.neighbours} must not be negative", "pass 0 or more")
        check_finite("max_features", self.max_features, low=1)
        if self.workers is not None and self.workers < 0:
            raise InputError("--workers must be 0 or more", "pass 0 to draw in one process")
