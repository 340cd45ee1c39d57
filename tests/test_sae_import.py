"""`saevctl sae import` / `sae info`: imported SAEs must encode/decode exactly as the real packages do (fixtures in
tests/data written by saev, SAELens and sparsify themselves, see the make_*_fixture.py scripts there), plus saev
sae.pt files built by hand (JSON line + torch.save of plain tensors) for the header variants and refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.sae import SAE
from saevctl.sae.convert import import_sae

D, S = 12, 48
DATA = Path(__file__).resolve().parent / "data"
TOL = {"rtol": 1e-5, "atol": 1e-5}


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


# (fixture folder, source format, our activation, source version recorded)
REAL = [
    ("saev-0.1.0", "saev", "relu", "saev 0.1.0 (no header schema)"),
    ("saev-d991de3/relu", "saev", "relu", "schema 1, lib 0.1.0"),
    ("saev-d991de3/topk", "saev", "topk", "schema 1, lib 0.1.0"),
    ("saev-3d73f1f/relu", "saev", "relu", "schema 5, lib 0.1.0"),
    ("saev-3d73f1f/topk", "saev", "topk", "schema 5, lib 0.1.0"),
    ("saev-3d73f1f/batchtopk", "saev", "batchtopk", "schema 5, lib 0.1.0"),
    ("saelens-6.54.12/standard", "saelens", "relu", "6.54.12"),
    ("saelens-6.54.12/standard-no-bdec-in", "saelens", "relu", "6.54.12"),
    ("saelens-6.54.12/topk", "saelens", "topk", "6.54.12"),
    ("saelens-6.54.12/topk-rescaled", "saelens", "topk", "6.54.12"),
]


@pytest.mark.parametrize(("rel", "fmt", "act", "version"), REAL, ids=[r[0] for r in REAL])
def test_import_matches_the_real_package(tmp_path: Path, rel: str, fmt: str, act: str, version: str) -> None:
    exp = load_file(str(DATA / rel / "expected.safetensors"))
    sae = SAE.load(import_sae(DATA / rel, tmp_path / "o"))
    assert (sae.cfg.activation, sae.cfg.train["source_format"], sae.cfg.train["source_version"]) == (act, fmt, version)
    if act == "topk":  # saev keeps negative top-k values, ours (and SAELens's) zero them: the fixtures have none
        assert int((exp["codes"] < 0).sum()) == 0
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(exp["x"]), exp["codes"], **TOL)
        torch.testing.assert_close(sae.decode(exp["codes"]), exp["x_hat"], **TOL)
        torch.testing.assert_close(sae(exp["x"]).x_hat, exp["x_hat"], **TOL)


def test_sparsify_import_matches_sparsify(tmp_path: Path) -> None:
    src = DATA / "sparsify-1.3.3" / "topk"
    exp = load_file(str(src / "expected.safetensors"))
    sae = SAE.load(import_sae(src, tmp_path / "o"))
    assert (sae.cfg.activation, sae.cfg.k, sae.cfg.train["source_format"]) == ("topk", 8, "sparsify")
    codes = torch.zeros(len(exp["x"]), sae.cfg.n_latents).scatter(-1, exp["top_indices"], exp["top_acts"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(exp["x"]), codes, **TOL)
        torch.testing.assert_close(sae.decode(codes), exp["x_hat"], **TOL)


def test_saev_0_1_0_import_via_cli_records_layer_and_source(tmp_path: Path) -> None:
    src = DATA / "saev-0.1.0" / "sae.pt"
    res = CliRunner().invoke(app, ["sae", "import", str(src), "--out", str(tmp_path / "ours"), "--layer", "7"])
    assert res.exit_code == 0, res.output
    sae = SAE.load(tmp_path / "ours")
    assert sae.cfg.activation == "relu" and sae.cfg.layer == 7 and sae.cfg.train["source_format"] == "saev"
    exp = load_file(str(DATA / "saev-0.1.0" / "expected.safetensors"))
    with torch.no_grad():  # saev 0.1.0 encodes (x - b_dec) W_enc + b_enc
        torch.testing.assert_close(sae.encode(exp["x"]), exp["codes"], **TOL)
    res = CliRunner().invoke(app, ["sae", "info", str(tmp_path / "ours")], terminal_width=200)
    assert res.exit_code == 0 and "saev 0.1.0 (no header schema)" in res.output, res.output


def test_saev_schema1_commits_that_stopped_subtracting_b_dec(tmp_path: Path) -> None:
    """A few 2025-07-31 saev commits wrote schema 1 without subtracting b_dec; their header's commit says so."""
    lines = (DATA / "saev-d991de3" / "relu" / "sae.pt").read_bytes().split(b"\n", 1)
    header = json.loads(lines[0]) | {"commit": "9f39cf8"}
    src = tmp_path / "sae.pt"
    src.write_bytes((json.dumps(header) + "\n").encode() + lines[1])
    sae = SAE.load(import_sae(src, tmp_path / "o"))
    w = torch.load(io.BytesIO(lines[1]), weights_only=True)
    x = load_file(str(DATA / "saev-d991de3" / "relu" / "expected.safetensors"))["x"]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), torch.relu(x @ w["W_enc"] + w["b_enc"]), **TOL)


def test_unknown_saev_schema_is_refused(tmp_path: Path) -> None:
    src = _write_saev(tmp_path / "sae.pt", {"schema": 99, "cfg": {"activation": {"cls": "Relu"}}}, _weights())
    res = CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "schema 99" in res.output


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


def test_saelens_per_token_normalisation_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "ln"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps({"architecture": "standard", "normalize_activations": "layer_norm"}))
    save_file(_weights(), str(src / "sae_weights.safetensors"))
    res = CliRunner().invoke(app, ["sae", "import", str(src), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "layer_norm" in res.output and not (tmp_path / "o").exists()
