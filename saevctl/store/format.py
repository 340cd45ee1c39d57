"""The store's on-disk format: dtypes, token layout, manifest fields and schema checks (spec: docs/disk-layout.md).

A manifest of another schema version is refused with a clear error, never read by guesswork.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl import layout
from saevctl.errors import StoreError

if TYPE_CHECKING:
    import torch

# numpy has no bfloat16: its bits are stored as uint16 and viewed as torch.bfloat16 on read.
NP_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}
FLOAT16_MAX = 65504.0
TOKEN_KINDS = ("patches", "cls", "registers")
STORE_FORMAT = "saevctl-activation-store"


@dataclass(frozen=True)
class TokenLayout:
    """Where each token kind sits along the token axis: [CLS] [registers...] [patches...]."""

    n_cls: int
    """1 when the model has a CLS token, else 0."""
    n_reg: int
    """Register tokens after the CLS token (DINOv2-reg), else 0."""
    grid_h: int
    """Patch-grid rows."""
    grid_w: int
    """Patch-grid columns."""

    @property
    def n_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def n_prefix(self) -> int:
        return self.n_cls + self.n_reg

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def kinds(self) -> list[str]:
        """Token kinds this model has, in storage order."""
        out = ["patches"]
        if self.n_cls:
            out.append("cls")
        if self.n_reg:
            out.append("registers")
        return out

    def split(self, x_btd: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split all tokens into kinds: patches (b, p, d), cls (b, d), registers (b, r, d)."""
        out = {"patches": x_btd[:, self.n_prefix :]}
        if self.n_cls:
            out["cls"] = x_btd[:, 0]
        if self.n_reg:
            out["registers"] = x_btd[:, self.n_cls : self.n_prefix]
        return out

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# torch is imported inside the two converters below, so that readers of stores (the report, the index) never load it.
def to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast to the store dtype and return the bytes-compatible numpy array."""
    import torch

    t = x.to({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]).contiguous().cpu()
    return t.view(torch.uint16).numpy() if dtype == "bfloat16" else t.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy array (any view) to a torch tensor of the store dtype (no copy when possible)."""
    import torch

    a = np.ascontiguousarray(a)
    if any(stride < 0 for stride in a.strides):  # a reversed single row counts as contiguous, torch refuses it
        a = a.copy()
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Stored bfloat16 bits (uint16) as float32: a bfloat16 is the top half of a float32, so this is exact."""
    # ascontiguousarray as in from_numpy, so a 0-d row comes back with shape (1,) as it did through torch.
    wide = np.ascontiguousarray(bits).astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def kind_shape(kind: str, n_patches: int, n_reg: int, d: int) -> tuple[int, ...]:
    """Per-image shape of one token kind."""
    return {"patches": (n_patches, d), "cls": (d,), "registers": (n_reg, d)}[kind]


def read_manifest(store_dpath: Path) -> dict[str, Any]:
    fpath = layout.store_manifest_fpath(store_dpath)
    if not fpath.is_file():
        raise StoreError(f"{store_dpath} is not an activation store (no manifest.json)", "run saevctl extract first")
    try:
        manifest = json.loads(fpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{fpath} is not valid JSON", "delete the store folder and run saevctl extract again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise StoreError(
            f"{store_dpath} holds a manifest.json that is not an activation store's",
            "pass the folder that saevctl extract wrote, or choose a new --out folder",
        )
    version = manifest.get("schema_version")
    if version != layout.STORE_SCHEMA:
        raise StoreError(
            f"{store_dpath} has store schema {version}, this saevctl reads schema {layout.STORE_SCHEMA}",
            "re-extract with this version of saevctl, or use the saevctl version that wrote it",
        )
    return manifest
