"""Settings of `saevctl sae import`: which SAE made elsewhere to convert, and where to write the checkpoint.

Torch-free, so that `saevctl sae import --help` is built from it without loading the converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saevctl.config import ConfigBase, opt


@dataclass(frozen=True)
class ImportConfig(ConfigBase):
    """What `saevctl.sae.convert.import_sae(cfg.src, cfg.out, cfg.layer)` converts."""

    src: Path = opt(argument=True)
    """A saev sae.pt file (or its folder), or a SAELens/sparsify folder (cfg.json + safetensors)."""
    out: Path = opt(short="-o")
    """New checkpoint folder to write."""
    layer: int | None = None
    """The ViT block the SAE reads, recorded in the checkpoint (not stored by every source)."""
