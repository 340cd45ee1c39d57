"""The optimizer step on a CPU as one compiled (numba) pass per tensor: Adam, and for the decoder its unit-norm
constraint (the gradient's part along each row dropped before the update, the row renormalised after it), each
row read and written once where torch's ops made six passes over the decoder (a GEMV, the gradient's
subtraction, fused Adam, a norm and a division).

Same arithmetic as `optim.adam_update` / torch's fused Adam: m <- lerp(m, g, 1 - beta1), v <- beta2 v +
(1 - beta2) g^2, p <- p - lr / c1 * m / (sqrt(v) / sqrt(c2) + eps), with c1, c2 the bias corrections; float32
throughout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import prange
from torch import Tensor

from saevctl.compiled import NAN_SAFE, kernel, n_threads
from saevctl.train.optim import BETAS, EPS, bias_corrections


@kernel(parallel=True, fastmath=NAN_SAFE)
def _adam_rows(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step_size: float, b1: float, b2: float,
    inv_sqrt_c2: float, eps: float, unit: bool,
) -> None:
    """Adam on each row of (n, d) p in place; `unit`: rows are unit decoder rows (see the module docstring)."""
    n, d = p.shape
    one = np.float32(1.0)
    a1, a2 = np.float32(1.0 - b1), np.float32(1.0 - b2)
    fb2, lr, isc, fe = np.float32(b2), np.float32(step_size), np.float32(inv_sqrt_c2), np.float32(eps)
    for r in prange(n):
        dot = np.float32(0.0)
        if unit:
            for j in range(d):
                dot += p[r, j] * g[r, j]
        sq = np.float32(0.0)
        for j in range(d):
            gj = g[r, j] - dot * p[r, j]
            mj = m[r, j] + a1 * (gj - m[r, j])
            vj = fb2 * v[r, j] + a2 * gj * gj
            m[r, j] = mj
            v[r, j] = vj
            pj = p[r, j] - lr * mj / (math.sqrt(vj) * isc + fe)
            p[r, j] = pj
            sq += pj * pj
        if unit:
            nrm = math.sqrt(sq)
            inv = one / (nrm if nrm > 1e-12 else np.float32(1e-12))
            for j in range(d):
                p[r, j] *= inv


def adam_step(
    params: dict[str, Tensor], grads: dict[str, Tensor], moments: dict[str, Tensor], lrs: list[float], step: int,
    unit: frozenset[str] = frozenset(),
) -> None:
    """`optim.adam_update` on float32 CPU tensors, with the decoder constraint of the tensors named in `unit`
    (stacked (m, s, d) decoders: `remove_parallel_grads` before the update, `normalize_rows` after) in the same
    pass. `grads` of those tensors are not changed."""
    b1, b2 = BETAS
    c1, c2 = bias_corrections(step)
    n_threads()
    for name, p in params.items():
        g = grads[name].to(p.dtype)
        m, v = moments[f"m.{name}"], moments[f"v.{name}"]
        for i, lr in enumerate(lrs):
            _adam_rows(_rows(p[i]), _rows(g[i]), _rows(m[i]), _rows(v[i]), lr / c1, b1, b2, 1 / math.sqrt(c2), EPS,
                       name in unit)


def _rows(x: Tensor) -> np.ndarray:
    """A contiguous float32 tensor as the (rows, last dim) array the kernel walks (a bias: one row)."""
    assert x.is_contiguous() and x.dtype == torch.float32, (x.shape, x.dtype)
    return x.reshape(-1, x.shape[-1]).numpy()
