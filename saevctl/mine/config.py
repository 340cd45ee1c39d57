"""The Configs of `saevctl mine` and `saevctl features label`, their checks and workspace defaults.

Torch-free, so `saevctl --help` builds both commands' options without loading the mining code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saevctl import layout, workspace
from saevctl.config import Compute, DeviceOpts, IndexQuery, RerunOpts, check_finite, opt
from saevctl.errors import InputError
from saevctl.memory import check_memory, physical_memory

# Ranks are stored as SMALLINT (schema.py), which bounds --top-k and --top-n.
MAX_RANK = (1 << 15) - 1


@dataclass(frozen=True, kw_only=True)
class Config(RerunOpts, DeviceOpts):
    sae: Path | None = None
    """SAE checkpoint folder, config.json + sae.safetensors (default: the workspace's last SAE)."""
    store: Path | None = None
    """Activation store extracted from the same model, holding the SAE's layer (default: the workspace's last
    store)."""
    index: Path | None = None
    """DuckDB index to create, or to add this SAE to when it exists (default: the workspace's index, else
    ./index.duckdb)."""
    top_k: int = 25
    """Exemplar images kept per feature."""
    by: Literal["max", "mean"] = "max"
    """Rank an image for a feature by the max or the mean of the feature over the image's patches."""
    max_per_source: int | None = None
    """At most this many of a feature's exemplars from one source photo (the demo's crops of one photo share a
    source; every other image is its own), so a grid shows a concept across photos, not one photo's crops
    (default: no limit)."""
    top_n: int = 32
    """Features kept per image for image -> feature queries."""
    compute: Compute = "float32"
    """The encoder's precision: float32, or bfloat16 (inputs, weights and pre-activations rounded to bfloat16,
    products summed in float32: about 2x faster on a CPU with AMX or AVX-512 BF16 and on a GPU). With bfloat16 the
    first 1,024 tokens are encoded in float32 too, and the codes' relative error and the share of float32's firing
    codes kept are printed and recorded in the index; features label and eval's baselines encode as mine did."""
    name: str | None = None
    """Readable SAE name (default: the checkpoint folder's name); the SAE id appends the weights hash."""
    chunk_images: int | None = opt(None, hidden=True)
    """Images per encoded chunk (default: as many as keep about 16M codes in memory)."""
    set_defaults: bool = opt(True, hidden=True)
    """Record store, SAE and index as this workspace's defaults (./saevctl.toml)."""

    def check(self) -> None:
        super().check()
        check_finite("top_k", self.top_k, low=1, high=MAX_RANK)
        check_finite("top_n", self.top_n, low=1, high=MAX_RANK)
        check_finite("max_per_source", self.max_per_source, low=1)
        check_finite("chunk_images", self.chunk_images, low=1)

    def resolved(self) -> Config:
        """This Config with the SAE, store and index the workspace defaults stand for filled in."""
        if self.store is not None:
            store = self.store
        elif (default := workspace.get_default("store")) is not None:
            store = Path(default)
        else:
            raise InputError("no --store given and none recorded in this workspace", "pass --store")
        index = self.index or Path(workspace.get_default("index") or layout.default_index_fpath())
        return dataclasses.replace(self, sae=workspace.resolve_sae_ref(self.sae), store=store, index=index)

    def paths(self) -> tuple[Path, Path, Path]:
        """(sae, store, index) of a `resolved()` Config."""
        assert self.sae is not None and self.store is not None and self.index is not None, "resolve the Config first"
        return self.sae, self.store, self.index


def exemplar_bytes(top_k: int, n_latents: int, n_patches: int, kinds: tuple[str, ...]) -> int:
    """Roughly the memory the exemplar state of one mining pass takes (scan.py's StreamingTopK per token kind):
    per feature and slot a float32 value and an int64 id (plus the sort in `ranked()`), and for patch tokens
    the slot's float16 activation of every patch."""
    per_slot = sum(2 * n_patches + 16 if kind == "patches" else 16 for kind in kinds)
    return top_k * n_latents * per_slot


def check_exemplar_memory(top_k: int, n_latents: int, n_patches: int, kinds: tuple[str, ...],
                          available: int | None = None, where: str = "this machine") -> None:
    """Refuse, before any work, a --top-k whose exemplar buffers cannot fit in `available` bytes (default: RAM)."""
    available = available if available is not None else physical_memory()
    if available is None:
        return
    fits = max(1, available // 2 // max(1, exemplar_bytes(1, n_latents, n_patches, kinds)))
    check_memory(exemplar_bytes(top_k, n_latents, n_patches, kinds), f"--top-k {top_k}",
                 f"pass a lower --top-k (at most about {fits:,})", available=available, where=where,
                 of=f"exemplar buffers for {n_latents:,} features")


@dataclass(frozen=True, kw_only=True)
class LabelConfig(RerunOpts, IndexQuery, DeviceOpts):
    """`features label`: the SAE and index to label (defaults as for every features command), and the labels."""

    store: Path | None = None
    """Activation store with labels, of the SAE's model and layer (default: the store the SAE was mined on, as
    recorded in the index)."""
    level: Literal["patch", "image", "auto"] = "auto"
    """patch (extract --masks labels), image (ImageFolder labels, else 'the image contains class c' from masks),
    or auto: every level the store has labels for."""
    masks: str | None = None
    """The store's mask set to label from (extract --masks NAME=DIR; default: its first set). Another set's labels
    are written at levels patch:NAME and image:NAME, the default set's at patch and image."""
    negatives: Literal["foreground", "all"] = "foreground"
    """Patch level: what a class is ranked against: foreground (the other labelled patches; unlabelled ones, the
    mask's 'other' 0, are left out) or all (every other patch of the images with a mask, as AUROC is usually
    reported)."""
    thresholds: tuple[float, ...] = opt((0.0, 0.1, 0.2, 0.3, 0.5), default_text="0,0.1,0.2,0.3,0.5")
    """F1 thresholds as fractions of each feature's max activation (rounded to histogram bin edges)."""
    n_bins: int = opt(256, flag="--bins")
    """Histogram bins per feature over (0, max] for the streaming AUROC (values in one bin count as ties)."""
    batch_size: int | None = None
    """Images per chunk (default: as many as keep about 16M codes in memory)."""
    max_memory_mb: float = opt(1024, hidden=True)
    """Budget for the histograms; more features than fit are done in several passes over the store."""

    def check(self) -> None:
        super().check()
        if not self.thresholds or any(not 0.0 <= t < 1.0 for t in self.thresholds):
            raise InputError(f"bad thresholds {self.thresholds}", "give fractions of the max in [0, 1), e.g. 0,0.1,0.3")
        check_finite("bins", self.n_bins, low=2)
        check_finite("batch_size", self.batch_size, low=1)
        check_finite("max_memory_mb", self.max_memory_mb, low=0, low_open=True)
