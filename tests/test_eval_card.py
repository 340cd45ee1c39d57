"""`saevctl eval recon|all` and the report card: streamed reconstruction equals the in-memory figures, `eval all`
runs what its inputs allow and says why it skipped the rest, the whole labelled path (extract --masks, mine,
features label, eval all, report) fills every section and the report links the card, which opens in headless
Chromium without a console error and shows hostile names as text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.eval.recon import ReconConfig, run_recon
from saevctl.sae import SAE
from saevctl.vit import load_backbone

from test_eval_edits import LAYER, seg, seg_head  # noqa: F401  (shared fixtures)
from test_eval_splice import identity_sae
from test_probe_edit import make_sae

EVIL = 'sae<script>alert(1)<img src=x onerror=alert(2)>"&amp;'  # a checkpoint folder name (no slash)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args: object) -> str:
    r = invoke(*args)
    assert r.exit_code == 0, f"{args}: {r.output}"
    return r.output


@pytest.fixture(scope="module")
def tiny_bb(tiny_vit):
    return load_backbone(tiny_vit)


def test_recon_streamed_equals_in_memory(tiny_bb, tiny_store, tmp_path):
    from saevctl.store import open_store

    sae = make_sae(tiny_bb, layer=LAYER, n_latents=48)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # dead
        sae.b_enc[8:16] = -6.0  # rare: some fire on under 1% of the tokens
    ckpt = sae.save(tmp_path / "sae")
    res = run_recon(ReconConfig(sae=ckpt, store=tiny_store, out=tmp_path / "r.json", device="cpu", batch_tokens=20))
    x = torch.from_numpy(open_store(tiny_store).layer(LAYER).patches[:]).reshape(-1, tiny_bb.d_model).float()
    sae = SAE.load(ckpt)
    with torch.no_grad():
        codes = sae.encode(x)
        err = sae.decode(codes) - x
    assert res.n_tokens == len(x) == 12 * 16
    assert res.mse == pytest.approx(float((err * sae.act_scale).pow(2).mean()), rel=1e-4)
    assert res.nmse == pytest.approx(float(err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-4)
    assert res.l0 == pytest.approx(float((codes > 0).sum(1).float().mean()), rel=1e-6)
    rate = (codes > 0).float().mean(0)
    assert res.dead == pytest.approx(float((rate == 0).float().mean()))
    assert res.dense == pytest.approx(float((rate > 0.01).float().mean()))
    assert res.dead >= 8 / 48 and 0 < res.dense < 1 and res.nmse > 0.01  # the figures are not trivial
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["format"] == "saevctl-eval-recon" and summary["l0"] == pytest.approx(res.l0)


def test_all_runs_what_applies_and_says_why_not(tiny_bb, tiny_store, image_dir, tmp_path):
    ckpt = identity_sae(tiny_bb).save(tmp_path / "identity")
    out = tmp_path / "card"
    text = _ok("eval", "all", "--sae", ckpt, "--store", tiny_store, "--images", image_dir, "--head", "timm",
               "--n-boot", "50", "--out", out)
    assert "SAE report card" in text and "skipped coverage:" in text and "skipped edits: no --masks" in text
    card = json.loads(layout.eval_card_json_fpath(out).read_text())
    assert card["format"] == "saevctl-eval-card" and card["schema_version"] == layout.EVAL_SCHEMA
    recon, splice = card["sections"]["recon"], card["sections"]["splice"]
    assert recon["nmse"] < 1e-10 and recon["l0"] == pytest.approx(tiny_bb.d_model, rel=0.01)  # exact reconstruction
    assert splice["metrics"][0]["spliced"]["mean"] == 1.0 and splice["mean_source"].startswith("the store")
    assert card["sections"]["coverage"] is None and card["skipped"]["coverage"].startswith("no mined index")
    html = layout.eval_card_fpath(out).read_text()
    assert "Not evaluated: no --masks." in html and "Content-Security-Policy" in html and "<script" not in html
    for name in ("recon", "splice", "coverage", "edits"):
        assert (out / f"{name}.json").is_file() == (name in ("recon", "splice"))
    # Only the SAE: reconstruction on its training store would need the store; here it is given.
    text = _ok("eval", "all", "--sae", ckpt, "--store", tiny_store, "--out", tmp_path / "only")
    assert "skipped splice: no --images" in text


def test_all_errors_are_one_line(tiny_bb, tmp_path):
    ckpt = identity_sae(tiny_bb).save(tmp_path / "identity")
    r = invoke("eval", "all", "--sae", ckpt, "--index", tmp_path / "nope.duckdb")
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: mined index {tmp_path / 'nope.duckdb'} does not exist. Run saevctl mine first, or fix --index."]


@pytest.fixture(scope="module")
def labelled_path(seg, seg_head, tiny_vit, tmp_path_factory):
    """A detector SAE whose feature 0 fires exactly where the segment head predicts 'square' (its encoder column is the
    head's square-minus-background direction), taken through extract --masks, mine, features label, eval all, report."""
    from safetensors.torch import load_file

    images, masks = seg
    root = tmp_path_factory.mktemp("labelled")
    bb = load_backbone(tiny_vit)
    w = load_file(str(seg_head / "head.safetensors"))
    u, c = w["weight"][2] - w["weight"][1], float(w["bias"][2] - w["bias"][1])
    sae = make_sae(bb, layer=LAYER)
    with torch.no_grad():
        sae.W_enc[:, 0] = u
        sae.b_enc[0] = float(sae.act_scale) * (float(u @ sae.act_mean) + c)
        sae.W_dec[0] = u / u.norm()
    ckpt = sae.save(root / EVIL)
    store, index = root / "store", root / "index.duckdb"
    _ok("extract", "--model", tiny_vit, "--images", images, "--masks", masks, "--layers", LAYER, "--out", store,
        "--device", "cpu", "--dtype", "float32")
    _ok("mine", "--sae", ckpt, "--store", store, "--index", index)
    _ok("features", "label", "--index", index, "--sae", ckpt)
    text = _ok("eval", "all", "--sae", ckpt, "--store", store, "--head", seg_head, "--images", images, "--masks", masks,
               "--index", index, "--n-boot", "100")
    _ok("report", "--index", index, "--out", root / "report")
    return {"root": root, "ckpt": ckpt, "index": index, "text": text, "report": root / "report"}


def test_labelled_path_fills_every_section_and_report_links_card(labelled_path):
    text, index = labelled_path["text"], labelled_path["index"]
    assert "skipped" not in text
    card_line = next(line for line in text.splitlines() if line.startswith("card: "))
    card_fpath = Path(card_line.removeprefix("card: "))
    assert card_fpath.parent.parent == index.with_name(index.name + ".eval")  # beside the index
    card = json.loads(layout.eval_card_json_fpath(card_fpath.parent).read_text())
    assert all(card["sections"][k] is not None for k in ("recon", "splice", "coverage", "edits")), card["skipped"]
    assert card["sections"]["coverage"]["n_classes"] == 2
    assert [m["metric"] for m in card["sections"]["splice"]["metrics"]] == ["miou", "agreement"]  # segment + masks
    square = next(r for r in card["sections"]["edits"]["classes"] if r["class"] == "square")
    assert square["feature"] == 0 and square["auroc"] >= 0.8
    feat = square["conditions"]["feature"]
    assert feat["target"]["mean"] > 0.9 and feat["other"]["mean"] == 0.0
    report_index = (labelled_path["report"] / "index.html").read_text()
    assert "report card</a>" in report_index
    copied = next((labelled_path["report"] / "saes").glob("*/" + layout.report_eval_card_name()))
    assert copied.read_text() == card_fpath.read_text()
    html = card_fpath.read_text()
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;img" in html


try:
    from test_report_browser import CHROMIUM, Chromium
except ImportError:  # pragma: no cover - the report tests are part of this repository
    CHROMIUM, Chromium = None, None


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make system-deps)")
def test_card_and_report_link_open_in_chromium(labelled_path, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        s = browser.open((labelled_path["report"] / "index.html").as_uri())
        href = browser.eval(s, "document.querySelector('p.card a').href")
        assert href.endswith(layout.report_eval_card_name())
        s2 = browser.open(href)
        assert browser.eval(s2, "document.querySelectorAll('section').length") == 4
        assert browser.eval(s2, "document.querySelectorAll('script, img, [onerror]').length") == 0
        assert EVIL in browser.eval(s2, "document.querySelector('h1').textContent")
        assert "%" in browser.eval(s2, "document.querySelector('#splice .big').textContent")
        assert browser.problems(s2) == [] and browser.problems(s) == []
    finally:
        browser.close()


def test_recon_cli_and_config_file(tiny_bb, tiny_store, image_dir, tmp_path):
    ckpt = identity_sae(tiny_bb).save(tmp_path / "identity")
    text = _ok("eval", "recon", "--sae", ckpt, "--store", tiny_store, "--out", tmp_path / "r.json")
    assert "reconstruction on 192 tokens of 12 images" in text and (tmp_path / "r.json").is_file()
    cfg = tmp_path / "splice.toml"
    cfg.write_text(f'images = "{image_dir}"\nhead = "timm"\nn_boot = 20\nstore = "{tiny_store}"\n')
    text = _ok("eval", "splice", "--sae", ckpt, "--config", cfg, "--out", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["n_boot"] == 20
    r = invoke("eval", "splice", "--sae", ckpt)
    assert r.exit_code == 2 and r.output.strip() == "error: missing --images. Pass --images DIR."


def test_card_command_prints_the_last_card(labelled_path):
    text = _ok("eval", "card", "--sae", labelled_path["ckpt"], "--index", labelled_path["index"])
    assert "label coverage" in text and "100.0% (2/2)" in text and "recovered" in text
    r = invoke("eval", "card", "--sae", labelled_path["ckpt"], "--out", labelled_path["root"] / "nowhere")
    assert r.exit_code == 2 and "no report card at" in r.output and len(r.output.strip().splitlines()) == 1
