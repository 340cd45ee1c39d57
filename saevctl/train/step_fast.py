"""The fast training step: same-shape SAEs stacked into batched matmuls, hand-written encoder gradients, and a
sparse (index-based) decoder for TopK/BatchTopK. Matches `step_ref` (tests/test_train_parity.py).

Why it is fast: the pre-encoder bias costs a GEMV instead of a GEMM (its gradient is -sum(g_pre) W_enc); the
encoder bias, its gradient, the L1 and the L1 gradient ride inside the GEMMs as folded columns (`_augmented`), so
no (batch, latents) bias is written and no GEMV pass is made; the ReLU mask is one in-place pass; TopK never forms
a dense (batch, latents) gradient, and its top-k is `row_topk` (see saevctl/sae/topk.py).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from saevctl.sae.fold import augmented
from saevctl.sae.topk import row_topk
from saevctl.train import sparse_cpu
from saevctl.train.step_ref import Hyper, StepOut, batch_topk, centered_sq_sum

if TYPE_CHECKING:
    from saevctl.train.distributed import Comm


def _autocast(x: Tensor, bf16: bool) -> contextlib.AbstractContextManager[object]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)


def _bmm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """Batched matmul over the SAE axis. On CPU (or for one SAE) a loop of 2-D GEMMs: BLAS reads transposed
    operands in place, where CPU bmm would first copy a transposed (batch, latents) operand."""
    if a.is_cuda and len(a) > 1:
        return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)
    if bias is None:
        return torch.stack([torch.mm(a[i], b[i]) for i in range(len(a))]) if len(a) > 1 else torch.mm(a[0], b[0])[None]
    outs = [torch.addmm(bias[i], a[i], b[i]) for i in range(len(a))]
    return torch.stack(outs) if len(a) > 1 else outs[0][None]


PAD = 16
"""Folded GEMMs pad their inner dimension (d plus the folded columns) to a multiple of this: bf16 GEMMs at K 784
run as fast as at K 768 (this CPU's AMX), at K 769 about 6% slower."""


def _augmented(a: Tensor, extra: tuple[Tensor | float, ...], dtype: torch.dtype, dim: int) -> Tensor:
    """`fold.augmented` padded to a multiple of PAD: [x | 1] @ [W ; b] = x @ W + b without the (batch, latents) bias
    write that addmm makes before its GEMM, and [g | c] @ [W | 1]^T adds the constant c; the padding costs ~2%."""
    return augmented(a, extra, dtype, dim, PAD)


def _encode(
    x_c_mbd: Tensor, params: dict[str, Tensor], latent_rows: bool, bf16: bool, x_in: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pre-activations (m, b, s) in the compute dtype as [x_c | 1] @ [W_enc ; b_enc], the left operand ([x_c | 1],
    (m, b, P); x_c itself where the bias is not folded), and for bfloat16 TopK/BatchTopK the right one as latent
    rows ([W_enc | b_enc], (m, s, P) bfloat16; else None). `x_in`: the left operand, already made
    (`sparse_cpu.encoder_input`).

    `latent_rows`: W_enc is stored (m, s, d) (TopK/BatchTopK) rather than (m, d, s) (ReLU)."""
    if latent_rows and not bf16:
        # float32 TopK: addmm's bias write measured cheaper than copying W_enc into the folded operand (the ReLU
        # step folds in float32 too: its [x_c | 1] also gives dL/db_enc in the gradient GEMM)
        return _bmm(x_c_mbd, params["W_enc"].transpose(1, 2), params["b_enc"][:, None, :]), x_c_mbd, None
    cd = torch.bfloat16 if bf16 else torch.float32
    x_aug = _augmented(x_c_mbd, (1.0,), cd, dim=2) if x_in is None else x_in
    if latent_rows:
        W_rows = _augmented(params["W_enc"], (params["b_enc"],), cd, dim=2)
        return _bmm(x_aug, W_rows.transpose(1, 2)), x_aug, W_rows
    W_aug = _augmented(params["W_enc"], (params["b_enc"],), cd, dim=1)
    return _bmm(x_aug, W_aug), x_aug, None


# (loss_m, x_hat_mbd, grad_f, grad_W_dec, grad_b_dec)
DecodeOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _folded_decode(
    f_mbs: Tensor, params: dict[str, Tensor], x_bd: Tensor, bf16: bool, l1_grad_m: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reconstruction loss of dense codes, one prefix: (loss_m, x_hat, grad_f, grad_W_dec, grad_b_dec, l1_m).

    Gradients by hand (autograd's bmm backward would copy the codes into a transposed layout), and two sums ride
    in GEMMs as folded columns: [W_dec | 1] makes the decoder also return each row's L1 (a GEMV pass less), and
    [g_xhat | l1_grad] @ [W_dec | 1]^T adds the L1 gradient to grad_f (no (batch, latents) bias write)."""
    b, d = x_bd.shape
    W_aug = _augmented(params["W_dec"], (1.0,), f_mbs.dtype, dim=2)  # (m, s, P); cast once for both GEMMs
    x_hat_aug = _bmm(f_mbs, W_aug)
    l1_m = x_hat_aug[:, :, d].float().sum(1) / b
    err = x_hat_aug[:, :, :d].float().add_(params["b_dec"][:, None, :]).sub_(x_bd)
    loss_m = err.pow(2).mean((1, 2))
    x_hat = err + x_bd
    g_xhat = err.mul_(2.0 / (b * d))
    g_aug = _augmented(g_xhat, (l1_grad_m[:, None],), f_mbs.dtype, dim=2)
    g_W_dec = _bmm(f_mbs.transpose(1, 2), g_aug[:, :, :d]).float()
    g_f = _bmm(g_aug, W_aug.transpose(1, 2))
    return loss_m, x_hat, g_f, g_W_dec, g_xhat.sum(1), l1_m


def _fired_counts(f_mns: Tensor) -> Tensor:
    """Per SAE and latent, how many of the n rows fire, as float32. f >= 0 and no longer needed: `sign_` makes it
    the 0/1 mask. In bfloat16 counted by GEMVs (its strided column sum into float32 measured 2.5x slower); bfloat16
    holds integers exactly only up to 256, so each GEMV sums a block of 256 rows and the blocks add up in float32."""
    mask = f_mns.sign_()
    n, blk = mask.shape[1], 256
    if mask.dtype != torch.bfloat16 or n % blk:  # float32: the column sum measured as fast as a GEMV
        return mask.sum(1, dtype=torch.float32)
    ones = mask.new_ones(n // blk, 1, blk)
    return torch.stack([torch.bmm(ones, m_ns.reshape(n // blk, blk, -1)).float().sum((0, 1)) for m_ns in mask])


def _matryoshka_decode(f_mbs: Tensor, params: dict[str, Tensor], x_bd: Tensor, hp: Hyper, bf16: bool) -> DecodeOut:
    """Nested-prefix reconstruction losses, differentiated by autograd (slices make hand gradients fiddly)."""
    W_dec = params["W_dec"].detach().requires_grad_()
    b_dec = params["b_dec"].detach().requires_grad_()
    f = f_mbs.detach().requires_grad_()
    with torch.enable_grad(), _autocast(x_bd, bf16):
        loss_m, x_hat, lo = torch.zeros((), device=x_bd.device), b_dec[:, None, :].float(), 0
        for n in hp.prefixes:
            x_hat = x_hat + torch.bmm(f[:, :, lo:n], W_dec[:, lo:n]).float()
            loss_m = loss_m + (x_hat - x_bd).pow(2).mean((1, 2))
            lo = n
        loss_m = loss_m / len(hp.prefixes)
    g_f, g_W, g_b = torch.autograd.grad(loss_m.sum(), (f, W_dec, b_dec))
    return loss_m.detach(), x_hat.detach(), g_f, g_W.float(), g_b.float()


def _relu_step(
    params: dict[str, Tensor], x_bd: Tensor, x_c: Tensor, coef_m: Tensor, hp: Hyper, bf16: bool
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor, int]:
    """(grads, loss_m, x_hat, l1_m, fired, rows counted)."""
    d = x_bd.shape[1]
    pre, x_aug, _ = _encode(x_c, params, latent_rows=False, bf16=bf16)
    f = torch.relu_(pre)
    l1_grad_m = coef_m / len(x_bd)  # |f|' = 1 where f fires; fine in bfloat16 too (both terms scale with 1/batch)
    if len(hp.prefixes) > 1:
        recon_m, x_hat, g_f, g_W_dec, g_b_dec = _matryoshka_decode(f, params, x_bd, hp, bf16)
        g_f = g_f.add_(l1_grad_m[:, None, None].to(g_f.dtype))
        l1_m = f.sum((1, 2), dtype=torch.float32) / len(x_bd)
    else:
        recon_m, x_hat, g_f, g_W_dec, g_b_dec, l1_m = _folded_decode(f, params, x_bd, bf16, l1_grad_m)
    g_pre = torch.ops.aten.threshold_backward.grad_input(g_f, f, 0, grad_input=g_f)  # the ReLU mask, in place
    # [x_c | 1]^T @ g_pre: the encoder's weight gradient with its bias gradient as row d (no GEMV pass)
    g_enc = _bmm(x_aug.transpose(1, 2), g_pre)
    g_W_enc, g_b_enc = g_enc[:, :d].float(), g_enc[:, d].float()
    g_b_dec = g_b_dec.float() - torch.bmm(params["W_enc"], g_b_enc[:, :, None])[:, :, 0]
    n_counted = min(hp.count_rows, len(x_bd))
    fired = _fired_counts(f[:, :n_counted])
    grads = {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
    loss_m = recon_m + coef_m * l1_m
    return grads, loss_m, x_hat, l1_m, fired, n_counted


def _select(pre_bs: Tensor, activation: str, k: int, comm: Comm | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparse codes as (rows, cols, vals, offsets), rows ascending (within a row: columns ascending on CUDA, the
    selection's order on a CPU); vals after the ReLU, in float32."""
    b, s = pre_bs.shape
    if activation == "topk":
        vals, cols = row_topk(pre_bs, k)
        rows = torch.arange(b, device=pre_bs.device).repeat_interleave(k)
        offsets = torch.arange(0, b * k, k, device=pre_bs.device)
        return rows, cols.flatten(), torch.relu(vals.flatten().float()), offsets
    vals, flat = batch_topk(pre_bs.flatten(), b * k, comm)
    if not pre_bs.is_cuda:
        return sparse_cpu.by_row(flat, vals, b, s)
    flat, order = flat.sort()
    rows, cols = flat // s, flat % s
    counts = torch.bincount(rows, minlength=b)
    offsets = torch.cumsum(counts, 0) - counts
    return rows, cols, torch.relu(vals[order].float()), offsets


def _sparse_encoder_grads(g_vals: Tensor, rows: Tensor, cols: Tensor, x_c_bd: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """dL/dW_enc as (s, d) rows and dL/db_enc (s,) from gradients at the selected (row, col) entries only:
    a CSR (latents x batch) matrix times the (batch x d) inputs (the torch path; `sparse_cpu` on a CPU)."""
    g_b_enc = torch.zeros(s, device=g_vals.device, dtype=torch.float32).index_add_(0, cols, g_vals)
    order = torch.argsort(cols, stable=True)  # rows stay ascending within a latent
    crow = torch.zeros(s + 1, dtype=torch.int64, device=cols.device)
    torch.cumsum(torch.bincount(cols, minlength=s), 0, out=crow[1:])
    with warnings.catch_warnings():  # torch calls CSR "beta" on every construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        g_pre_T = torch.sparse_csr_tensor(crow, rows[order], g_vals[order], (s, len(x_c_bd)), check_invariants=False)
    return torch.sparse.mm(g_pre_T, x_c_bd.float()), g_b_enc


def _autograd_sparse(
    cols: Tensor, vals: Tensor, offsets: Tensor, W_dec: Tensor, b_dec: Tensor, x_bd: Tensor, hp: Hyper
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sparse decoder differentiated by autograd (nested prefixes; CUDA, where the CSR sampled GEMM on TopK's
    unsorted columns is untested): (recon, x_hat, g_vals, g_W_dec, g_b_dec)."""
    W = W_dec.detach().requires_grad_()
    bd = b_dec.detach().requires_grad_()
    v = vals.detach().requires_grad_()
    with torch.enable_grad():
        recon, x_hat, lo = torch.zeros((), device=x_bd.device), bd.expand_as(x_bd), 0
        for n in hp.prefixes:
            w = v if len(hp.prefixes) == 1 else v * ((cols >= lo) & (cols < n))
            x_hat = x_hat + F.embedding_bag(cols, W, offsets, mode="sum", per_sample_weights=w)
            recon = recon + (x_hat - x_bd).pow(2).mean()
            lo = n
        recon = recon / len(hp.prefixes)
        g_v, g_W, g_b = torch.autograd.grad(recon, (v, W, bd))
    return recon.detach(), x_hat.detach(), g_v, g_W, g_b


def _sparse_one(
    i: int, pre_bs: Tensor, params: dict[str, Tensor], x_bd: Tensor, x_c: Tensor, x_enc: Tensor,
    dead_s: Tensor | None, hp: Hyper, comm: Comm | None, W_low: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SAE i of a TopK/BatchTopK group: (grads, loss, l1, fired, aux, min_act, squared error summed).
    x_c: x - b_dec (float32); x_enc: the encoder's input, x_c in its first d columns (bfloat16 and folded under
    bf16 autocast: the compiled CPU passes gather it, in the encoder's precision); W_low: the encoder's bfloat16
    weights as latent rows ([W_enc | b_enc], (s, P)) where it ran in bfloat16."""
    rows, cols, vals, offsets = _select(pre_bs, hp.activation, hp.k, comm)
    if _compiled(x_bd, hp):
        grads, recon, recon_sq, fired, aux = _sparse_cpu(i, pre_bs, params, x_bd, x_enc, dead_s, hp, comm,
                                                         (rows, cols, vals, offsets), W_low)
    else:
        grads, recon, recon_sq, fired, aux = _sparse_torch(i, pre_bs, params, x_bd, x_c, dead_s, hp, comm,
                                                           (rows, cols, vals, offsets))
    min_act = x_bd.new_zeros(())
    if hp.activation == "batchtopk":  # the smallest code that fired (0 where none did), for the threshold's EMA
        least = torch.where(vals > 0, vals, float("inf")).min()
        min_act = least if bool(least.isfinite()) else min_act
    return grads, recon + aux, vals.sum() / len(x_bd), fired, aux, min_act, recon_sq


def _compiled(x_bd: Tensor, hp: Hyper) -> bool:
    """Whether a step runs the compiled CPU passes (`sparse_cpu`): a TopK/BatchTopK SAE without nested prefixes, on a
    CPU."""
    return hp.activation != "relu" and len(hp.prefixes) == 1 and not x_bd.is_cuda


Selected = tuple[Tensor, Tensor, Tensor, Tensor]  # (rows, cols, vals, offsets) as `_select` returns them
# (grads, the reconstruction loss, the whole reconstruction's squared error summed, fired, aux)
SparseOut = tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]


def _n_dead(dead_s: Tensor | None, hp: Hyper) -> int:
    return 0 if dead_s is None or hp.aux_coef <= 0 else int(dead_s.sum())


def _sparse_cpu(
    i: int, pre_bs: Tensor, params: dict[str, Tensor], x_bd: Tensor, x_enc: Tensor, dead_s: Tensor | None,
    hp: Hyper, comm: Comm | None, sel: Selected, W_low: Tensor | None = None,
) -> SparseOut:
    """One prefix on a CPU: the compiled row and latent passes of `sparse_cpu`, AuxK's entries added into the
    same gradients. bfloat16 gathers where the encoder ran in bfloat16, and dL/db_dec's encoder part (-dL/db_enc
    @ W_enc) a bfloat16 product with the encoder's own bfloat16 weights `W_low`, as autocast's backward of the
    encoder GEMM makes it (1.7 ms as a float32 GEMV inside the step, ~0.7 in bfloat16)."""
    rows, cols, vals, offsets = sel
    b, d = x_bd.shape
    s = pre_bs.shape[1]
    low = x_enc.dtype == torch.bfloat16
    W_dec = params["W_dec"][i].to(torch.bfloat16) if low else params["W_dec"][i]
    g_dtype = torch.bfloat16 if low else torch.float32
    off = torch.cat([offsets, offsets.new_tensor([len(cols)])])
    n_dead = _n_dead(dead_s, hp)
    sq, x_hat, g, g_vals, g_sum = sparse_cpu.decode(cols, vals, off, W_dec, params["b_dec"][i], x_bd,
                                                    2.0 / (b * d), n_dead > 0, g_dtype)
    g_W_dec, g_W_enc, g_b_enc, fired = sparse_cpu.weight_grads(rows, cols, vals, g_vals, g, x_enc, s)
    aux = x_bd.new_zeros(())
    if n_dead:
        assert dead_s is not None
        a_rows, a_cols, a_vals = _aux_select(pre_bs, dead_s, n_dead, hp)
        resid = x_bd - x_hat
        scale = hp.aux_coef * (comm.world if comm else 1) / centered_sq_sum(resid, comm).clamp_min(1e-12)
        a_off = torch.arange(0, len(a_cols) + 1, len(a_cols) // b)
        a_sq, _, a_g, a_gv, _ = sparse_cpu.decode(a_cols, a_vals, a_off, W_dec, torch.zeros(d), resid,
                                                  2.0 * float(scale), False, g_dtype)
        aux = scale * a_sq
        sparse_cpu.weight_grads(a_rows, a_cols, a_vals, a_gv, a_g, x_enc, s,
                                out=(g_W_dec, g_W_enc, g_b_enc, torch.zeros(s, dtype=torch.int64)))
    if W_low is None:
        g_b_dec = g_sum - g_b_enc @ params["W_enc"][i]  # W_enc rows: (s, d)
    else:
        g_b_dec = g_sum - torch.mm(g_b_enc.to(W_low.dtype)[None], W_low[:, :d])[0].float()
    grads = {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
    return grads, sq / x_bd.numel(), sq, fired.float(), aux


def _sparse_torch(
    i: int, pre_bs: Tensor, params: dict[str, Tensor], x_bd: Tensor, x_c_bd: Tensor, dead_s: Tensor | None,
    hp: Hyper, comm: Comm | None, sel: Selected,
) -> SparseOut:
    """On CUDA, or with nested prefixes: the decoder differentiated by autograd, the encoder's gradients by a
    CSR product."""
    rows, cols, vals, offsets = sel
    s = pre_bs.shape[1]
    W_dec = params["W_dec"][i]
    recon, x_hat, g_v, g_W_dec, g_b_dec = _autograd_sparse(cols, vals, offsets, W_dec, params["b_dec"][i], x_bd, hp)
    g_v = g_v * (vals > 0)
    g_W_enc, g_b_enc = _sparse_encoder_grads(g_v, rows, cols, x_c_bd, s)
    aux = x_bd.new_zeros(())
    n_dead = _n_dead(dead_s, hp)
    if n_dead:
        assert dead_s is not None
        resid = x_bd - x_hat.detach()
        aux, g_W_dec_aux, g_W_enc_aux, g_b_enc_aux = _auxk(pre_bs, dead_s, n_dead, resid, W_dec, x_c_bd, hp, comm)
        g_W_dec, g_W_enc, g_b_enc = g_W_dec + g_W_dec_aux, g_W_enc + g_W_enc_aux, g_b_enc + g_b_enc_aux
    g_b_dec = g_b_dec - g_b_enc @ params["W_enc"][i]
    fired = torch.bincount(cols[vals > 0], minlength=s).float()
    grads = {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}
    return grads, recon, (x_hat - x_bd).pow(2).sum(), fired, aux


def _aux_select(pre_bs: Tensor, dead_s: Tensor, n_dead: int, hp: Hyper) -> tuple[Tensor, Tensor, Tensor]:
    """AuxK's entries (rows, cols, vals after the ReLU): each row's k_aux largest among the dead latents."""
    k = min(hp.k_aux, n_dead)
    if 2 * n_dead <= len(dead_s):  # few dead latents: select among their columns only
        dead_idx = dead_s.nonzero().squeeze(1)
        vals, j = row_topk(pre_bs.index_select(1, dead_idx), k)
        cols = dead_idx[j]
    else:
        vals, cols = row_topk(torch.where(dead_s, pre_bs, torch.full_like(pre_bs, float("-inf"))), k)
    rows = torch.arange(len(pre_bs), device=pre_bs.device).repeat_interleave(k)
    return rows, cols.flatten(), torch.relu(vals.flatten().float())


def _auxk(
    pre_bs: Tensor, dead_s: Tensor, n_dead: int, resid_bd: Tensor, W_dec: Tensor, x_c_bd: Tensor, hp: Hyper,
    comm: Comm | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AuxK loss on the dead latents: (loss, grad_W_dec, grad_W_enc, grad_b_enc)."""
    rows, cols, vals = _aux_select(pre_bs, dead_s, n_dead, hp)
    b, k = len(pre_bs), len(cols) // len(pre_bs)
    v = vals.detach().requires_grad_()
    W = W_dec.detach().requires_grad_()
    with torch.enable_grad():
        e_hat = F.embedding_bag(
            cols, W, torch.arange(0, b * k, k, device=pre_bs.device), mode="sum", per_sample_weights=v
        )
        denom = centered_sq_sum(resid_bd, comm).clamp_min(1e-12)  # global under data parallelism (step_ref)
        aux = hp.aux_coef * (comm.world if comm else 1) * (e_hat - resid_bd).pow(2).sum() / denom
        g_v, g_W = torch.autograd.grad(aux, (v, W))
    g_W_enc, g_b_enc = _sparse_encoder_grads(g_v * (vals > 0), rows, cols, x_c_bd, pre_bs.shape[1])
    return aux.detach(), g_W, g_W_enc, g_b_enc


def _stack_view(ts: list[Tensor]) -> Tensor:
    """torch.stack of one tensor, as a view rather than a copy."""
    return ts[0][None]


def step(
    params: dict[str, Tensor], x_bd: Tensor, coef_m: Tensor, dead_ms: Tensor | None, hp: Hyper, bf16: bool = False,
    comm: Comm | None = None,
) -> StepOut:
    n_counted = len(x_bd)
    compiled = _compiled(x_bd, hp)
    if compiled:  # x - b_dec in the encoder's dtype and layout, and the FVU's denominator, in one pass
        x_c, var = sparse_cpu.encoder_input(x_bd, params["b_dec"], bf16, PAD)
    else:
        x_c = x_bd[None] - params["b_dec"][:, None, :]
        var = (x_bd - x_bd.mean(0)).pow(2).sum()
    var = var.clamp_min(1e-12)
    if hp.activation == "relu":
        grads, loss_m, x_hat, l1_m, fired, n_counted = _relu_step(params, x_bd, x_c, coef_m, hp, bf16)
        aux_m = min_act = torch.zeros_like(loss_m)
        sq_m = (x_hat - x_bd).pow(2).sum((1, 2))
    else:
        pre, x_enc, W_low = _encode(x_c, params, latent_rows=True, bf16=bf16, x_in=x_c if compiled else None)
        per = [
            _sparse_one(i, pre[i], params, x_bd, x_c[i], x_enc[i], None if dead_ms is None else dead_ms[i], hp, comm,
                        None if W_low is None else W_low[i])
            for i in range(len(pre))
        ]
        stack = _stack_view if len(per) == 1 else torch.stack
        grads = {n: stack([p[0][n] for p in per]) for n in params}
        rest = [p[1:] for p in per]
        loss_m, l1_m, fired, aux_m, min_act, sq_m = (stack([r[j] for r in rest]) for j in range(6))
    return StepOut(grads, loss_m, sq_m / x_bd.numel(), sq_m / var, l1_m, aux_m, fired, min_act, n_counted)
