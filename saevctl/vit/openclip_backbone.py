"""Backbone adapter for open_clip's VisionTransformer (the image tower of a CLIP model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from saevctl.data.preprocess import Preprocess, rgb
from saevctl.errors import ModelError
from saevctl.store.format import TokenLayout
from saevctl.vit.backbone import Backbone

if TYPE_CHECKING:
    from open_clip import CLIP


class _BatchFirst(nn.Module):
    """Presents a sequence-first residual block as batch-first."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x_btd: Tensor) -> Tensor:
        out_tbd: Tensor = self.block(x_btd.transpose(0, 1))
        return out_tbd.transpose(0, 1)


class OpenClipBackbone(Backbone):
    """Wraps `model.visual` of an open_clip CLIP model; `head` returns the image embedding."""

    clip: CLIP

    def __init__(self, clip: nn.Module, spec: str) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        visual = clip.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ModelError(
                f"{spec} has a {type(visual).__name__} image tower that saevctl cannot split into blocks",
                "use an open_clip ViT model without attentional pooling (ViT-B-16, ViT-L-14, ...)",
            )
        self.clip = clip.eval().requires_grad_(False)
        self.visual = visual
        self.spec = spec
        self.arch = spec.split("/", 1)[0].removeprefix("open_clip:")
        tr = visual.transformer
        blocks = list(tr.resblocks)
        self.blocks = nn.ModuleList(blocks if getattr(tr, "batch_first", True) else [_BatchFirst(b) for b in blocks])
        self.d_model = int(tr.width)
        self.patch_size = int(visual.patch_size[0])
        grid_h, grid_w = (int(g) for g in visual.grid_size)
        self.layout = TokenLayout(n_cls=1, n_reg=0, grid_h=grid_h, grid_w=grid_w)
        size = int(visual.image_size[0])
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        mean = rgb(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        std = rgb(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        interp = cfg.get("interpolation", "bicubic")
        self.preprocess = Preprocess(
            size=size,
            mean=mean,
            std=std,
            mode="squash" if cfg.get("resize_mode") == "squash" else "center_crop",
            interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic",
        )

    def embed(self, x_bchw: Tensor) -> Tensor:
        out: Tensor = self.visual._embeds(x_bchw)
        return out

    def finalize(self, x_btd: Tensor) -> Tensor:
        # With final_ln_after_pool the LayerNorm applies to the pooled vector, so tokens stay raw.
        if self.visual.final_ln_after_pool:
            return x_btd
        out: Tensor = self.visual.ln_post(x_btd)
        return out

    def head(self, tokens_btd: Tensor) -> Tensor:
        v = self.visual
        pooled: Tensor
        pooled, _ = v._global_pool(tokens_btd)
        if v.final_ln_after_pool:
            pooled = v.ln_post(pooled)
        return pooled @ v.proj if v.proj is not None else pooled

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """Normalised text embeddings for zero-shot heads."""
        import open_clip

        tokenizer = open_clip.get_tokenizer(self.arch)
        dev = next(self.clip.parameters()).device
        emb: Tensor = self.clip.encode_text(tokenizer(prompts).to(dev))
        norm: Tensor = emb.norm(dim=-1, keepdim=True)  # Tensor.norm is not annotated
        return emb / norm
