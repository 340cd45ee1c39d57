"""Bare operations the benchmarks time as ceilings: chunked encoder GEMMs, the GEMMs of an SAE training step, and
plain forwards of the same timm / open_clip model. No saevctl code runs inside a ceiling.

The backbone object is only used to reach the model that saevctl loaded (`bb.model`, `bb.visual`); the ceiling
then calls that model's own modules, as timm's `forward_features` (or open_clip's `forward`) does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # the GEMM ceilings (mine, label, train) need no model code
    from saevctl.edit.heads import Head
    from saevctl.vit import Backbone


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on `device` (CPU AMX/AVX512-BF16 or CUDA), or nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


# --- GEMMs ---------------------------------------------------------------------------------------------------


def encoder_gemm(rows: Sequence[int], d: int, s: int, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> Callable[[], None]:
    """`x @ W_enc` over chunks of `rows` rows each, written into one reused output (as mining writes its codes
    into a reused buffer): the GEMM every encoder path has to do, and nothing else (no bias, no nonlinearity)."""
    gen = torch.Generator().manual_seed(0)
    m = max(rows)
    x_nd = torch.randn(m, d, generator=gen).to(device, dtype)
    w_ds = (torch.randn(d, s, generator=gen) / d**0.5).to(device, dtype)
    out_ns = torch.empty(m, s, device=device, dtype=dtype)

    def run() -> None:
        with torch.inference_mode():
            for r in rows:
                torch.mm(x_nd[:r], w_ds, out=out_ns[:r])

    return run


def step_gemms(b: int, d: int, s: int, bf16: bool, device: str) -> Callable[[], None]:
    """The 5 GEMMs of a dense SAE training step, (b, d) @ (d, s) @ (s, d) forward and backward through autograd,
    on float32 weights; bf16 runs them under torch.autocast, as the training step does."""
    x = torch.randn(b, d, device=device)
    w1 = torch.randn(d, s, device=device, requires_grad=True)
    w2 = torch.randn(s, d, device=device, requires_grad=True)
    g = torch.randn(b, d, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)

    def step() -> None:
        w1.grad = w2.grad = None
        with autocast(device, bf16):
            y = x.mm(w1).mm(w2)
        y.backward(g)

    return step


def encoder_step_gemm(b: int, d: int, s: int, bf16: bool, device: str) -> Callable[[], None]:
    """The one dense GEMM of a TopK training step, `x @ W_enc` (b, d) x (d, s) on float32 weights, under
    torch.autocast for bf16 as the step runs it."""
    x = torch.randn(b, d, device=device)
    w = torch.randn(d, s, device=device)

    def step() -> None:
        with torch.no_grad(), autocast(device, bf16):
            x.mm(w)

    return step


def topk_min_work_factor(s: int, k: int) -> float:
    """The TopK step's minimum work over its encoder GEMM's: b*d*s multiply-adds for the GEMM, plus the sparse
    decoder's: b*k*d to decode and b*k*d for each of its two gradients (dL/dW_dec and dL/dcodes), all counted at
    the GEMM's measured rate (which the sparse parts cannot reach), so the ceiling stays one the step cannot beat.
    (The encoder's own sparse gradient, another b*k*d, is left out: the ceiling is the issue's, GEMM plus decoder.)"""
    return (s + 3 * k) / s


# --- ViT forwards --------------------------------------------------------------------------------------------


class BareViT:
    """The ViT that saevctl loaded, run through its own modules: embed, blocks, final norm, head."""

    def __init__(self, bb: nn.Module) -> None:
        model = getattr(bb, "model", None)
        visual = getattr(bb, "visual", None)
        self.batch_first = True
        if model is not None and hasattr(model, "patch_embed"):  # timm VisionTransformer
            m = model
            self.embed: Callable[[Tensor], Tensor] = lambda x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            self.blocks = list(m.blocks)
            self.norm: Callable[[Tensor], Tensor] = m.norm
            self.model_head: Callable[[Tensor], Tensor] = m.forward_head
        elif visual is not None:  # open_clip VisionTransformer
            v = visual
            self.embed = v._embeds
            self.blocks = list(v.transformer.resblocks)
            self.batch_first = bool(getattr(v.transformer, "batch_first", True))
            self.norm = (lambda x: x) if v.final_ln_after_pool else v.ln_post
            self.model_head = lambda t: v._global_pool(t)[0] @ v.proj if v.proj is not None else v._global_pool(t)[0]
        else:
            raise SystemExit(f"no bare forward for {type(bb).__name__}: the benchmarks know timm and open_clip ViTs")

    def _run(self, x_btd: Tensor, start: int, stop: int) -> Tensor:
        x = x_btd if self.batch_first else x_btd.transpose(0, 1)
        for blk in self.blocks[start:stop]:
            x = blk(x)
        return x if self.batch_first else x.transpose(0, 1)

    def to_layer(self, x_bchw: Tensor, layer: int) -> Tensor:
        """Embedding and blocks 0..layer (the forward stops at the deepest block it needs)."""
        return self._run(self.embed(x_bchw), 0, layer + 1)

    def rest(self, x_btd: Tensor, layer: int) -> Tensor:
        """Blocks layer+1.. and the final norm."""
        return self.norm(self._run(x_btd, layer + 1, len(self.blocks)))


def head_network(head: Head, bb: Backbone, vit: BareViT) -> Callable[[Tensor], Tensor]:
    """The network behind a probe head, called directly on final tokens: the demo model's saliency decoder, or the
    timm classifier (softmax included, as a probability is what a probe compares)."""
    from saevctl.edit.heads import SaliencyHead

    if isinstance(head, SaliencyHead):
        decoder, lay = head.decoder, bb.layout
        hw = (bb.preprocess.size, bb.preprocess.size)
        return lambda t: decoder(t[:, lay.n_prefix :], (lay.grid_h, lay.grid_w), hw)
    if head.name == "timm":
        return lambda t: vit.model_head(t).softmax(-1)
    raise SystemExit(f"no bare ceiling for head {head.name!r}: use --head saliency (demo) or --head timm")


def resumed_passes(vit: BareViT, head_fn: Callable[[Tensor], Tensor], batches: Sequence[Tensor], layer: int,
                   n_variants: int, mean_pass: bool, on_gpu: bool) -> Callable[[], None]:
    """What a probe (or a splice evaluation) cannot avoid on the bare model: per batch the model to `layer` once,
    then the rest of the model and the head for `n_variants` copies of that stream (one per variant on a CPU,
    all at once on a GPU, as the path batches them); `mean_pass` first runs every batch to `layer` once more."""

    def run() -> None:
        with torch.inference_mode():
            if mean_pass:
                for x in batches:
                    vit.to_layer(x, layer)
            for x in batches:
                h = vit.to_layer(x, layer)
                if on_gpu:
                    head_fn(vit.rest(h.repeat(n_variants, 1, 1), layer))
                else:
                    for _ in range(n_variants):
                        head_fn(vit.rest(h, layer))

    return run


def plain_forward(vit: BareViT, head_fn: Callable[[Tensor], Tensor], batches: Sequence[Tensor]) -> Callable[[], None]:
    """One whole forward of the model and the head per batch (for scale, not a ceiling)."""
    last = len(vit.blocks) - 1

    def run() -> None:
        with torch.inference_mode():
            for x in batches:
                head_fn(vit.rest(vit.to_layer(x, last), last))

    return run
