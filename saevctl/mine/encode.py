"""The mining fast path for `sae.encode`: normalisation and the decoder bias folded into one matmul with a
fused bias (addmm), the nonlinearity applied in place. `sae.encode` is the reference; a test checks parity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import torch
from jaxtyping import Float
from torch import Tensor

from saevctl.mine.scan import TopKCodes
from saevctl.sae import SAE
from saevctl.sae.fold import augmented
from saevctl.sae.topk import row_topk

# Switch: False makes mining call sae.encode itself (the plain reference version).
USE_FUSED = True
# The store's first tokens, encoded in float32 too under mine --compute bfloat16 to measure what bfloat16 changes:
# enough for a stable figure, few enough that two dense (rows, s) copies stay small at any width.
MEASURE_ROWS = 1024


@overload
def make_encoder(
    sae: SAE, sparse_topk: Literal[False] = False, positive_only: bool = False, compute: str = "float32"
) -> Callable[..., Tensor]: ...


@overload
def make_encoder(
    sae: SAE, sparse_topk: bool, positive_only: bool = False, compute: str = "float32"
) -> Callable[..., Tensor | TopKCodes]: ...


def make_encoder(
    sae: SAE, sparse_topk: bool = False, positive_only: bool = False, compute: str = "float32"
) -> Callable[..., Tensor | TopKCodes]:
    """A function raw activations (b, d) -> codes (b, s) equal to `sae.encode` up to float rounding.

    `encode(x, out=buf)` writes into a reused buffer: allocating a fresh (b, s) tensor per chunk costs a
    page fault per 4 KiB, as much as a pass over the codes. With `sparse_topk` a TopK SAE's codes come back as
    `TopKCodes` (b = rows, p = 1), unscattered: what the scanner needs, without a zero + scatter over (b, s).
    `positive_only`: the caller reads only the codes > 0 (the scanner's firing codes), so a ReLU SAE's codes come
    back as its pre-activations, the in-place ReLU pass (a read and a write of the whole chunk) skipped.
    `compute="bfloat16"`: the GEMM's inputs (normalised in float32 first), weights and bias rounded to bfloat16,
    its products summed in float32 and its output rounded to bfloat16 (mine --compute); the codes still come back
    as float32, and a TopK SAE's selection is made on the bfloat16 pre-activations, without a float32 copy. A ReLU
    SAE's codes with `positive_only` stay bfloat16 (in `out`'s first half where given): the scanner reads them so,
    half the memory traffic of a float32 copy, and no pass to make one. (BatchTopK's are made float32 first: its
    threshold is compared in float32, as SAE.encode compares it.)
    """
    if not USE_FUSED:
        return lambda x_bd, out=None: sae.encode(x_bd)
    low = compute == "bfloat16"
    with torch.no_grad():
        if low:
            # Not folded: where a residual stream's mean is large against its spread (ViTs' massive activations),
            # x rounded to bfloat16 before the mean is removed carries the mean's rounding error into every code,
            # which the folded bias cannot cancel (tests/test_mine_scan.py plants a mean 800x the spread). So the
            # input is normalised in float32 (as SAE.encode does), then rounded:
            # pre = bf16(normalize(x) - b_dec) @ bf16(W) + bf16(b_enc), the bias folded into the GEMM as a row of
            # weights against a column of ones: [x | 1] @ [W; b] (an addmm's bias pass over its bfloat16 output cost
            # 12% of the GEMM; the extra row costs ~1%).
            w_ds = augmented(sae.W_enc, (sae.b_enc,), torch.bfloat16, dim=0)  # K = d + 1: as fast as d here
        else:
            # x_norm = (x - mean) * scale; pre = (x_norm - b_dec) @ W + b_enc
            #        = x @ (scale W) + (b_enc - (mean * scale + b_dec) @ W)
            w_ds = (sae.W_enc * sae.act_scale).contiguous()
            bias_s = sae.b_enc - (sae.act_mean * sae.act_scale + sae.b_dec) @ sae.W_enc
    activation, k, threshold = sae.cfg.activation, sae.cfg.k, float(sae.threshold)
    keep_low = low and positive_only and activation == "relu"  # bfloat16 codes for the scanner, as they are
    scratch: list[Tensor] = []  # bfloat16 pre-activations of the dense activations, reused across calls

    def gemm(x_bd: Tensor, out: Tensor | None) -> Tensor:
        """The pre-activations: into `out` in float32; in bfloat16 into `out`'s first half (read only by a TopK
        SAE's selection, or by the scanner as they are) or a reused buffer (dense codes, converted into `out`
        after)."""
        if not low:
            x_bd = x_bd.to(w_ds.dtype)
            return torch.addmm(bias_s, x_bd, w_ds) if out is None else torch.addmm(bias_s, x_bd, w_ds, out=out)
        with torch.no_grad():
            x_bp = augmented(sae.normalize(x_bd) - sae.b_dec, (1.0,), torch.bfloat16, dim=1)
        if out is None:
            return torch.mm(x_bp, w_ds)
        n = out.numel()
        if (activation == "topk" or keep_low) and out.is_contiguous():
            dest = out.view(-1).view(torch.bfloat16)[:n].view(out.shape)
        else:
            if not scratch or scratch[0].numel() < n or scratch[0].device != out.device:
                scratch[:] = [torch.empty(n, dtype=torch.bfloat16, device=out.device)]
            dest = scratch[0][:n].view(out.shape)
        return torch.mm(x_bp, w_ds, out=dest)

    def encode(x_bd: Float[Tensor, "b d"], out: Tensor | None = None) -> Float[Tensor, "b s"] | TopKCodes:
        pre_bs = gemm(x_bd, out)
        if pre_bs.dtype != torch.float32 and activation != "topk" and not keep_low:
            pre_bs = pre_bs.float() if out is None else out.copy_(pre_bs)  # dense codes come back in float32
        # Every nonlinearity in place, as SAE.activate computes it.
        if activation == "relu":
            return pre_bs if positive_only else pre_bs.relu_()
        if activation == "batchtopk":
            return torch.threshold_(pre_bs, threshold, 0.0)
        vals_bk, idx_bk = row_topk(pre_bs, k)
        vals_bk = vals_bk.float().relu_()
        if sparse_topk:
            return TopKCodes(vals_bk, idx_bk, (len(pre_bs), 1, pre_bs.shape[1]))
        if low:  # the dense codes in float32: into `out` (the bfloat16 pre-activations sat in its first half)
            dense = torch.zeros(pre_bs.shape, device=pre_bs.device) if out is None else out.zero_()
            return dense.scatter_(-1, idx_bk, vals_bk)
        return pre_bs.zero_().scatter_(-1, idx_bk, vals_bk)

    return encode


@torch.inference_mode()
def agreement(sae: SAE, x_nd: Float[Tensor, "n d"]) -> dict[str, Any]:
    """What a bfloat16 encoder changes on these rows, against the float32 one: the share of float32's firing codes
    (row, feature) that fire in bfloat16 too (for a TopK SAE, how much of each row's selection is kept), the
    relative error ||c_bf16 - c_fp32|| / ||c_fp32|| over the codes both fire, and over all codes. A TopK code that
    changes places with the (k+1)-th enters or leaves at full size (about the k-th code's value), so the last
    figure is mostly the few swaps at near-ties, not rounding."""
    ref = make_encoder(sae)(x_nd)
    got = make_encoder(sae, compute="bfloat16")(x_nd)
    fired, both = ref > 0, (ref > 0) & (got > 0)
    return {"compute": "bfloat16", "device": str(x_nd.device), "rows_measured": len(x_nd),
            "rel_error_vs_float32": _rel(got, ref),
            "rel_error_shared": _rel(got[both], ref[both]),
            "firing_kept": float(both.sum() / fired.sum().clamp_min(1))}


def _rel(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))
