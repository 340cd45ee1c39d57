"""`saevctl sae import` / `sae info`: saev sae.pt files built by hand (JSON line + torch.save of plain tensors),
SAELens and sparsify folders; imported SAEs must encode/decode exactly as the source's formulas say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.sae import SAE

D, S = 12, 48


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, S, generator=g),
        "b_enc": torch.randn(S, generator=g) * 0.1,
        "W_dec": torch.randn(S, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }


def _write_saev(fpath: Path, header: dict, state: object) -> Path:
    fpath.parent.mkdir(parents=True, exist_ok=True)
    with open(fpath, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save(state, f)
    return fpath


def _saev_header(act: dict) -> dict:
    return {"schema": 2, "cfg": {"d_vit": D, "exp_factor": S // D, "seed": 0, "activation": act}, "lib": "x"}


def test_saev_relu_import_matches_saev_formula(tmp_path: Path) -> None:
    w = _weights()
    src = _write_saev(tmp_path / "run" / "sae.pt", _saev_header({"cls": "Relu", "params": {}}), w)
    res = CliRunner().invoke(app, ["sae", "import", str(src), "--out", str(tmp_path / "ours"), "--layer", "7"])
    assert res.exit_code == 0, res.output
    sae = SAE.load(tmp_path / "ours")
    assert sae.cfg.activation == "relu" and sae.cfg.layer == 7 and sae.cfg.train["source_format"] == "saev"
    x = torch.randn(5, D)
    f_ref = torch.relu(x @ w["W_enc"] + w["b_enc"])  # saev encodes without subtracting b_dec
    torch.testing.assert_close(sae.encode(x), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f_ref), f_ref @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def test_saev_topk_and_legacy_headers(tmp_path: Path) -> None:
    src = _write_saev(tmp_path / "a.pt", _saev_header({"cls": "TopK", "params": {"top_k": 5}}), _weights(1))
    out = tmp_path / "a"
    assert CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(out)]).exit_code == 0
    sae = SAE.load(out)
    assert (sae.cfg.activation, sae.cfg.k) == ("topk", 5)
    assert int((sae.encode(torch.randn(3, D) * 5) > 0).sum(-1).max()) <= 5
    legacy = _write_saev(tmp_path / "b.pt", {"d_vit": D, "exp_factor": 4, "l1_coeff": 1e-3}, _weights(2))
    assert CliRunner().invoke(app, ["sae", "import", str(legacy), "-o", str(tmp_path / "b")]).exit_code == 0
    assert SAE.load(tmp_path / "b").cfg.activation == "relu"


class NotATensor:
    """Anything but tensors must never be unpickled."""

    def __init__(self) -> None:
        self.payload = "would run code on load"


def test_saev_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    src = _write_saev(tmp_path / "evil.pt", _saev_header({"cls": "Relu", "params": {}}), {"W_enc": NotATensor()})
    res = CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "cannot be read safely" in res.output and not (tmp_path / "x").exists()


def test_saev_file_without_header_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "raw.pt"
    torch.save(_weights(), src)
    res = CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "JSON header" in res.output


def test_saelens_folder(tmp_path: Path) -> None:
    w = _weights(3)
    src = tmp_path / "saelens"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": S, "architecture": "standard",
                                               "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    save_file(w, str(src / "sae_weights.safetensors"))
    assert CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "o")]).exit_code == 0
    sae = SAE.load(tmp_path / "o")
    x = torch.randn(4, D)
    torch.testing.assert_close(sae.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))


def test_sparsify_folder_topk(tmp_path: Path) -> None:
    w = _weights(4)
    src = tmp_path / "sparsify"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps({"k": 4, "num_latents": S}))
    save_file({"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(src / "sae.safetensors"))
    assert CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "o")]).exit_code == 0
    sae = SAE.load(tmp_path / "o")
    x = torch.randn(6, D)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(4, dim=-1)
    torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals)))


def test_unsupported_architecture_is_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "jump"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps({"architecture": "jumprelu"}))
    save_file(_weights(), str(src / "sae_weights.safetensors"))
    res = CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "jumprelu" in res.output and len(res.output.strip().splitlines()) == 1


def test_info_prints_architecture_shapes_and_provenance(tmp_path: Path) -> None:
    src = _write_saev(tmp_path / "sae.pt", _saev_header({"cls": "TopK", "params": {"top_k": 3}}), _weights())
    CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "o")])
    res = CliRunner().invoke(app, ["sae", "info", str(tmp_path / "o")], terminal_width=200)
    assert res.exit_code == 0, res.output
    for text in ("topk (k=3)", f"d={D}, latents={S}", "none (identity)", "saev from"):
        assert text in res.output


@pytest.mark.parametrize("what", ["missing", "not-a-checkpoint"])
def test_info_errors(tmp_path: Path, what: str) -> None:
    path = tmp_path / "nothing"
    if what == "not-a-checkpoint":
        path.mkdir()
        (path / "readme.txt").write_text("hi")
    res = CliRunner().invoke(app, ["sae", "info", str(path)])
    assert res.exit_code == 2 and "is not an SAE checkpoint" in res.output
