"""The compiled sparse passes of the CPU TopK/BatchTopK step (saevctl.train.sparse_cpu) against autograd in
float64: the loss, x_hat and every gradient, for TopK's k-per-row codes and BatchTopK's ragged rows (some rows
empty, odd counts), with zero-valued selections included; and the bfloat16 gathers close to float32."""

from __future__ import annotations

import pytest
import torch

from saevctl.train import sparse_cpu, step_fast
from saevctl.train.step_ref import Hyper


def _case(activation: str, b: int = 24, d: int = 37, s: int = 96, k: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(b, s, generator=gen)
    pre[3] -= 50.0  # BatchTopK gives this row no latents; TopK gives it zeros after the ReLU
    rows, cols, vals, offsets = step_fast._select(pre, activation, k, None)
    assert activation == "batchtopk" or bool((vals == 0).any())
    return {
        "rows": rows, "cols": cols, "vals": vals, "offsets": offsets,
        "off": torch.cat([offsets, offsets.new_tensor([len(cols)])]),
        "W_dec": torch.randn(s, d, generator=gen), "b_dec": torch.randn(d, generator=gen),
        "x": torch.randn(b, d, generator=gen), "x_c": torch.randn(b, d, generator=gen),
    }


def _reference(c: dict[str, torch.Tensor], activation: str) -> dict[str, torch.Tensor]:
    """Autograd in float64: the loss mean((x_hat - x)^2), x_hat = b_dec + sum v W_dec[col]; dL/dW_enc and
    dL/db_enc as the encoder's backward through the selected pre-activations (zero where the ReLU zeroed)."""
    s, d = c["W_dec"].shape
    b = len(c["x"])
    W, bd, v = (c[n].double().requires_grad_() for n in ("W_dec", "b_dec", "vals"))
    hp = Hyper(activation, 5, (s,), 0.0, 0)
    recon, x_hat, g_v, g_W, g_b = step_fast._autograd_sparse(c["cols"], v, c["offsets"], W, bd, c["x"].double(), hp)
    g_v = g_v * (c["vals"] > 0)
    G = torch.zeros(b, s, dtype=torch.float64).index_put_((c["rows"], c["cols"]), g_v, accumulate=True)
    return {"sq": recon * b * d, "x_hat": x_hat, "g_vals": g_v, "g_W_dec": g_W, "g_sum": g_b,
            "g_W_enc": G.t() @ c["x_c"].double(), "g_b_enc": G.sum(0),
            "fired": torch.bincount(c["cols"][c["vals"] > 0], minlength=s).double()}


def _compiled(c: dict[str, torch.Tensor], low: bool) -> dict[str, torch.Tensor]:
    b, d = c["x"].shape
    s = len(c["W_dec"])
    cast = (lambda t: t.bfloat16()) if low else (lambda t: t)
    g_dtype = torch.bfloat16 if low else torch.float32
    sq, x_hat, g, g_vals, g_sum = sparse_cpu.decode(c["cols"], c["vals"], c["off"], cast(c["W_dec"]), c["b_dec"],
                                                    c["x"], 2.0 / (b * d), True, g_dtype)
    # the encoder's input as the bf16 step passes it: folded, wider than d
    x_enc = torch.cat([c["x_c"], torch.ones(b, 1), torch.zeros(b, 10)], 1)
    g_W_dec, g_W_enc, g_b_enc, fired = sparse_cpu.weight_grads(c["rows"], c["cols"], c["vals"], g_vals, g,
                                                               cast(x_enc), s)
    return {"sq": sq, "x_hat": x_hat, "g_vals": g_vals, "g_W_dec": g_W_dec, "g_sum": g_sum, "g_W_enc": g_W_enc,
            "g_b_enc": g_b_enc, "fired": fired}


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_compiled_sparse_passes_match_autograd(activation: str) -> None:
    c = _case(activation)
    want = _reference(c, activation)
    got = _compiled(c, low=False)
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w.detach(), rtol=2e-5, atol=2e-6, msg=name)
    assert float(want["g_vals"].abs().max()) > 0 and float(want["g_W_enc"].abs().max()) > 0  # not trivially zero


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_bfloat16_gathers_stay_close_to_float32(activation: str) -> None:
    c = _case(activation, b=64, d=64, s=256, k=8)
    f32, bf = _compiled(c, low=False), _compiled(c, low=True)
    for name in f32:
        rel = float((bf[name].float() - f32[name].float()).norm() / f32[name].float().norm())
        assert rel < 2e-2, (name, rel)  # bfloat16 operands, float32 sums
    assert torch.equal(bf["fired"], f32["fired"])


def test_accumulating_adds_onto_the_given_gradients() -> None:
    c = _case("topk")
    s = len(c["W_dec"])
    _, _, g, g_vals, _ = sparse_cpu.decode(c["cols"], c["vals"], c["off"], c["W_dec"], c["b_dec"], c["x"],
                                           1.0, False, torch.float32)
    once = sparse_cpu.weight_grads(c["rows"], c["cols"], c["vals"], g_vals, g, c["x_c"], s)
    base = tuple(t.clone() for t in once)
    twice = sparse_cpu.weight_grads(c["rows"], c["cols"], c["vals"], g_vals, g, c["x_c"], s, out=base)
    for a, t in zip(once, twice, strict=True):
        torch.testing.assert_close(t, 2 * a)


@pytest.mark.parametrize("bf16", [False, True])
def test_encoder_input_is_x_minus_b_dec_and_the_centred_sum_of_squares(bf16: bool) -> None:
    """One pass gives every SAE's encoder input (bfloat16: folded [x - b_dec | 1 | 0 ...]) and the batch's centred
    sum of squares, exact in float64 even where the activations' mean dwarfs their spread (a ViT's outlier
    dimensions)."""
    gen = torch.Generator().manual_seed(5)
    b, d, m = 300, 37, 3
    x = torch.randn(b, d, generator=gen) * 0.01 + torch.linspace(-400, 400, d)
    b_dec = torch.randn(m, d, generator=gen) * 5
    x_enc, var = sparse_cpu.encoder_input(x, b_dec, bf16, 16)
    want = (x.double() - x.double().mean(0)).pow(2).sum()
    torch.testing.assert_close(var.double(), want, rtol=1e-5, atol=0)
    centred = x[None] - b_dec[:, None, :]
    if not bf16:
        assert x_enc.dtype == torch.float32 and torch.equal(x_enc, centred)
        return
    assert x_enc.dtype == torch.bfloat16 and x_enc.shape == (m, b, 48)
    assert torch.equal(x_enc[..., :d], centred.bfloat16())
    assert bool((x_enc[..., d] == 1).all()) and bool((x_enc[..., d + 1:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_by_row_is_the_sorted_selection_up_to_order_within_a_row(dtype: torch.dtype) -> None:
    """BatchTopK's CSR on a CPU (a counting sort) against the sort it replaced: the same rows and offsets, each
    row's (col, value) pairs the same set, in the selection's order; the ReLU applied, NaN kept; empty rows."""
    gen = torch.Generator().manual_seed(3)
    b, s = 9, 40
    flat = torch.randperm(b * s, generator=gen)[:70]
    flat = flat[flat // s != 4]  # row 4 selects nothing
    vals = torch.randn(len(flat), generator=gen).to(dtype)
    vals[5] = float("nan")
    rows, cols, got, offsets = sparse_cpu.by_row(flat, vals, b, s)
    order = flat.sort().indices
    ref_rows = flat[order] // s
    assert torch.equal(rows, ref_rows)
    counts = torch.bincount(ref_rows, minlength=b)
    assert counts[4] == 0
    assert torch.equal(offsets, torch.cumsum(counts, 0) - counts)
    assert got.dtype == torch.float32
    for r in range(b):
        lo, hi = int(offsets[r]), int(offsets[r]) + int(counts[r])
        mine = sorted(zip(cols[lo:hi].tolist(), got[lo:hi].tolist(), strict=True))
        mask = flat // s == r
        want = sorted(zip((flat[mask] % s).tolist(), torch.relu(vals[mask].float()).tolist(), strict=True))
        assert [c for c, _ in mine] == [c for c, _ in want]
        torch.testing.assert_close(torch.tensor([v for _, v in mine]), torch.tensor([v for _, v in want]),
                                   rtol=0, atol=0, equal_nan=True)
        # within a row, the given (selection) order
        assert (cols[lo:hi] == flat[mask] % s).all()
