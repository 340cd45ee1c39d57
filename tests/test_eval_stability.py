"""`saevctl eval stability`: one-to-one matching of SAE directions across seeds and widths, on tiny SAEs built
directly (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.errors import MismatchError
from saevctl.eval.config import StabilityConfig
from saevctl.eval.stability import StabilityResult, run_stability
from saevctl.sae import SAE, SAEConfig

D = 16
MODEL = {"spec": "tiny", "weights_sha256": "abc"}


def _sae(n: int, seed: int, d: int = D, model: dict[str, str] | None = None) -> SAE:
    torch.manual_seed(seed)
    return SAE(SAEConfig(d, n, model=model or MODEL, layer=3))


def _run(tmp_path: Path, *saes: Path) -> StabilityResult:
    return run_stability(StabilityConfig(saes=saes, out=tmp_path / "out"))


def test_identical_and_permuted_match_fully(tmp_path: Path) -> None:
    a = _sae(32, 0)
    a.act_scale.fill_(3.0)  # a scalar scale: directions in raw space are the stored ones
    b = _sae(32, 0)
    b.act_scale.fill_(0.5)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        b.W_dec.copy_(a.W_dec[perm])
        b.W_enc.copy_(a.W_enc[:, perm] * 2)  # a scaled encoder is the same direction
    res = _run(tmp_path, a.save(tmp_path / "a"), a.save(tmp_path / "a2"), b.save(tmp_path / "b"))
    assert len(res.pairs) == 3
    for p in res.pairs:
        assert p.dec[">0.9"] == 1.0 and p.dec[">0.7"] == 1.0, p
        assert p.enc[">0.9"] == 1.0 and p.enc[">0.7"] == 1.0, p
        assert p.nested is None


def test_independent_random_saes_share_almost_nothing(tmp_path: Path) -> None:
    res = _run(tmp_path, _sae(32, 0).save(tmp_path / "a"), _sae(32, 1).save(tmp_path / "b"))
    (p,) = res.pairs
    assert p.dec[">0.9"] <= 0.05 and p.enc[">0.9"] <= 0.05


def test_wide_sae_containing_the_narrow_one_covers_it(tmp_path: Path) -> None:
    narrow, wide = _sae(8, 0), _sae(32, 1)
    with torch.no_grad():
        wide.W_dec[5:13] = narrow.W_dec
        wide.W_enc[:, 5:13] = narrow.W_enc
    res = _run(tmp_path, narrow.save(tmp_path / "narrow"), wide.save(tmp_path / "wide"))
    (p,) = res.pairs
    assert p.dec[">0.9"] == 1.0 and p.enc[">0.9"] == 1.0
    assert p.nested["narrow"] == "narrow" and p.nested["wide"] == "wide"
    assert p.nested["mean"] >= 1.0 and sum(p.nested["histogram"].values()) == 8
    assert len(p.matched_dec) == 8


def test_refuses_other_width_or_model(tmp_path: Path) -> None:
    a = _sae(8, 0).save(tmp_path / "a")
    with pytest.raises(MismatchError, match="d=8"):
        _run(tmp_path, a, _sae(8, 0, d=8).save(tmp_path / "b"))
    with pytest.raises(MismatchError, match="another model"):
        _run(tmp_path, a, _sae(8, 0, model={"spec": "other", "weights_sha256": "x"}).save(tmp_path / "c"))


def test_cli_writes_png_and_json(tmp_path: Path) -> None:
    a, b = _sae(8, 0).save(tmp_path / "a"), _sae(16, 1).save(tmp_path / "b")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["eval", "stability", str(a), str(b), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "stability.json").read_text())
    assert [s["n_latents"] for s in summary["saes"]] == [8, 16]
    assert summary["pairs"][0]["nested"]["narrow"] == "a"
    assert str(out / "stability.json") in r.output.replace("\n", "") and "stability.png" in r.output


@pytest.mark.parametrize("args", [[], ["only-one"]])
def test_cli_needs_two_saes(tmp_path: Path, args: list[str]) -> None:
    r = CliRunner().invoke(app, ["eval", "stability", *args, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "needs two or more SAEs" in r.output
    assert not (tmp_path / "out").exists()


def test_exemplar_overlap_of_matched_features_from_a_mined_index(tiny_store: Path, tmp_path: Path) -> None:
    """A permuted copy of an SAE fires on the same images feature for feature: every matched pair's top exemplars
    coincide (Jaccard 1), while random pairs of features share fewer; an SAE missing from the index is named."""
    from saevctl.mine import Config as MineConfig
    from saevctl.mine import run as mine

    from test_mine import make_sae

    sae = make_sae(tiny_store, tmp_path / "a", n_latents=24)
    a = sae.save(tmp_path / "a")
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    b = sae.save(tmp_path / "b")
    index = tmp_path / "ix.duckdb"
    for ckpt in (a, b):
        mine(MineConfig(sae=ckpt, store=tiny_store, index=index, device="cpu", top_k=3, set_defaults=False))
    res = run_stability(StabilityConfig(saes=(a, b), out=tmp_path / "out", index=index))
    ex = res.pairs[0].exemplars
    assert ex is not None and res.exemplar_note is None
    assert ex["n_matched"] > 0 and ex["jaccard_matched"] == pytest.approx(1.0)
    assert ex["jaccard_random"] < 0.9
    other = _sae(24, 5, d=open_d(tiny_store), model=sae.cfg.model).save(tmp_path / "c")
    res = run_stability(StabilityConfig(saes=(a, other), out=tmp_path / "out2", index=index))
    assert res.pairs[0].exemplars is None and res.exemplar_note and "not mined" in res.exemplar_note
    assert json.loads(res.summary.read_text())["exemplar_note"] == res.exemplar_note


def open_d(store: Path) -> int:
    from saevctl.store import open_store

    return open_store(store).d
