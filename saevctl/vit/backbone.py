"""One interface over every ViT: preprocessing, token layout, run to block L, and resume from block L+1.

Extraction records `forward_to`; the probe edits the residual stream and calls `forward_from`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saevctl.data.preprocess import Preprocess
from saevctl.layers import resolve_layer
from saevctl.store.format import TokenLayout


class Backbone(nn.Module):
    """A frozen ViT split into embed -> blocks -> final norm -> model head.

    Subclasses set the attributes below and implement `embed`, `finalize` and `head`.
    Layer L means "the residual stream at the output of block L" (0-based).
    """

    spec: str
    arch: str
    layout: TokenLayout
    preprocess: Preprocess
    d_model: int
    patch_size: int
    blocks: nn.ModuleList | nn.Sequential  # timm keeps its blocks in a Sequential, open_clip in a ModuleList

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def embed(self, x_bchw: Float[Tensor, "b 3 h w"]) -> Float[Tensor, "b t d"]:
        """Image to tokens entering block 0."""
        raise NotImplementedError

    def finalize(self, x_btd: Float[Tensor, "b t d"]) -> Float[Tensor, "b t d"]:
        """Final per-token normalisation after the last block (what dense heads read)."""
        raise NotImplementedError

    def head(self, tokens_btd: Float[Tensor, "b t d"]) -> Tensor:
        """The model's own output from finalized tokens: class logits, or an embedding."""
        raise NotImplementedError

    def check_layer(self, layer: int | None) -> int:
        """The block number `layer` names in this model (negative counts from the end; None: the last block)."""
        return resolve_layer(layer, self.n_blocks, what=self.spec)

    def forward_bytes(self, n_images: int, n_kept: int = 1) -> int:
        """A lower bound on the memory of one forward pass over `n_images`: the float input, the residual stream
        and a working copy, and `n_kept` recorded block outputs (attention and MLP activations come on top). Used
        to refuse a --batch-size that cannot fit before any work."""
        s, t, d = self.preprocess.size, self.layout.n_tokens, self.d_model
        return 4 * n_images * (3 * s * s + t * d * (n_kept + 2))

    def run_blocks(self, x_btd: Tensor, start: int, stop: int) -> Tensor:
        """Run blocks start..stop-1."""
        for blk in self.blocks[start:stop]:
            x_btd = blk(x_btd)
        return x_btd

    @torch.inference_mode()
    def forward_to(self, x_bchw: Float[Tensor, "b 3 h w"], layers: list[int]) -> dict[int, Float[Tensor, "b t d"]]:
        """Residual stream at the output of each requested block; runs no block past the deepest one."""
        wanted = sorted({self.check_layer(layer) for layer in layers})
        out: dict[int, Tensor] = {}
        x = self.embed(x_bchw)
        done = 0
        for layer in wanted:
            x = self.run_blocks(x, done, layer + 1)
            done = layer + 1
            out[layer] = x
        return out

    def forward_from(self, layer: int, x_btd: Float[Tensor, "b t d"]) -> Float[Tensor, "b t d"]:
        """Given the (possibly edited) output of block `layer`, run the rest; returns finalized tokens."""
        layer = self.check_layer(layer)
        return self.finalize(self.run_blocks(x_btd, layer + 1, self.n_blocks))

    def forward_tokens(self, x_bchw: Float[Tensor, "b 3 h w"]) -> Float[Tensor, "b t d"]:
        """The whole model up to the finalized tokens."""
        return self.finalize(self.run_blocks(self.embed(x_bchw), 0, self.n_blocks))

    def forward(self, x_bchw: Tensor) -> Tensor:
        return self.head(self.forward_tokens(x_bchw))

    def describe(self) -> dict[str, Any]:
        """What a store manifest or a head records about the model."""
        return {
            "spec": self.spec,
            "arch": self.arch,
            "weights_sha256": self.weights_sha256,
            "n_blocks": self.n_blocks,
            "d_model": self.d_model,
            "patch_size": self.patch_size,
            "layout": self.layout.to_dict(),
            "preprocess": self.preprocess.to_dict(),
        }

    @property
    def weights_sha256(self) -> str:
        """Hash of every parameter and buffer (name, dtype, shape, bytes); identifies the weights."""
        cached = getattr(self, "_weights_sha256", None)
        if cached is None:
            h = hashlib.sha256()
            # named_parameters/named_buffers list a tensor shared by two module paths once (the adapters
            # register the model and its blocks), so large models are not hashed two or three times.
            tensors = dict(self.named_parameters()) | dict(self.named_buffers())
            for name, t in sorted(tensors.items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            cached = h.hexdigest()
            object.__setattr__(self, "_weights_sha256", cached)
        return cached
