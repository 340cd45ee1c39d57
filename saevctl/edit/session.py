"""What every probe needs loaded and cross-checked: the SAE, its ViT, the head, the mined index's stats.

`Prober` runs the model to the SAE's layer once and resumes from there for each edited variant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from saevctl import workspace
from saevctl.edit.clamps import Clamp, check_features
from saevctl.edit.heads import Head, head_tokens, resolve_head
from saevctl.errors import CheckpointError, IndexError_, ProbeError
from saevctl.memory import check_memory, device_memory
from saevctl.sae.compat import check_compatible
from saevctl.sae.model import SAE
from saevctl.vit import Backbone, load_backbone

log = logging.getLogger(__name__)


def load_sae_and_backbone(sae_path: Path, device: str) -> tuple[SAE, Backbone]:
    """The SAE and the ViT it reads, refusing a ViT whose weights differ from the ones the SAE was trained on."""
    sae = SAE.load(sae_path, device=device)
    spec = sae.cfg.model.get("spec")
    if not spec:
        raise CheckpointError(f"{sae_path} does not record the model it reads", "re-train it with saevctl train")
    bb = load_backbone(spec, device)
    check_compatible(sae.cfg, backbone=bb)
    return sae, bb


class FeatureStats:
    """Per-feature max activation and firing frequency from a mined index (both (s,) arrays)."""

    def __init__(self, max_s: np.ndarray, freq_s: np.ndarray, source: str) -> None:
        self.max_s, self.freq_s, self.source = max_s, freq_s, source


def open_index_stats(index: Path | str | None, sae_path: Path, n_latents: int) -> FeatureStats | None:
    """Max and frequency of every feature from the mined index (--index, else the workspace's if it has this SAE)."""
    explicit = index is not None
    ref = str(index) if explicit else workspace.get_default("index")
    if ref is None:
        return None
    fpath = Path(ref).expanduser()
    if not fpath.exists():
        if explicit:
            raise IndexError_(f"mined index {fpath} does not exist", "run saevctl mine first, or fix --index")
        return None
    from saevctl.mine.index import Index

    try:
        with Index.open(fpath, read_only=True) as idx:
            sae_id = idx.resolve_sae(str(sae_path))
            rows = idx.list_features(sae_id, sort="feature", limit=n_latents, descending=False)
    except IndexError_ as e:
        if explicit:
            raise
        log.info("not using the workspace index: %s", e.message)
        return None
    if len(rows) != n_latents:
        raise IndexError_(
            f"the index {fpath} has {len(rows)} features for this SAE, which has {n_latents}", "mine the SAE again"
        )
    max_s = np.array([float(r["max"] or 0.0) for r in rows])
    freq_s = np.array([float(r["freq"] or 0.0) for r in rows])
    return FeatureStats(max_s, freq_s, f"the mined index {fpath}")


def clamp_values(clamps: list[Clamp], features: list[int], stats: FeatureStats | None) -> list[float]:
    """Absolute values for each clamp; `Nx` needs the feature's max activation from the mined index."""
    out = []
    for clamp, f in zip(clamps, features, strict=True):
        if not clamp.multiple:
            out.append(clamp.value)
            continue
        if stats is None:
            raise IndexError_(
                f"--clamp {clamp.text} needs feature {f}'s max activation, but no mined index covers this SAE",
                "run saevctl mine for this SAE (or pass --index), or give an absolute value such as 3.5",
            )
        out.append(clamp.value * float(stats.max_s[f]))
    return out


class Prober:
    """The SAE, its ViT and a head, checked to fit together; runs prefixes and edited suffixes."""

    def __init__(self, sae: SAE, bb: Backbone, head: Head) -> None:
        self.sae, self.bb, self.head = sae.eval().requires_grad_(False), bb, head
        self.layer = bb.check_layer(sae.cfg.layer)
        if head.layer < self.layer:
            raise ProbeError(
                f"head {head.name} reads layer {head.layer}, before the SAE's layer {self.layer}, "
                "so the edit cannot reach it",
                "use a head on the final tokens or on a layer at or after the SAE's",
            )
        self.out_hw = (bb.preprocess.size, bb.preprocess.size)
        self.device = next(bb.parameters()).device

    @classmethod
    def load(cls, sae_path: Path | str | None, head: str | None, classes: str | None, device: str) -> Prober:
        """Load the SAE, its ViT and the head (default: saliency on the demo model, clip with classes, else timm)."""
        sae, bb = load_sae_and_backbone(workspace.resolve_sae_ref(sae_path), device)
        if head is None:
            head = "saliency" if bb.spec == "demo" else ("clip" if classes else "timm")
        return cls(sae, bb, resolve_head(head, bb, classes))

    def check_batch_memory(self, batch_size: int, n_images: int, n_variants: int, full_codes: bool) -> None:
        """Refuse a --batch-size whose passes over `n_images` cannot fit, before any image is read: `n_variants`
        copies of each image run from the SAE's layer on (at once on a GPU, see `variant_chunk`), plus, with
        `full_codes`, the SAE's codes of every token (a lower bound, as `Backbone.forward_bytes` is)."""
        b = min(batch_size, n_images)
        at_once = n_variants if self.device.type == "cuda" else 1
        codes = 4 * b * self.bb.layout.n_tokens * self.sae.cfg.n_latents if full_codes else 0
        available, where = device_memory(str(self.device))
        check_memory(self.bb.forward_bytes(b * at_once) + codes, f"--batch-size {batch_size}",
                     "pass a smaller --batch-size", available=available, where=where)

    def check_clamps(self, clamps: list[Clamp]) -> None:
        check_features([c.feature for c in clamps if c.feature is not None], self.sae.cfg.n_latents)

    def to_input(self, images: list[Image.Image]) -> tuple[np.ndarray, Float[Tensor, "b 3 h w"]]:
        u8 = np.stack([self.bb.preprocess.to_uint8(im) for im in images])
        return u8, self.bb.preprocess.normalize(torch.from_numpy(u8).to(self.device))

    @torch.no_grad()
    def prefix(self, x_bchw: Tensor) -> Float[Tensor, "b t d"]:
        return self.bb.forward_to(x_bchw, [self.layer])[self.layer]

    @torch.no_grad()
    def outputs(self, x_btd: Tensor, chunk: int | None = None, out_hw: tuple[int, int] | None = None) -> Tensor:
        """Head probabilities from the (edited) residual stream after the SAE's layer, `chunk` rows at a time;
        dense heads answer at `out_hw` (default: the model input's size)."""
        chunk = chunk or len(x_btd)
        hw = out_hw or self.out_hw
        return torch.cat([self.head(head_tokens(self.bb, self.layer, x_btd[i : i + chunk], self.head), hw)
                          for i in range(0, len(x_btd), chunk)])

    def variant_chunk(self, n: int) -> int | None:
        """Rows per pass when running several edited variants of an n-image batch: all at once on a GPU;
        on a CPU one variant at a time, which measured faster (cache-bound attention and decoder)."""
        return None if self.device.type == "cuda" else n

    @torch.no_grad()
    def plain(self, x_bchw: Tensor) -> Tensor:
        """The unedited model end to end (for checks; no split at the SAE's layer)."""
        h = self.head
        if h.final_norm:
            tokens = self.bb.forward_tokens(x_bchw)
        else:
            tokens = self.bb.run_blocks(self.bb.embed(x_bchw), 0, h.layer + 1)
        probs: Tensor = h(tokens, self.out_hw)
        return probs

    @torch.no_grad()
    def patch_codes(self, x_btd: Tensor) -> Float[Tensor, "b p s"]:
        """The SAE's codes of every patch token of the residual stream at the SAE's layer."""
        patches = x_btd[:, self.bb.layout.n_prefix :]
        codes: Tensor = self.sae.encode(patches.reshape(-1, patches.shape[-1]))
        return codes.reshape(patches.shape[0], patches.shape[1], -1)

    @torch.no_grad()
    def top_feature(self, x_btd: Tensor) -> int:
        """The feature with the largest summed activation over this image's patches."""
        patches = x_btd[:, self.bb.layout.n_prefix :]
        codes = self.sae.encode(patches.reshape(-1, patches.shape[-1]))
        return int(codes.sum(0).argmax())
