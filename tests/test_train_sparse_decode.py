"""The one-prefix sparse decoder's hand gradients (SDDMM for the selected values) equal autograd's, for TopK's
k-per-row codes and BatchTopK's ragged rows (some rows empty), with zero-valued selections included."""

from __future__ import annotations

import pytest
import torch

from saevctl.train import step_fast
from saevctl.train.step_ref import Hyper


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_hand_sparse_decoder_matches_autograd(activation: str) -> None:
    gen = torch.Generator().manual_seed(0)
    b, d, s, k = 24, 16, 96, 5
    pre = torch.randn(b, s, generator=gen, dtype=torch.float64)
    pre[3] -= 50.0  # BatchTopK gives this row no latents; TopK gives it zeros after the ReLU
    W_dec = torch.randn(s, d, generator=gen, dtype=torch.float64)
    b_dec, x = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(b, d, generator=gen, dtype=torch.float64)
    rows, cols, vals, offsets = step_fast._select(pre, activation, k, None)
    vals = vals.double()
    assert activation == "batchtopk" or bool((vals == 0).any())
    lay = step_fast._by_latent(rows, cols, s)
    got = step_fast._sparse_decode(cols, vals, offsets, W_dec, b_dec, x, lay)
    hp = Hyper(activation, k, (s,), 0.0, 0)
    want = step_fast._autograd_sparse(cols, vals, offsets, W_dec, b_dec, x, hp)
    for name, g, w in zip(("recon", "x_hat", "g_vals", "g_W_dec", "g_b_dec"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
    assert float(want[2].abs().max()) > 0  # the value gradients are not trivially zero


@pytest.mark.parametrize("bf16", [False, True])
def test_blocked_topk_selects_what_the_whole_batch_selects(bf16: bool) -> None:
    """GEMM + top-k in row blocks (3 here, the last partial) picks the same values as top-k over the whole
    autocast GEMM, for TopK and AuxK's dead-latent selection; indices agree up to ties (checked by value)."""
    gen = torch.Generator().manual_seed(1)
    b, d, s, k, k_aux = 2 * step_fast.BLOCK_ROWS + 37, 24, 200, 6, 9
    x_c, W_enc = torch.randn(b, d, generator=gen), torch.randn(s, d, generator=gen)
    b_enc, dead = torch.randn(s, generator=gen), torch.rand(s, generator=gen) < 0.2
    with step_fast._autocast(x_c, bf16):
        pre = torch.addmm(b_enc, x_c, W_enc.t())
    (vals, cols), aux = step_fast._blocked_topk(x_c, W_enc, b_enc, k, dead, k_aux, bf16)
    assert aux is not None and vals.dtype == pre.dtype
    for (v, c), want in (
        ((vals, cols), pre.topk(k, -1)[0]),
        (aux, step_fast._aux_select(pre, dead, k_aux)[0].sort(-1, descending=True)[0]),
    ):
        torch.testing.assert_close(v.sort(-1, descending=True)[0], want, rtol=0, atol=0)
        torch.testing.assert_close(pre.gather(1, c), v, rtol=0, atol=0)  # the indices point at those values
    assert bool(dead[aux[1]].all())
