"""Null-baseline SAEs of one SAE's width and sparsity: a random tied SAE as training would start it, PCA directions
and spherical k-means centroids used as tied dictionaries, and a random frozen decoder whose encoder is trained by
the real training loop. Each is a TopK SAE (k = the SAE's mean L0) with the SAE's normalisation. Choices:
docs/eval.md ("Null baselines").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saevctl.errors import InputError
from saevctl.sae.model import SAE, SAEConfig
from saevctl.sae.topk import row_topk
from saevctl.store import Store

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
DEAD_BIAS = -1e4
"""Encoder bias of padding latents (a PCA dictionary has only 2d directions): they never reach the top k."""
ASSIGN_BYTES = 1 << 28
"""k-means assigns rows to centroids a block at a time, the block's row-by-centroid cosines at most this big."""


# --- data --------------------------------------------------------------------------------------------------


def token_sample(store: Store, layer: int, kinds: tuple[str, ...], n: int, seed: int) -> Tensor:
    """About `n` stored tokens (float32, raw) of the kinds the SAE reads, from randomly chosen whole images."""
    arrays = [store.layer(layer).kind(k) for k in kinds]
    per_image = sum(int(np.prod(a.shape[1:-1], dtype=np.int64)) for a in arrays)
    n_img = min(store.n_images, max(1, math.ceil(n / max(per_image, 1))))
    rows = np.sort(np.random.default_rng(seed).choice(store.n_images, size=n_img, replace=False))
    parts = [a.torch(rows).float().reshape(-1, a.shape[-1]) for a in arrays]
    x = torch.cat(parts)
    if len(x) > n:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x = x[keep.sort().values]
    return x


@torch.no_grad()
def mean_l0(sae: SAE, x_nd: Tensor, chunk: int = 4096) -> float:
    """Mean number of active latents per token of the SAE on the sample."""
    device = sae.act_mean.device
    enc = sae.encoder()  # `encode` bit for bit, into one reused buffer (a fresh one per chunk costs its page faults)
    buf = torch.empty(min(chunk, len(x_nd)) * sae.cfg.n_latents, device=device)
    fired = 0
    for i in range(0, len(x_nd), chunk):
        x = x_nd[i : i + chunk].to(device)
        fired += int((enc(x, out=buf[: len(x) * sae.cfg.n_latents].view(len(x), -1)) > 0).sum())
    return fired / max(len(x_nd), 1)


# --- the four baselines ---------------------------------------------------------------------------------------


def _like(sae: SAE, k: int, train: dict[str, Any]) -> SAE:
    """An empty TopK SAE of `sae`'s width, model, layer and tokens, with its normalisation statistics."""
    c = sae.cfg
    cfg = SAEConfig(d=c.d, n_latents=c.n_latents, activation="topk", k=k, model=dict(c.model), layer=c.layer,
                    tokens=c.tokens, train=train)
    out = SAE(cfg)
    with torch.no_grad():
        out.act_mean.copy_(sae.act_mean.detach().cpu())
        out.act_scale.copy_(sae.act_scale.detach().cpu())
    return out.eval()


def untrained(sae: SAE, k: int, seed: int) -> SAE:
    """Training's initialisation, seeded: random unit decoder rows, the encoder their transpose, zero biases."""
    out = _like(sae, k, {"baseline": "untrained", "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(sae.cfg.n_latents, sae.cfg.d, generator=gen)
    w = w / w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        out.W_dec.copy_(w)
        out.W_enc.copy_(w.t())
    return out


def _normalised(sae: SAE, x_nd: Tensor) -> Tensor:
    with torch.no_grad():
        return sae.normalize(x_nd.to(sae.act_mean.device)).float().cpu()


def pca_rows(x_norm_nd: Tensor, n_latents: int) -> Tensor:
    """The principal directions of the (normalised, centred) sample in both signs, largest variance first: at most
    2d rows, so that non-negative TopK codes can give either sign of a coefficient."""
    x = x_norm_nd.double()
    cov = (x - x.mean(0)).t() @ (x - x.mean(0)) / max(len(x) - 1, 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    top = vecs.flip(1).t()[: max(1, n_latents // 2)].float()
    return torch.cat([top, -top])


def check_kmeans_sample(n_tokens: int, n_latents: int) -> None:
    if n_tokens < n_latents:
        raise InputError(f"the baseline sample holds {n_tokens:,} tokens, fewer than the SAE's {n_latents:,} latents, "
                         "so k-means cannot place a centroid on each",
                         "pass a larger --baseline-sample, or leave kmeans out of --baseline-kinds")


def spherical_kmeans(x_norm_nd: Tensor, n: int, iters: int, seed: int, progress: Progress | None = None) -> Tensor:
    """n unit centroids of the sample's directions (cosine k-means): seeded from distinct sample rows; an emptied
    cluster is re-seeded with the row its centroid serves worst."""
    lengths: Tensor = x_norm_nd.norm(dim=1, keepdim=True)
    x = x_norm_nd / lengths.clamp_min(1e-12)
    check_kmeans_sample(len(x), n)
    gen = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(len(x), generator=gen)[:n]].clone()
    assign = torch.full((len(x),), -1, dtype=torch.int64)
    rows = max(1, ASSIGN_BYTES // (4 * n))
    for _ in range(iters):
        best = torch.empty(len(x))
        new = torch.empty_like(assign)
        for i in range(0, len(x), rows):
            best[i : i + rows], new[i : i + rows] = (x[i : i + rows] @ cent.t()).max(1)
        done = bool((new == assign).all())
        assign = new
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        empty = torch.nonzero(torch.bincount(assign, minlength=n) == 0).flatten()
        sums[empty] = x[best.argsort()[: len(empty)]]  # the worst-served rows seed the empty clusters
        norms: Tensor = sums.norm(dim=1, keepdim=True)  # Tensor.norm is not annotated
        cent = sums / norms.clamp_min(1e-12)
        if progress:
            progress(1)
        if done:
            break
    return cent


@torch.no_grad()
def dictionary(sae: SAE, rows_md: Tensor, k: int, x_nd: Tensor, train: dict[str, Any]) -> SAE:
    """A tied SAE over unit dictionary rows: TopK of the projections, one least-squares scale on the encoder (tied
    codes over-count correlated rows); latents beyond the rows are padding that never fires."""
    out = _like(sae, k, train)
    m = min(len(rows_md), sae.cfg.n_latents)
    W = torch.zeros(sae.cfg.n_latents, sae.cfg.d)
    W[:m] = rows_md[:m]
    out.W_dec.copy_(W)
    out.W_enc.copy_(W.t())
    out.b_enc[m:] = DEAD_BIAS
    xn = _normalised(out, x_nd)
    num = den = 0.0
    for i in range(0, len(xn), 4096):  # a block at a time; each row's k codes decoded sparsely (an embedding bag)
        vals, idx = row_topk(out.pre_acts(xn[i : i + 4096]), k)
        recon = torch.nn.functional.embedding_bag(idx, out.W_dec, per_sample_weights=vals.relu_(), mode="sum")
        num += float((xn[i : i + 4096] * recon).sum())
        den += float(recon.pow(2).sum())
    scale = num / max(den, 1e-12)
    out.W_enc.mul_(max(scale, 0.0))
    out.cfg.train["encoder_scale"] = scale
    return out


def pca(sae: SAE, k: int, x_nd: Tensor, train: dict[str, Any]) -> SAE:
    return dictionary(sae, pca_rows(_normalised(sae, x_nd), sae.cfg.n_latents), k, x_nd, train)


def kmeans(sae: SAE, k: int, x_nd: Tensor, iters: int, seed: int, train: dict[str, Any],
           progress: Progress | None = None) -> SAE:
    cent = spherical_kmeans(_normalised(sae, x_nd), sae.cfg.n_latents, iters, seed, progress)
    return dictionary(sae, cent, k, x_nd, train)


def train_settings(sae: SAE, k: int, store: Path, layer: int, n_tokens: int | None, seed: int,
                   device: str) -> dict[str, Any]:
    """The training Config of the random-decoder baseline: the SAE's own training settings where its checkpoint
    records them (learning rate, batch, schedule, tokens seen), TopK at k, the decoder frozen."""
    t = sae.cfg.train if isinstance(sae.cfg.train, dict) else {}
    kinds: tuple[str, ...] = tuple(sae.cfg.tokens)
    tokens = "patches" if kinds == ("patches",) else "cls" if kinds == ("cls",) else "both"
    kw: dict[str, Any] = {"store": store, "layer": layer, "tokens": tokens, "activation": ("topk",),
                          "width": (str(sae.cfg.n_latents),), "k": (k,), "seed": seed, "device": device,
                          "freeze_decoder": True, "n_tokens": n_tokens or t.get("tokens_seen")}
    if t.get("lr"):
        kw["lr"] = (float(t["lr"]),)
    for name in ("batch_size", "lr_warmup", "lr_decay", "aux_coef", "dtype"):
        if t.get(name) is not None:
            kw[name] = t[name]
    if kw["n_tokens"] is not None and kw["n_tokens"] < kw.get("batch_size", 4096):
        kw["n_tokens"] = None  # a run shorter than one batch: train one pass instead
    return kw


def random_decoder(sae: SAE, settings: dict[str, Any], work: Path, progress: Progress | None = None,
                   on_total: Callable[[int], None] | None = None) -> SAE:
    """Train a TopK SAE whose decoder stays at its random unit-norm initialisation (train.run, --freeze-decoder) in
    `work`; returned with the baseline's provenance."""
    from saevctl.train import Config, run

    cfg = Config(out=work, log_every=10**9, ckpt_every=10**9, **settings)
    res = run(cfg, progress=(lambda n, _r: progress(n)) if progress else None,
              on_total=(lambda n, _m: on_total(n)) if on_total else None)
    trained = SAE.load(res.runs[0]["path"])
    out = SAE(dataclasses.replace(trained.cfg, train={**trained.cfg.train, "baseline": "random-decoder"}))
    out.load_state_dict(trained.state_dict())
    return out.eval()
