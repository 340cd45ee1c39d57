"""The fast paths of `eval all`: the vectorised Moran's I equals the per-map one (and the known answers), the SAE's
fast encoder equals `encode` bit for bit, and the ViT passes shared between SAEs change no number."""

from __future__ import annotations

import pytest
import torch

from saevctl.eval.moran import morans_i, morans_i_grid, rook_degrees
from saevctl.eval.passes import Passes
from saevctl.eval.splice import SpliceConfig, run_splice
from saevctl.sae import SAE, SAEConfig


def per_map(codes_bps: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: `morans_i` on each (image, feature) map."""
    b, _p, s = codes_bps.shape
    i, d = morans_i(codes_bps.permute(0, 2, 1).reshape(b * s, h, w))
    return i.reshape(b, s), d.reshape(b, s)


@pytest.mark.parametrize(("h", "w", "density"), [(4, 4, 0.1), (5, 7, 0.3), (2, 3, 1.0), (16, 16, 0.05)])
def test_vectorised_moran_equals_per_map(h, w, density):
    gen = torch.Generator().manual_seed(h * w)
    b, s = 3, 50
    codes = torch.rand(b, h * w, s, generator=gen) * (torch.rand(b, h * w, s, generator=gen) < density)
    i, defined = morans_i_grid(codes, h, w)
    ref_i, ref_defined = per_map(codes, h, w)
    assert torch.equal(defined, ref_defined)
    assert defined.any()
    torch.testing.assert_close(i, ref_i.double(), atol=1e-5, rtol=0)


def test_vectorised_moran_known_answers():
    h, w = 6, 5
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    maps = torch.zeros(1, h * w, 6)
    maps[0, :, 0] = ((r + c) % 2).float().reshape(-1)  # checkerboard: -1
    maps[0, :, 1] = 2.5  # flat: undefined
    # feature 2 silent: undefined
    maps[0, :, 3] = (r < h // 2).float().reshape(-1)  # two halves: smooth, strongly positive
    maps[0, 7, 4] = 1.0  # one hot cell: its edges against the zero mean
    maps[0, :, 5] = -(r * w + c).float().reshape(-1)  # negative values count as well
    i, defined = morans_i_grid(maps, h, w)
    ref_i, ref_defined = per_map(maps, h, w)
    assert defined[0].tolist() == [True, False, False, True, True, True]
    assert i[0, 0].item() == pytest.approx(-1.0)
    assert i[0, 3].item() > 0.7
    torch.testing.assert_close(i, ref_i.double(), atol=1e-6, rtol=0)
    assert torch.equal(defined, ref_defined)


def test_rook_degrees():
    assert rook_degrees(3, 4).reshape(3, 4).tolist() == [[2, 3, 3, 2], [3, 4, 4, 3], [2, 3, 3, 2]]
    assert float(rook_degrees(5, 7).sum()) == 2 * (5 * 6 + 7 * 4)


@pytest.mark.parametrize(("activation", "k"), [("relu", 0), ("topk", 5), ("batchtopk", 5)])
def test_fast_encoder_equals_encode(activation, k):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(12, 40, activation=activation, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.threshold.fill_(0.2)
        sae.set_normalization(torch.randn(200, 12) * 3 + 1)
    x = torch.randn(64, 12) * 3 + 1
    enc, buf = sae.encoder(), torch.full((64, 40), float("nan"))
    ref = sae.encode(x)
    assert (ref > 0).any() and (ref == 0).any()
    assert torch.equal(enc(x), ref)
    for _ in range(2):  # the reused buffer, dirty from the last call
        out = enc(x, out=buf)
        assert out.data_ptr() == buf.data_ptr()
        assert torch.equal(out, ref)


def test_passes_keep_within_their_budget():
    made: list[int] = []

    def make() -> torch.Tensor:
        made.append(1)
        return torch.zeros(256)  # 1 KiB

    kept = Passes(budget_bytes=1024)
    assert kept.get(("a",), make) is kept.get(("a",), make) and len(made) == 1
    kept.get(("b",), make), kept.get(("b",), make)  # over the budget: made each time
    assert len(made) == 3 and kept.held_bytes == 1024
    none = Passes(0)
    none.get(("a",), make), none.get(("a",), make)
    assert len(made) == 5 and none.held_bytes == 0


def test_shared_passes_change_no_splice_number(tiny_vit, image_dir, tmp_path):
    """A second SAE on the same images, backbone and head reuses the original and ablated passes (the memo gets no
    new entry) and scores exactly as it does on its own."""
    from saevctl.edit.heads import describe_model, resolve_head
    from saevctl.edit.session import Prober
    from saevctl.vit import load_backbone

    bb = load_backbone(tiny_vit)
    head = resolve_head("timm", bb, None)
    torch.manual_seed(1)
    saes = []
    for noise in (0.0, 0.3):
        sae = SAE(SAEConfig(bb.d_model, 2 * bb.d_model, model=describe_model(bb), layer=1))
        eye = torch.eye(bb.d_model)
        with torch.no_grad():
            sae.W_enc.copy_(torch.cat([eye, -eye], 1) + noise * torch.randn(bb.d_model, 2 * bb.d_model))
            sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        saes.append((sae.eval(), sae.save(tmp_path / f"sae{noise}")))

    def score(i: int, passes: Passes | None) -> list[dict[str, object]]:
        sae, ckpt = saes[i]
        cfg = SpliceConfig(images=str(image_dir), sae=ckpt, head="timm", out=tmp_path / f"s{i}.json", device="cpu",
                           n_boot=50)
        return run_splice(cfg, prober=Prober(sae, bb, head), passes=passes).rows

    shared = Passes()
    first = score(0, shared)
    n_kept = len(shared)
    second = score(1, shared)
    assert n_kept > 0 and len(shared) == n_kept  # all reused
    assert first == score(0, None) and second == score(1, None)
    assert first != second  # the SAEs differ, and so do their spliced scores
