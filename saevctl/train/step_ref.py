"""The plain reference training step: one SAE at a time, dense codes, autograd for every gradient.

It defines the maths; `step_fast` must match it (tests/test_train_parity.py). Slow on purpose: no fusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saevctl.sae.topk import flat_topk

if TYPE_CHECKING:
    from saevctl.train.distributed import Comm


@dataclass(frozen=True)
class Hyper:
    """What the step needs to know about a group of same-shape SAEs."""

    activation: str
    """relu, topk or batchtopk."""
    k: int
    """Active latents per token (topk/batchtopk)."""
    prefixes: tuple[int, ...]
    """Matryoshka prefix sizes ending at the width; (width,) when off."""
    aux_coef: float
    """AuxK weight."""
    k_aux: int
    """Dead latents used by AuxK per token."""
    enc_rows: bool = False
    """W_enc is stored (m, s, d) (one row per latent: what the sparse TopK gradients produce) instead of
    (m, d, s) (what the dense ReLU gradients produce); `SAE.W_enc` is always (d, s)."""
    count_rows: int = 512
    """ReLU firing statistics (L0, dead, dense) are counted on this many rows of each batch in the fast step: the
    compare-and-count pass over the whole (batch, latents) block would cost more than all the other elementwise
    work together. (TopK counts every row: its codes are already sparse.)"""


@dataclass
class StepOut:
    grads: dict[str, Tensor]
    """Gradients named like the parameters, stacked over SAEs."""
    loss_m: Tensor
    mse_m: Tensor
    """Mean squared error per element in normalised space, full width."""
    fvu_m: Tensor
    """Fraction of variance unexplained (normalised MSE)."""
    l1_m: Tensor
    """Mean L1 norm of the codes per token."""
    aux_m: Tensor
    """AuxK loss (0 when no latent is dead or for relu)."""
    fired_ms: Tensor
    """Tokens of this batch on which each latent fired."""
    min_act_m: Tensor
    """Smallest selected activation (batchtopk threshold estimate), else 0."""
    n_counted: int
    """Rows of the batch that `fired_ms` counts (the fast ReLU step counts a fixed sample of them)."""


def batch_topk(pre_flat: Tensor, n_local: int, comm: Comm | None = None) -> tuple[Tensor, Tensor]:
    """(values, flat indices) of the batch's n_local largest pre-activations. Data parallel: of this rank's
    entries among the global batch's world * n_local largest, so selection matches one process (up to ties)."""
    if comm is None:
        return flat_topk(pre_flat, n_local)
    n = n_local * comm.world
    vals, idx = flat_topk(pre_flat, min(n, pre_flat.numel()))
    keep = vals >= comm.kth_largest(vals, n)
    return vals[keep], idx[keep]


def centered_sq_sum(resid_bd: Tensor, comm: Comm | None = None) -> Tensor:
    """sum_b ||r_b - mean(r)||^2 over the (global) batch: the AuxK normaliser."""
    if comm is None:
        return (resid_bd - resid_bd.mean(0)).pow(2).sum()
    mean_d = comm.sum_(resid_bd.sum(0)) / (len(resid_bd) * comm.world)
    return comm.sum_((resid_bd - mean_d).pow(2).sum())


def train_codes(pre_bs: Tensor, activation: str, k: int, comm: Comm | None = None) -> Tensor:
    """The training-time nonlinearity, dense."""
    if activation == "relu":
        return torch.relu(pre_bs)
    if activation == "topk":
        vals, idx = pre_bs.topk(k, dim=-1)
        return torch.zeros_like(pre_bs).scatter(-1, idx, torch.relu(vals))
    b, s = pre_bs.shape
    vals, idx = batch_topk(pre_bs.flatten(), b * k, comm)
    return torch.zeros_like(pre_bs).flatten().scatter(0, idx, torch.relu(vals)).view(b, s)


def recon_loss(f_bs: Tensor, W_dec_sd: Tensor, b_dec_d: Tensor, x_bd: Tensor, prefixes: tuple[int, ...]) -> Tensor:
    """Mean over the nested prefixes of the per-element MSE of the prefix's reconstruction."""
    total = f_bs.new_zeros(())
    for n in prefixes:
        x_hat = f_bs[:, :n] @ W_dec_sd[:n] + b_dec_d
        total = total + (x_hat - x_bd).pow(2).mean()
    return total / len(prefixes)


def aux_loss(pre_bs: Tensor, dead_s: Tensor, resid_bd: Tensor, W_dec_sd: Tensor, k_aux: int,
             comm: Comm | None = None) -> Tensor:
    """AuxK: reconstruct the residual from the top dead latents, normalised by the residual's variance.
    Data parallel: normalised by the global batch's variance and scaled by the world size, so that the mean
    over ranks (what gradient averaging takes) is the global loss."""
    n_dead = int(dead_s.sum())
    if n_dead == 0:
        return pre_bs.new_zeros(())
    masked = torch.where(dead_s, pre_bs, torch.full_like(pre_bs, float("-inf")))
    vals, idx = masked.topk(min(k_aux, n_dead), dim=-1)
    codes = torch.zeros_like(pre_bs).scatter(-1, idx, torch.relu(vals))
    e_hat = codes @ W_dec_sd
    denom = centered_sq_sum(resid_bd, comm).clamp_min(1e-12)
    return (e_hat - resid_bd).pow(2).sum() / denom * (comm.world if comm else 1)


def step(params: dict[str, Tensor], x_bd: Tensor, coef_m: Tensor, dead_ms: Tensor | None, hp: Hyper,
         comm: Comm | None = None) -> StepOut:
    m = params["W_enc"].shape[0]
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    outs: dict[str, list[Tensor]] = {n: [] for n in ("loss", "mse", "fvu", "l1", "aux", "fired", "min_act")}
    var = (x_bd - x_bd.mean(0)).pow(2).sum()
    for i in range(m):
        W_enc = params["W_enc"][i].detach().clone().requires_grad_()
        b_enc = params["b_enc"][i].detach().clone().requires_grad_()
        W_dec = params["W_dec"][i].detach().clone().requires_grad_()
        b_dec = params["b_dec"][i].detach().clone().requires_grad_()
        with torch.enable_grad():
            pre = (x_bd - b_dec) @ (W_enc.t() if hp.enc_rows else W_enc) + b_enc
            f = train_codes(pre, hp.activation, hp.k, comm)
            recon = recon_loss(f, W_dec, b_dec, x_bd, hp.prefixes)
            loss = recon
            if hp.activation == "relu":
                loss = loss + coef_m[i] * f.abs().sum(-1).mean()
            aux = pre.new_zeros(())
            if hp.activation != "relu" and dead_ms is not None and hp.aux_coef > 0:
                resid = x_bd - (f @ W_dec + b_dec).detach()
                aux = hp.aux_coef * aux_loss(pre, dead_ms[i], resid, W_dec, hp.k_aux, comm)
                loss = loss + aux
            g = torch.autograd.grad(loss, (W_enc, b_enc, W_dec, b_dec))
        for name, gi in zip(("W_enc", "b_enc", "W_dec", "b_dec"), g, strict=True):
            grads[name][i] = gi
        with torch.no_grad():
            err = (f @ W_dec + b_dec - x_bd).pow(2)
            fired = (f > 0).sum(0).float()
            sel = f[f > 0]
        outs["loss"].append(loss.detach())
        outs["mse"].append(err.mean())
        outs["fvu"].append(err.sum() / var.clamp_min(1e-12))
        outs["l1"].append(f.detach().abs().sum(-1).mean())
        outs["aux"].append(aux.detach())
        outs["fired"].append(fired)
        outs["min_act"].append(sel.min() if hp.activation == "batchtopk" and sel.numel() else x_bd.new_zeros(()))
    st = {n: torch.stack(v) for n, v in outs.items()}
    return StepOut(grads, st["loss"], st["mse"], st["fvu"], st["l1"], st["aux"], st["fired"], st["min_act"], len(x_bd))
