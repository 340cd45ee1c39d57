"""Schedules and the update rule shared by both step implementations: Adam with per-SAE learning rates over
stacked weights, the unit-norm decoder constraint and its parallel-gradient removal."""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETAS = (0.9, 0.999)
EPS = 1e-8


def lr_factor(step: int, n_steps: int, warmup: int, decay: str) -> float:
    """Linear warmup to 1, then cosine/linear decay to 0 at n_steps (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or n_steps <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, n_steps - warmup))
    return 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t


def sparsity_factor(step: int, warmup: int) -> float:
    """The L1 coefficient ramps linearly from 0 over the first `warmup` steps (the paper's schedule)."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


@torch.no_grad()
def remove_parallel_grads(W_dec_msd: Tensor, grad_msd: Tensor) -> None:
    """Drop the part of each decoder row's gradient along the row: the unit-norm projection undoes it anyway.

    The row dots as one batched GEMV (einsum) and the subtraction in place: `(W * g).sum(-1)` and `g -= dot * W`
    would each write and read a (latents, d) temporary, and cost 5x as much (with Adam, this is a fixed per-step
    cost of 2 x latents x d weights, which weighs most at small batches)."""
    dot_ms1 = torch.einsum("msd,msd->ms", W_dec_msd, grad_msd)[..., None]
    grad_msd.addcmul_(dot_ms1, W_dec_msd, value=-1.0)


@torch.no_grad()
def normalize_rows(W_dec_msd: Tensor) -> None:
    W_dec_msd.div_(W_dec_msd.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def adam_update(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    moments: dict[str, Tensor],
    lrs: list[float],
    step: int,
) -> None:
    """In-place Adam (bias-corrected) on stacked tensors whose first axis is the SAE; `step` counts from 0.

    Moments are plain tensors named m.<param> / v.<param> so they save to safetensors with the weights.
    """
    b1, b2 = BETAS
    c1, c2 = bias_corrections(step)
    for name, p in params.items():
        g = grads[name].to(p.dtype)
        m, v = moments[f"m.{name}"], moments[f"v.{name}"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = v.div(c2).sqrt_().add_(EPS)
        for i, lr in enumerate(lrs):
            p[i].addcdiv_(m[i], denom[i], value=-lr / c1)


def bias_corrections(step: int) -> tuple[float, float]:
    """Adam's (1 - beta1^t, 1 - beta2^t) at `step` counted from 0 (t = step + 1)."""
    b1, b2 = BETAS
    t = step + 1
    return 1 - b1**t, 1 - b2**t


def init_moments(params: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        out[f"m.{name}"] = torch.zeros_like(p)
        out[f"v.{name}"] = torch.zeros_like(p)
    return out


@torch.no_grad()
def adam_update_fused(
    params: dict[str, Tensor], grads: dict[str, Tensor], moments: dict[str, Tensor], lrs: list[float], step: int
) -> None:
    """`adam_update` in one fused pass per tensor (torch's fused Adam kernel, one call per SAE for its lr)."""
    fused = getattr(torch, "_fused_adam_", None)
    if fused is None:
        adam_update(params, grads, moments, lrs, step)
        return
    names = list(params)
    for i, lr in enumerate(lrs):
        p = [params[n][i] for n in names]
        g = [grads[n][i].to(params[n].dtype).contiguous() for n in names]
        m = [moments[f"m.{n}"][i] for n in names]
        v = [moments[f"v.{n}"][i] for n in names]
        steps = [torch.tensor(float(step + 1), device=p[0].device) for _ in names]  # 1-based, as optim.Adam passes
        fused(p, g, m, v, [], steps, lr=lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=0.0, eps=EPS,
              amsgrad=False, maximize=False)
