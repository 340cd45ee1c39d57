"""Tiny real models for the extraction tests beyond conftest's plain ViT: a tiny open_clip (random init,
saved as a checkpoint file), a ViT whose activations overflow float16, and the direct-forward reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from saevctl.data import open_image, resolve_images
from saevctl.errors import InputError
from saevctl.vit import Backbone

TINY_CLIP = "saevctl-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(dpath: Path, seed: int = 0) -> tuple[str, Path]:
    """Register a tiny open_clip architecture in this process and save a random-init checkpoint.

    Returns (arch, checkpoint file): 3 blocks of width 32, 8 px patches on 32 px images, a 1-block text tower.
    """
    import open_clip
    from safetensors.torch import save_file

    dpath.mkdir(parents=True, exist_ok=True)
    cfg_fpath = dpath / f"{TINY_CLIP}.json"
    cfg_fpath.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_fpath)
    torch.manual_seed(seed)
    clip = open_clip.create_model(TINY_CLIP)
    fpath = dpath / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(fpath))
    return TINY_CLIP, fpath


def make_overflowing_vit(dpath: Path) -> Path:
    """A tiny timm ViT whose residual stream holds 1e5 in one channel: beyond float16, fine for bfloat16."""
    import timm
    from timm.models._hub import save_for_hf

    from conftest import TINY_ARGS

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_ARGS)
    with torch.no_grad():
        model.pos_embed[..., 0] += 1e5  # every token carries it through every block's residual
    save_for_hf(model, str(dpath), safe_serialization=True, model_args=TINY_ARGS)
    return dpath


def direct_forward(bb: Backbone, images: str, layers: list[int], batch_size: int) -> dict[int, dict[str, torch.Tensor]]:
    """The reference for a store: open each image, preprocess, forward_to in the same batches, split by kind."""
    records = resolve_images(images).records
    chunks: dict[int, dict[str, list[torch.Tensor]]] = {layer: {} for layer in layers}
    for lo in range(0, len(records), batch_size):
        u8 = []
        for rec in records[lo : lo + batch_size]:
            try:
                u8.append(bb.preprocess.to_uint8(open_image(rec.path)))
            except InputError:
                continue
        if not u8:
            continue
        outs = bb.forward_to(bb.preprocess.normalize(torch.from_numpy(np.stack(u8))), layers)
        for layer, x_btd in outs.items():
            for kind, t in bb.layout.split(x_btd).items():
                chunks[layer].setdefault(kind, []).append(t)
    return {layer: {k: torch.cat(v) for k, v in kinds.items()} for layer, kinds in chunks.items()}
