"""A bias (or a constant) folded into a GEMM as one more row of weights against a column of ones:
[x | 1] @ [W ; b] = x @ W + b, without the separate pass over the (batch, latents) output that addmm's bias makes
(the training step, saevctl.train.step_fast, and mining's bfloat16 encoder, saevctl.mine.encode)."""

from __future__ import annotations

import torch
from torch import Tensor


def augmented(a: Tensor, extra: tuple[Tensor | float, ...], dtype: torch.dtype, dim: int, pad: int = 1) -> Tensor:
    """`a` with `extra` slices appended along `dim` (each broadcast over it), in `dtype`, zero-padded to a multiple
    of `pad` (where a GEMM runs faster at such an inner dimension: the caller measures its shapes)."""
    d = a.shape[dim]
    shape = list(a.shape)
    shape[dim] = -(-(d + len(extra)) // pad) * pad
    out = a.new_empty(shape, dtype=dtype)
    out.narrow(dim, 0, d).copy_(a)
    for j, e in enumerate(extra):
        if isinstance(e, Tensor):
            out.select(dim, d + j).copy_(e)
        else:
            out.select(dim, d + j).fill_(e)
    out.narrow(dim, d + len(extra), shape[dim] - d - len(extra)).zero_()
    return out
