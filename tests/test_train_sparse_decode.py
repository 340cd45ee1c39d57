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
