"""Compiled (numba) CPU kernels of a TopK/BatchTopK training step's sparse part: decode, loss and the gradients of
the selected codes in one pass over the batch's rows, and the decoder's and encoder's weight gradients in one pass
over the latents.

Every sparse product of the step gathers rows (of W_dec by the codes' latents, of the inputs and the output
gradient by the codes' batch rows), so its cost is memory traffic, not arithmetic. Two passes make each gather
once where torch's kernels made four (embedding_bag, a sampled GEMM, two CSR products):
- by rows: x_hat = b_dec + sum v W_dec[c]; g = dL/dx_hat; dL/dv = W_dec[c] . g, while the row's W_dec rows are
  in cache;
- by latents (a counting sort of the entries): dL/dW_dec[c] = sum v g[r] and dL/dW_enc[c] = sum dL/dv x_c[r],
  each output row written once.
Under bf16 autocast the gathered operands are bfloat16 (half the traffic) and every sum is float32, as an
autocast GEMM's; the float32 step reads float32.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange
from torch import Tensor

from saevctl.compiled import NAN_SAFE, as_array, kernel, ld, ld2, n_threads, st2


@kernel(parallel=True, fastmath=NAN_SAFE)
def _decode_rows(
    off: np.ndarray, cols: np.ndarray, vals: np.ndarray, W: np.ndarray, bias: np.ndarray, target: np.ndarray,
    scale: float, nt: int, x_hat: np.ndarray, g_out: np.ndarray, g_vals: np.ndarray, row_sq: np.ndarray,
    g_sum: np.ndarray,
) -> None:
    b, d = target.shape
    per = (b + nt - 1) // nt
    keep = x_hat.shape[0] > 0
    zero = np.float32(0.0)
    for th in prange(nt):
        acc = np.empty(d, np.float32)
        g = np.empty(d, np.float32)
        g_sum[th, :] = 0
        for r in range(th * per, min(b, (th + 1) * per)):
            acc[:] = bias
            lo, hi = off[r], off[r + 1]
            e = lo
            while e + 3 < hi:  # entries by fours: four rows of W in flight
                v0, v1, v2, v3 = vals[e], vals[e + 1], vals[e + 2], vals[e + 3]
                c0, c1, c2, c3 = cols[e], cols[e + 1], cols[e + 2], cols[e + 3]
                for j in range(d):
                    acc[j] += (v0 * ld2(W, c0, j) + v1 * ld2(W, c1, j)) + (v2 * ld2(W, c2, j) + v3 * ld2(W, c3, j))
                e += 4
            while e < hi:
                v, c = vals[e], cols[e]
                for j in range(d):
                    acc[j] += v * ld2(W, c, j)
                e += 1
            sq = zero
            for j in range(d):
                er = acc[j] - target[r, j]
                sq += er * er
                g[j] = er * scale
                g_sum[th, j] += g[j]
                st2(g_out, r, j, g[j])
            if keep:
                x_hat[r, :] = acc
            row_sq[r] = sq
            e = lo
            while e + 3 < hi:
                c0, c1, c2, c3 = cols[e], cols[e + 1], cols[e + 2], cols[e + 3]
                s0, s1, s2, s3 = zero, zero, zero, zero
                for j in range(d):
                    s0 += ld2(W, c0, j) * g[j]
                    s1 += ld2(W, c1, j) * g[j]
                    s2 += ld2(W, c2, j) * g[j]
                    s3 += ld2(W, c3, j) * g[j]
                g_vals[e] = s0 if vals[e] > 0 else zero  # a code the ReLU zeroed has no gradient
                g_vals[e + 1] = s1 if vals[e + 1] > 0 else zero
                g_vals[e + 2] = s2 if vals[e + 2] > 0 else zero
                g_vals[e + 3] = s3 if vals[e + 3] > 0 else zero
                e += 4
            while e < hi:
                c = cols[e]
                s0 = zero
                for j in range(d):
                    s0 += ld2(W, c, j) * g[j]
                g_vals[e] = s0 if vals[e] > 0 else zero
                e += 1


@kernel()
def _by_latent(cols: np.ndarray, crow: np.ndarray, order: np.ndarray) -> None:
    """A stable counting sort of the entries by latent: latent c's entries are order[crow[c]:crow[c + 1]]."""
    crow[:] = 0
    for e in range(cols.shape[0]):
        crow[cols[e] + 1] += 1
    for c in range(crow.shape[0] - 1):
        crow[c + 1] += crow[c]
    pos = crow[:-1].copy()
    for e in range(cols.shape[0]):
        order[pos[cols[e]]] = e
        pos[cols[e]] += 1


@kernel(parallel=True, fastmath=NAN_SAFE)
def _latent_grads(
    crow: np.ndarray, order: np.ndarray, rows: np.ndarray, vals: np.ndarray, g_vals: np.ndarray,
    g_rows: np.ndarray, x_rows: np.ndarray, d: int, accumulate: bool, g_W_dec: np.ndarray, g_W_enc: np.ndarray,
    g_b_enc: np.ndarray, fired: np.ndarray,
) -> None:
    s = crow.shape[0] - 1
    zero = np.float32(0.0)
    for c in prange(s):
        if not accumulate:
            for j in range(d):
                g_W_dec[c, j] = 0
                g_W_enc[c, j] = 0
            g_b_enc[c] = 0
            fired[c] = 0
        gb = zero
        n = 0
        lo, hi = crow[c], crow[c + 1]
        p = lo
        while p + 3 < hi:  # entries by fours: eight gathered rows in flight (measured 1.15-1.3x pairs)
            e0, e1, e2, e3 = order[p], order[p + 1], order[p + 2], order[p + 3]
            v0, v1, v2, v3 = vals[e0], vals[e1], vals[e2], vals[e3]
            w0 = g_vals[e0] if v0 > 0 else zero
            w1 = g_vals[e1] if v1 > 0 else zero
            w2 = g_vals[e2] if v2 > 0 else zero
            w3 = g_vals[e3] if v3 > 0 else zero
            r0, r1, r2, r3 = rows[e0], rows[e1], rows[e2], rows[e3]
            for j in range(d):
                g_W_dec[c, j] += ((v0 * ld2(g_rows, r0, j) + v1 * ld2(g_rows, r1, j))
                                  + (v2 * ld2(g_rows, r2, j) + v3 * ld2(g_rows, r3, j)))
                g_W_enc[c, j] += ((w0 * ld2(x_rows, r0, j) + w1 * ld2(x_rows, r1, j))
                                  + (w2 * ld2(x_rows, r2, j) + w3 * ld2(x_rows, r3, j)))
            gb += (w0 + w1) + (w2 + w3)
            n += (v0 > 0) + (v1 > 0) + (v2 > 0) + (v3 > 0)
            p += 4
        if p + 1 < hi:  # a pair left
            e0, e1 = order[p], order[p + 1]
            v0, v1 = vals[e0], vals[e1]
            w0 = g_vals[e0] if v0 > 0 else zero
            w1 = g_vals[e1] if v1 > 0 else zero
            r0, r1 = rows[e0], rows[e1]
            for j in range(d):
                g_W_dec[c, j] += v0 * ld2(g_rows, r0, j) + v1 * ld2(g_rows, r1, j)
                g_W_enc[c, j] += w0 * ld2(x_rows, r0, j) + w1 * ld2(x_rows, r1, j)
            gb += w0 + w1
            n += (v0 > 0) + (v1 > 0)
        if (hi - lo) % 2:
            e = order[hi - 1]
            if vals[e] > 0:
                r, v, w = rows[e], vals[e], g_vals[e]
                for j in range(d):
                    g_W_dec[c, j] += v * ld2(g_rows, r, j)
                    g_W_enc[c, j] += w * ld2(x_rows, r, j)
                gb += w
                n += 1
        g_b_enc[c] += gb
        fired[c] += n


@kernel()
def _csr_by_row(flat: np.ndarray, vals: np.ndarray, s: int, rows: np.ndarray, cols: np.ndarray,
                out_vals: np.ndarray, off: np.ndarray) -> None:
    """A stable counting sort of flat indices (row * s + col) by row, the values after the ReLU (NaN kept)."""
    b = off.shape[0] - 1
    n = flat.shape[0]
    row = np.empty(n, np.int64)
    inv = 1.0 / s
    off[:] = 0
    for e in range(n):  # flat // s by a float64 multiply (exact after the correction), not a 64-bit division
        f = flat[e]
        q = np.int64(f * inv)
        q -= q * s > f
        q += (q + 1) * s <= f
        row[e] = q
        off[q + 1] += 1
    for r in range(b):
        off[r + 1] += off[r]
    pos = off[:-1].copy()
    zero = np.float32(0.0)
    for e in range(n):
        r = row[e]
        q = pos[r]
        pos[r] += 1
        v = ld(vals, e)
        rows[q] = r
        cols[q] = flat[e] - r * s
        out_vals[q] = zero if v < zero else v


def by_row(flat: Tensor, vals: Tensor, b: int, s: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Entries of a (b, s) matrix given as flat indices and values (float32 or bfloat16), as `_select`'s
    (rows, cols, vals after the ReLU in float32, offsets (b,)): rows ascending, each row's entries in their
    given order. One counting sort, where a sort of the flat indices, its gather, a division and a bincount
    took ~3 ms a BatchTopK step."""
    n = len(flat)
    rows, cols = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    out_vals, off = torch.empty(n), torch.empty(b + 1, dtype=torch.int64)
    _csr_by_row(flat.numpy(), as_array(vals.contiguous()), s, rows.numpy(), cols.numpy(), out_vals.numpy(),
                off.numpy())
    return rows, cols, out_vals, off[:-1]


@kernel(parallel=True, fastmath=NAN_SAFE)
def _center_rows(x: np.ndarray, b_dec: np.ndarray, nt: int, out: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
    b, d = x.shape
    m = b_dec.shape[0]
    p = out.shape[1]
    per = (b + nt - 1) // nt
    for th in prange(nt):
        s1[th, :] = 0
        s2[th, :] = 0
        for r in range(th * per, min(b, (th + 1) * per)):
            for j in range(d):
                c = np.float64(x[r, j] - b_dec[0, j])  # shifted by b_dec (near the mean): no cancellation
                s1[th, j] += c
                s2[th, j] += c * c
            for i in range(m):
                o = i * b + r
                for j in range(d):
                    st2(out, o, j, x[r, j] - b_dec[i, j])
                if p > d:
                    st2(out, o, d, np.float32(1.0))
                    for j in range(d + 1, p):
                        st2(out, o, j, np.float32(0.0))


def encoder_input(x_bd: Tensor, b_dec_md: Tensor, bf16: bool, pad: int) -> tuple[Tensor, Tensor]:
    """The encoder's input of every SAE and the batch's centred sum of squares (the FVU's denominator), in one
    pass over x: (x_enc (m, b, P), sum ||x - mean(x)||^2). float32: x_enc = x - b_dec (P = d); bfloat16: [x - b_dec
    | 1 | 0 ...], P rounded up to a multiple of `pad` (the encoder bias folded into the GEMM)."""
    b, d = x_bd.shape
    m = len(b_dec_md)
    p = -(-(d + 1) // pad) * pad if bf16 else d
    out = torch.empty(m, b, p, dtype=torch.bfloat16 if bf16 else torch.float32)
    nt = n_threads()
    s1, s2 = torch.empty(nt, d, dtype=torch.float64), torch.empty(nt, d, dtype=torch.float64)
    _center_rows(x_bd.numpy(), b_dec_md.numpy(), nt, as_array(out.view(m * b, p)), s1.numpy(), s2.numpy())
    t1, t2 = s1.sum(0), s2.sum(0)
    var = (t2 - t1 * t1 / b).sum().clamp_min(0.0).float()
    return out, var


def decode(
    cols: Tensor, vals: Tensor, off: Tensor, W_sd: Tensor, bias_d: Tensor, target_bd: Tensor, scale: float,
    keep_x_hat: bool, g_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rows' codes (CSR: `off` (b + 1), `cols`, `vals` >= 0) decoded through W_sd (float32 or bfloat16) plus
    bias, against target: (sum of squared errors, x_hat (or an empty tensor), g = scale * (x_hat - target) in
    g_dtype, dL/dvals (0 where vals is 0), g summed over rows)."""
    b, d = target_bd.shape
    nt = n_threads()
    x_hat = torch.empty((b if keep_x_hat else 0, d))
    g = torch.empty((b, d), dtype=g_dtype)
    g_vals = torch.empty_like(vals)
    row_sq = torch.empty(b)
    g_sum = torch.empty(nt, d)
    _decode_rows(off.numpy(), cols.numpy(), vals.numpy(), as_array(W_sd), bias_d.numpy(), target_bd.numpy(), scale,
                 nt, x_hat.numpy(), as_array(g), g_vals.numpy(), row_sq.numpy(), g_sum.numpy())
    return row_sq.sum(), x_hat, g, g_vals, g_sum.sum(0)


def weight_grads(
    rows: Tensor, cols: Tensor, vals: Tensor, g_vals: Tensor, g_bd: Tensor, x_bp: Tensor, s: int,
    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dW_dec (s, d), dL/dW_enc (s, d), dL/db_enc (s,), latents' firing counts) of the entries (rows, cols,
    vals, dL/dvals), from the output gradient g_bd and the encoder's input x_bp (its first d columns); added
    into `out` where given (AuxK's entries onto the main ones')."""
    d = g_bd.shape[1]
    crow = torch.empty(s + 1, dtype=torch.int64)
    order = torch.empty(len(cols), dtype=torch.int64)
    _by_latent(cols.numpy(), crow.numpy(), order.numpy())
    accumulate = out is not None
    if out is None:
        out = (torch.empty(s, d), torch.empty(s, d), torch.empty(s), torch.empty(s, dtype=torch.int64))
    n_threads()
    W_dec_g, W_enc_g, b_enc_g, fired = (o.numpy() for o in out)
    _latent_grads(crow.numpy(), order.numpy(), rows.numpy(), vals.numpy(), g_vals.numpy(), as_array(g_bd),
                  as_array(x_bp), d, accumulate, W_dec_g, W_enc_g, b_enc_g, fired)
    return out
