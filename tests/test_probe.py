"""`saevctl probe`: one image (tables + PNG), batch mode (a planted feature is specific, a dead one is not),
`Nx` clamps from a real mined index, and one-line errors with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.edit.heads import describe_model, save_head
from saevctl.probe.batch import BatchConfig, run_batch
from saevctl.vit import load_backbone

from conftest import make_tiny_vit
from test_probe_edit import images_bchw, make_sae

LAYER = 1


@pytest.fixture(scope="module")
def tiny_bb(tiny_vit):
    return load_backbone(tiny_vit)


def plant(bb, sae, direction_d: torch.Tensor) -> None:
    """Feature 0 fires (code 1) on every patch and writes `direction_d`; the others fire often too."""
    with torch.no_grad():
        sae.W_dec[0] = direction_d
        sae.W_enc[:, 0] = 0
        sae.b_enc[0] = 1.0
        sae.b_enc[1:] = 2.0


def class0_gradient(bb) -> torch.Tensor:
    """The mean gradient of class 0's logit with respect to the patch tokens after block LAYER."""
    x = images_bchw(bb, n=8, seed=5)
    with torch.enable_grad():
        h = bb.run_blocks(bb.embed(x), 0, LAYER + 1).detach().requires_grad_(True)
        bb.head(bb.forward_from(LAYER, h))[:, 0].sum().backward()
    g = h.grad[:, bb.layout.n_prefix :].mean((0, 1))
    return g / g.norm()


@pytest.fixture(scope="module")
def planted_sae(tiny_bb, tmp_path_factory) -> Path:
    sae = make_sae(tiny_bb, layer=LAYER)
    plant(tiny_bb, sae, class0_gradient(tiny_bb))
    return sae.save(tmp_path_factory.mktemp("sae") / "planted")


@pytest.fixture(scope="module")
def dead_sae(tiny_bb, tmp_path_factory) -> Path:
    sae = make_sae(tiny_bb, layer=LAYER)
    plant(tiny_bb, sae, torch.zeros(tiny_bb.d_model))
    return sae.save(tmp_path_factory.mktemp("sae") / "dead")


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_single_image_classify_tables_and_png(planted_sae, image_dir, tmp_path):
    img = sorted(image_dir.rglob("*.png"))[0]
    out = tmp_path / "p.png"
    r = invoke("probe", "--sae", planted_sae, "--image", img, "--clamp", "0=20", "--head", "timm", "--out", out)
    assert r.exit_code == 0, r.output
    assert "top-5 before" in r.output and "top-5 after" in r.output and "rank before → after" in r.output
    assert "on 16 patches" in r.output  # fired mode: feature 0 fires on every patch
    assert str(out) in r.output.replace("\n", "")
    with Image.open(out) as im:
        assert im.size[0] > 400


def test_single_image_patch_choice_and_top(planted_sae, image_dir, tmp_path):
    from saevctl.probe import Config, run

    img = str(sorted(image_dir.rglob("*.png"))[0])
    res = run(
        Config(
            image=img,
            clamps=("0=20",),
            sae=planted_sae,
            head="timm",
            patches="0,0;3,3",
            out=tmp_path / "a.png",
            device="cpu",
        )
    )
    assert res.edited_hw.sum() == 2 and res.edited_hw[0, 0] and res.edited_hw[3, 3]
    assert res.summary["tv"] > 0
    res0 = run(Config(image=img, clamps=("0=1",), sae=planted_sae, head="timm", out=tmp_path / "b.png", device="cpu"))
    np.testing.assert_allclose(
        res0.after, res0.before, atol=1e-6
    )  # feature 0 is 1 everywhere: setting it to 1 is a no-op
    top = run(Config(image=img, clamps=("top=0",), sae=planted_sae, head="timm", out=tmp_path / "c.png", device="cpu"))
    from saevctl.data import open_image
    from saevctl.sae import SAE

    bb = load_backbone(SAE.load(planted_sae).cfg.model["spec"])
    x = bb.forward_to(bb.preprocess(open_image(img))[None], [LAYER])[LAYER][0, bb.layout.n_prefix :]
    assert top.features == [int(SAE.load(planted_sae).encode(x).sum(0).argmax())]


def test_batch_planted_feature_is_specific(planted_sae, image_dir, tmp_path):
    out = tmp_path / "batch.png"
    r = invoke("probe", "--sae", planted_sae, "--images", image_dir, "--clamp", "0=10", "--head", "timm",
               "--n-boot", "300", "--out", out)
    assert r.exit_code == 0, r.output
    assert "12 images (1 unreadable)" in r.output
    assert "specific:" in r.output and "not specific" not in r.output
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["specific"] is True and summary["n_images"] == 12 and summary["control_features"][0] != 0
    tv = next(m for m in summary["metrics"] if m["metric"] == "tv")
    feat, *controls = tv["conditions"]
    assert all(feat["lo"] > c["hi"] for c in controls)  # the CIs do not even overlap
    assert out.is_file()


def test_batch_dead_feature_is_not_specific(dead_sae, image_dir, tmp_path):
    res = run_batch(BatchConfig(images=str(image_dir), clamps=("0=10",), sae=dead_sae, head="timm",
                                out=tmp_path / "d.png", device="cpu", n_boot=300))
    assert res.specific is False
    assert float(np.abs(res.effects["feature"]["tv"]).max()) < 1e-6  # writing a zero vector changes nothing
    assert res.effects["random direction"]["tv"].max() == 0  # same norm as the edit: zero
    assert res.effects["random feature"]["tv"].mean() > 0
    assert "no mined index" in res.notes[0]


def test_batch_without_controls(planted_sae, image_dir, tmp_path):
    res = run_batch(BatchConfig(images=str(image_dir), clamps=("0=10",), sae=planted_sae, head="timm",
                                out=tmp_path / "n.png", device="cpu", controls=False, n_boot=50, max_images=4))
    assert res.specific is None and list(res.effects) == ["feature"] and res.n_images == 4


def _other_model_head(tmp_path: Path) -> Path:
    other = load_backbone("local-dir:" + str(make_tiny_vit(tmp_path / "other", seed=1)))
    header = {"task": "classify", "model": describe_model(other), "layer": 3, "final_norm": True, "classes": ["a", "b"],
              "pool": "cls", "metrics": {}}
    return save_head(tmp_path / "other-head", torch.zeros(2, 32), torch.zeros(2), header)


def _early_head(bb, tmp_path: Path) -> Path:
    header = {"task": "classify", "model": describe_model(bb), "layer": 0, "final_norm": False, "classes": ["a", "b"],
              "pool": "mean", "metrics": {}}
    return save_head(tmp_path / "early-head", torch.zeros(2, 32), torch.zeros(2), header)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--clamp", "64=0"], "error: feature 64 is out of range: this SAE has features 0..63"),
        (["--clamp", "0=0", "--patches", "4,1"], "error: patch (4,1) is outside the 4x4 patch grid"),
        (
            ["--clamp", "3=2x"],
            "error: --clamp 3=2x needs feature 3's max activation, but no mined index covers this SAE",
        ),
        (["--clamp", "0=0", "--head", "saliency"], "error: the saliency head is made for the demo model"),
        (["--clamp", "0=0", "--head", "nohead"], "error: unknown head 'nohead'"),
        (["--clamp", "0=0", "--head", "OTHER"], "was made for local-dir:"),
        (["--clamp", "0=0", "--head", "EARLY"], "error: head EARLY reads layer 0, before the SAE's layer 1"),
        (["--clamp", "zz"], "error: bad --clamp 'zz'"),
        (["--clamp", "0=0", "--index", "missing.duckdb"], "error: mined index missing.duckdb does not exist"),
    ],
)
def test_probe_errors_are_one_line(planted_sae, image_dir, tiny_bb, tmp_path, extra, message):
    if "OTHER" in extra:
        extra = [str(_other_model_head(tmp_path)) if a == "OTHER" else a for a in extra]
    if "EARLY" in extra:
        early = str(_early_head(tiny_bb, tmp_path))
        extra = [early if a == "EARLY" else a for a in extra]
        message = message.replace("EARLY", early)
    img = sorted(image_dir.rglob("*.png"))[0]
    if "--index" in extra:  # the index is only opened when a value needs it
        extra = [*extra[:-2], "--clamp", "0=2x", *extra[-2:]]
    r = invoke("probe", "--sae", planted_sae, "--image", img, "--head", "timm", *extra)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output


def test_probe_missing_or_corrupt_image(planted_sae, image_dir):
    r = invoke("probe", "--sae", planted_sae, "--image", "nothere.jpg", "--clamp", "0=0")
    assert r.exit_code == 2 and r.output.strip() == "error: image nothere.jpg does not exist. Check the path."
    r = invoke("probe", "--sae", planted_sae, "--image", image_dir / "dogs" / "zz_corrupt.jpg", "--clamp", "0=0")
    assert r.exit_code == 2 and "is corrupt or not an image" in r.output


def test_probe_needs_one_image_source(planted_sae, image_dir):
    r = invoke("probe", "--sae", planted_sae, "--clamp", "0=0")
    assert r.exit_code == 2 and "exactly one of --image" in r.output
    r = invoke("probe", "--sae", planted_sae, "--images", image_dir, "--clamp", "top=0")
    assert r.exit_code == 2 and "works on one --image only" in r.output


def test_nx_clamp_reads_the_mined_index(tiny_bb, tiny_store, image_dir, tmp_path):
    from saevctl.mine.index import Index
    from saevctl.mine.pipeline import Config as MineConfig
    from saevctl.mine.pipeline import run as mine
    from saevctl.probe import Config, run

    sae = make_sae(tiny_bb, layer=LAYER, seed=4)
    sae_dir = sae.save(tmp_path / "sae")
    idx = tmp_path / "index.duckdb"
    mine(MineConfig(sae=sae_dir, store=tiny_store, index=idx, device="cpu", set_defaults=False))
    with Index.open(idx) as index:
        sid = index.resolve_sae(str(sae_dir))
        best = index.list_features(sid, sort="max", limit=1)[0]
    f, peak = int(best["feature"]), float(best["max"])
    img = str(sorted(image_dir.rglob("*.png"))[0])
    res = run(
        Config(
            image=img, clamps=(f"{f}=2x",), sae=sae_dir, head="timm", index=idx, out=tmp_path / "x.png", device="cpu"
        )
    )
    assert res.values == [pytest.approx(2 * peak)]
    batch = run_batch(BatchConfig(images=str(image_dir), clamps=(f"{f}=0.5x",), sae=sae_dir, head="timm", index=idx,
                                  out=tmp_path / "b.png", device="cpu", n_boot=50, max_images=4))
    assert batch.freq_source == f"the mined index {idx}" and batch.values == [pytest.approx(0.5 * peak)]
    with Index.open(idx) as index:
        freq = {r["feature"]: r["freq"] for r in index.list_features(sid, sort="feature", limit=64)}
    with Index.open(idx) as index:
        ctrl_max = float(index.feature_stats(sid, batch.control_features[0])["max"])
    assert batch.control_values == [pytest.approx(0.5 * ctrl_max)]  # the same multiple of its own max
    ranked = sorted((abs(np.log(freq[j]) - np.log(freq[f])), j) for j in freq if j != f and freq[j] > 0)
    assert batch.control_features[0] in {j for _, j in ranked[:16]}  # among the nearest in firing frequency


def _segment_head(bb, tmp_path: Path) -> Path:
    torch.manual_seed(2)
    header = {"task": "segment", "model": describe_model(bb), "layer": bb.n_blocks - 1, "final_norm": True,
              "classes": ["sky", "ground", "thing"], "metrics": {}}
    return save_head(tmp_path / "seg-head", torch.randn(3, bb.d_model) * 3, torch.zeros(3), header)


def test_segment_head_single_and_batch(planted_sae, tiny_bb, image_dir, tmp_path):
    from saevctl.probe import Config, run

    head = str(_segment_head(tiny_bb, tmp_path))
    img = str(sorted(image_dir.rglob("*.png"))[0])
    res = run(
        Config(
            image=img, clamps=("0=40",), sae=planted_sae, head=head, patches="all", out=tmp_path / "s.png", device="cpu"
        )
    )
    assert res.task == "segment" and res.before.shape == (3, 32, 32)
    shares = res.summary["rows"]
    assert sum(r["before"] for r in shares) == pytest.approx(1.0) and sum(r["after"] for r in shares) == pytest.approx(
        1.0
    )
    changed = float((res.before.argmax(0) != res.after.argmax(0)).mean())
    assert res.summary["changed"] == pytest.approx(changed) and changed > 0
    r = invoke("probe", "--sae", planted_sae, "--images", image_dir, "--clamp", "0=40", "--head", head,
               "--n-boot", "100", "--max-images", "6", "--out", tmp_path / "sb.png")
    assert r.exit_code == 0, r.output
    assert "6 images (0 unreadable)" in r.output and "specific" in r.output
    summary = json.loads((tmp_path / "sb.json").read_text())
    assert [m["metric"] for m in summary["metrics"]] == ["changed", "share_tv"] and summary["task"] == "segment"


def test_probe_reads_a_toml_config(planted_sae, image_dir, tmp_path):
    cfg = tmp_path / "probe.toml"
    img = sorted(image_dir.rglob("*.png"))[0]
    cfg.write_text(
        f'image = "{img}"\nclamps = ["0=20"]\nhead = "timm"\npatches = "all"\nout = "{tmp_path / "t.png"}"\n'
    )
    r = invoke("probe", "--sae", planted_sae, "--config", cfg)
    assert r.exit_code == 0, r.output
    assert "on 16 patches" in r.output and (tmp_path / "t.png").is_file()


@pytest.fixture(scope="module")
def demo_sae(tmp_path_factory) -> Path:
    from saevctl.errors import ModelError

    try:
        bb = load_backbone("demo")
    except ModelError as e:
        pytest.skip(e.one_line())
    return make_sae(bb, layer=6, n_latents=256).save(tmp_path_factory.mktemp("demo") / "sae")


def test_demo_saliency_probe_cli(demo_sae, tmp_path):
    """What `make demo` ends with: a probe on a demo photo with the saliency head."""
    out = tmp_path / "demo.png"
    r = invoke("probe", "--sae", demo_sae, "--image", "skimage:chelsea", "--clamp", "top=0", "--head", "saliency",
               "--out", out)
    assert r.exit_code == 0, r.output
    assert "saliency (p > 0.5)" in r.output and "salient" in r.output and "pixels that changed class" in r.output
    with Image.open(out) as im:
        assert im.size[0] > 3 * im.size[1]  # four panels side by side


@pytest.mark.gpu
def test_probe_on_cuda_matches_cpu(planted_sae, image_dir, tmp_path):
    from saevctl.probe import Config, run

    img = str(sorted(image_dir.rglob("*.png"))[0])
    kw = {"image": img, "clamps": ("0=20",), "sae": planted_sae, "head": "timm", "patches": "all"}
    cpu = run(Config(**kw, out=tmp_path / "c.png", device="cpu"))
    gpu = run(Config(**kw, out=tmp_path / "g.png", device="cuda"))
    np.testing.assert_allclose(gpu.after, cpu.after, atol=1e-4)
    res = run_batch(BatchConfig(images=str(image_dir), clamps=("0=10",), sae=planted_sae, head="timm",
                                out=tmp_path / "b.png", device="cuda", n_boot=100))
    assert res.specific is True


def test_batch_summary_has_per_image_effects(planted_sae, image_dir, tmp_path):
    res = run_batch(BatchConfig(images=str(image_dir), clamps=("0=10",), sae=planted_sae, head="timm",
                                out=tmp_path / "p.png", device="cpu", n_boot=50))
    summary = json.loads(res.summary.read_text())
    per = summary["per_image"]
    assert len(per["paths"]) == 12 and not any("corrupt" in p for p in per["paths"])
    tv = np.array(per["effects"]["feature"]["tv"])
    feat = next(m for m in summary["metrics"] if m["metric"] == "tv")["conditions"][0]
    assert tv.shape == (12,) and feat["mean"] == pytest.approx(float(tv.mean()))
    assert feat["lo"] <= tv.mean() <= feat["hi"]
