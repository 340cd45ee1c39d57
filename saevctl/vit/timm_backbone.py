"""Backbone adapter for timm VisionTransformer models (timm:, local-dir:, hf-hub: and the demo model)."""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from saevctl.data.preprocess import Preprocess, rgb
from saevctl.errors import ModelError
from saevctl.store.format import TokenLayout
from saevctl.vit.backbone import Backbone

log = logging.getLogger(__name__)


def preprocess_from_timm(model: nn.Module) -> Preprocess:
    """Build our serialisable spec from timm's resolved data config."""
    from timm.data.config import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    assert h == w, "non-square inputs are not supported"
    interp = cfg.get("interpolation", "bicubic")
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        log.warning("timm crop_mode %r is not supported; using a centre crop", crop_mode)
    return Preprocess(
        size=int(h),
        mean=rgb(cfg["mean"]),
        std=rgb(cfg["std"]),
        mode="squash" if crop_mode == "squash" else "center_crop",
        crop_pct=float(cfg.get("crop_pct", 1.0)),
        interpolation=interp if interp in ("bicubic", "bilinear", "nearest") else "bicubic",
    )


class TimmBackbone(Backbone):
    """Wraps timm's VisionTransformer (and subclasses with the same embed/blocks/norm/head structure)."""

    def __init__(self, model: nn.Module, spec: str, preprocess: Preprocess | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise ModelError(
                f"{spec} is a {type(model).__name__}, not a plain vision transformer",
                "use a ViT architecture (vit_*, deit_*, dinov2, siglip ViTs, eva is not supported yet)",
            )
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.arch = str(getattr(model, "default_cfg", {}).get("architecture", type(model).__name__))
        self.blocks = model.blocks
        self.d_model = int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])
        grid_h, grid_w = (int(g) for g in model.patch_embed.grid_size)
        n_cls = 1 if getattr(model, "cls_token", None) is not None else 0
        n_reg = int(model.num_prefix_tokens) - n_cls
        self.layout = TokenLayout(n_cls=n_cls, n_reg=n_reg, grid_h=grid_h, grid_w=grid_w)
        self.preprocess = preprocess or preprocess_from_timm(model)

    def embed(self, x_bchw: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(x_bchw)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        out: Tensor = m.norm_pre(x)
        return out

    def finalize(self, x_btd: Tensor) -> Tensor:
        out: Tensor = self.model.norm(x_btd)
        return out

    def head(self, tokens_btd: Tensor) -> Tensor:
        return self.model.forward_head(tokens_btd)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))

    def class_names(self) -> list[str] | None:
        """ImageNet-style label names when timm's pretrained config knows them."""
        cfg: dict[str, Any] = dict(getattr(self.model, "pretrained_cfg", {}) or {})
        label_names = cfg.get("label_names")
        if label_names:
            return list(label_names)
        if self.num_classes == 1000:
            try:
                from timm.data.imagenet_info import ImageNetInfo

                return [ImageNetInfo().index_to_description(i) for i in range(1000)]
            except Exception:  # label files are optional in timm builds
                return None
        return None
