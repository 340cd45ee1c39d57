"""The mining fast path for `sae.encode`: normalisation and the decoder bias folded into one matmul with a
fused bias (addmm), the nonlinearity applied in place. `sae.encode` is the reference; a test checks parity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import torch
from jaxtyping import Float
from torch import Tensor

from saevctl.mine.scan import TopKCodes
from saevctl.sae import SAE
from saevctl.sae.topk import row_topk

# Switch: False makes mining call sae.encode itself (the plain reference version).
USE_FUSED = True


@overload
def make_encoder(
    sae: SAE, sparse_topk: Literal[False] = False, positive_only: bool = False
) -> Callable[..., Tensor]: ...


@overload
def make_encoder(
    sae: SAE, sparse_topk: bool, positive_only: bool = False
) -> Callable[..., Tensor | TopKCodes]: ...


def make_encoder(
    sae: SAE, sparse_topk: bool = False, positive_only: bool = False
) -> Callable[..., Tensor | TopKCodes]:
    """A function raw activations (b, d) -> codes (b, s) equal to `sae.encode` up to float rounding.

    `encode(x, out=buf)` writes into a reused buffer: allocating a fresh (b, s) tensor per chunk costs a
    page fault per 4 KiB, as much as a pass over the codes. With `sparse_topk` a TopK SAE's codes come back as
    `TopKCodes` (b = rows, p = 1), unscattered: what the scanner needs, without a zero + scatter over (b, s).
    `positive_only`: the caller reads only the codes > 0 (the scanner's firing codes), so a ReLU SAE's codes come
    back as its pre-activations, the in-place ReLU pass (a read and a write of the whole chunk) skipped.
    """
    if not USE_FUSED:
        return lambda x_bd, out=None: sae.encode(x_bd)
    with torch.no_grad():
        # x_norm = (x - mean) * scale; pre = (x_norm - b_dec) @ W + b_enc
        #        = x @ (scale W) + (b_enc - (mean * scale + b_dec) @ W)
        w_ds = (sae.W_enc * sae.act_scale).contiguous()
        bias_s = sae.b_enc - (sae.act_mean * sae.act_scale + sae.b_dec) @ sae.W_enc
    activation, k, threshold = sae.cfg.activation, sae.cfg.k, float(sae.threshold)

    def encode(x_bd: Float[Tensor, "b d"], out: Tensor | None = None) -> Float[Tensor, "b s"] | TopKCodes:
        x_bd = x_bd.to(w_ds.dtype)
        pre_bs = torch.addmm(bias_s, x_bd, w_ds) if out is None else torch.addmm(bias_s, x_bd, w_ds, out=out)
        # Every nonlinearity in place, as SAE.activate computes it.
        if activation == "relu":
            return pre_bs if positive_only else pre_bs.relu_()
        if activation == "batchtopk":
            return torch.threshold_(pre_bs, threshold, 0.0)
        vals_bk, idx_bk = row_topk(pre_bs, k)
        if sparse_topk:
            return TopKCodes(vals_bk.relu_(), idx_bk, (len(pre_bs), 1, pre_bs.shape[1]))
        return pre_bs.zero_().scatter_(-1, idx_bk, vals_bk.relu_())

    return encode
