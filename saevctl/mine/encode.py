"""The mining fast path for `sae.encode`: normalisation and the decoder bias folded into one matmul with a
fused bias (addmm), the nonlinearity applied in place. `sae.encode` is the reference; a test checks parity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from saevctl.sae import SAE

# Switch: False makes mining call sae.encode itself (the plain reference version).
USE_FUSED = True


def make_encoder(sae: SAE) -> Callable[[Tensor], Tensor]:
    """A function raw activations (b, d) -> codes (b, s) equal to `sae.encode` up to float rounding."""
    if not USE_FUSED:
        return sae.encode
    with torch.no_grad():
        # x_norm = (x - mean) * scale; pre = (x_norm - b_dec) @ W + b_enc = x @ (scale W) + (b_enc - (mean * scale + b_dec) @ W)
        w_ds = (sae.W_enc * sae.act_scale).contiguous()
        bias_s = sae.b_enc - (sae.act_mean * sae.act_scale + sae.b_dec) @ sae.W_enc
    relu = sae.cfg.activation == "relu"

    def encode(x_bd: Float[Tensor, "b d"]) -> Float[Tensor, "b s"]:
        pre_bs = torch.addmm(bias_s, x_bd.to(w_ds.dtype), w_ds)
        return pre_bs.relu_() if relu else sae.activate(pre_bs)

    return encode
