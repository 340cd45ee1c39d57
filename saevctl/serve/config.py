"""The `saevctl serve` Config, torch-free so `saevctl --help` stays light: which SAE, index and head the explorer
serves (as every probe names them), where it listens, and the limits that keep one server safe to share.
"""

from __future__ import annotations

from dataclasses import dataclass

from saevctl.config import SaeTarget, StatsOpts, check_finite, opt
from saevctl.errors import InputError

LOOPBACK = ("127.0.0.1", "localhost")
"""Hosts that let only this machine connect."""


@dataclass(frozen=True, kw_only=True)
class Config(SaeTarget, StatsOpts):
    """`saevctl serve`: a local explorer of one mined SAE (default: the workspace's SAE and index)."""

    host: str = "127.0.0.1"
    """Address to listen on: 127.0.0.1 lets only this machine connect; 0.0.0.0 lets anyone on your network in."""
    port: int = 8000
    """TCP port to listen on."""
    max_upload_mb: float = 16.0
    """Largest image upload accepted, in MB; a larger one is refused with a message."""
    max_upload_pixels: int = 40_000_000
    """Largest upload in pixels (width x height), checked from the file's header before it is decoded."""
    n_features: int = 10
    """Features listed for a patch selection: the largest sums of their codes over the selected patches."""
    strip: int = 5
    """Exemplar images in each listed feature's strip."""
    control_images: int = 16
    """Images of the selected image's class that the controls button probes, next to a random feature of similar
    frequency and a random direction of the same norm."""
    queue: int = 8
    """Requests that may wait for the ViT at once (one runs at a time); more are answered 'busy, try again'."""
    cache_images: int = opt(16, hidden=True)
    """Images whose SAE codes (patches x latents, float32) are kept in memory."""

    def check(self) -> None:
        super().check()
        if not self.host.strip():
            raise InputError("--host is empty", "pass --host 127.0.0.1 (this machine only) or 0.0.0.0")
        check_finite("port", self.port, low=1, high=65535)
        check_finite("max_upload_mb", self.max_upload_mb, low=0, low_open=True, high=4096)
        check_finite("max_upload_pixels", self.max_upload_pixels, low=1)
        check_finite("n_features", self.n_features, low=1, high=200)
        check_finite("strip", self.strip, low=1, high=50)
        check_finite("control_images", self.control_images, low=2, high=10_000)
        check_finite("queue", self.queue, low=1)
        check_finite("cache_images", self.cache_images, low=1)
        if self.n_boot < 10:
            raise InputError(f"--n-boot {self.n_boot} is too few resamples for the controls' confidence intervals",
                             "pass --n-boot 10 or more (1000 is usual)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def local_only(self) -> bool:
        """True when only this machine can connect."""
        return self.host in LOOPBACK
