"""The backbone interface on tiny real models: split at any block and resume, hooks, layouts, loaders, preprocessing."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from saevctl.errors import LayerError, ModelError
from saevctl.vit import load_backbone, parse_spec

from conftest import draw_image, make_tiny_vit
from tiny_models import make_tiny_clip

# name -> timm overrides; all keep the conftest's 32 px input, 8 px patches, 4 blocks, width 32.
TIMM_VARIANTS = {
    "cls": {},
    "cls+reg4": {"reg_tokens": 4, "no_embed_class": True},
    "avgpool-no-cls": {"class_token": False, "global_pool": "avg"},
    "reg2-no-cls": {"reg_tokens": 2, "class_token": False, "global_pool": "avg", "no_embed_class": True},
}
EXPECTED_LAYOUT = {"cls": (1, 0), "cls+reg4": (1, 4), "avgpool-no-cls": (0, 0), "reg2-no-cls": (0, 2)}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(arch, checkpoint file) of a random-init tiny open_clip model saved as safetensors."""
    return make_tiny_clip(tmp_path_factory.mktemp("tinyclip"))


@pytest.fixture(scope="module")
def timm_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("variants")
    return {
        name: "local-dir:" + str(make_tiny_vit(root / name.replace("+", "_"), seed=3, **ov))
        for name, ov in TIMM_VARIANTS.items()
    }


def images_bchw(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hooked_block_outputs(blocks: torch.nn.ModuleList, run: object) -> dict[int, torch.Tensor]:
    """Block outputs recorded by forward hooks on the library's own modules (the reference for forward_to)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.detach().clone()))
        for k, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            run()  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_timm_split_anywhere_reproduces_full_forward(timm_variants: dict[str, str], variant: str) -> None:
    bb = load_backbone(timm_variants[variant])
    x = images_bchw()
    with torch.no_grad():
        ref_logits = bb.model(x)
        ref_tokens = bb.model.forward_features(x)
    hooked = hooked_block_outputs(bb.model.blocks, lambda: bb.model(x))
    outs = bb.forward_to(x, list(range(bb.n_blocks)))
    assert sorted(outs) == list(range(4))
    for layer in range(bb.n_blocks):
        torch.testing.assert_close(outs[layer], hooked[layer], rtol=0, atol=0)
        tokens = bb.forward_from(layer, outs[layer].clone())
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bb.head(tokens), ref_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bb(x), ref_logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_timm_token_layout(timm_variants: dict[str, str], variant: str) -> None:
    bb = load_backbone(timm_variants[variant])
    n_cls, n_reg = EXPECTED_LAYOUT[variant]
    lay = bb.layout
    assert (lay.n_cls, lay.n_reg, lay.grid_h, lay.grid_w) == (n_cls, n_reg, 4, 4)
    assert (bb.n_blocks, bb.d_model, bb.patch_size) == (4, 32, 8)
    x_btd = bb.forward_to(images_bchw(2), [1])[1]
    assert x_btd.shape == (2, n_cls + n_reg + 16, 32)
    parts = lay.split(x_btd)
    expected_kinds = ["patches"] + ["cls"] * n_cls + ["registers"] * (n_reg > 0)
    assert sorted(parts) == sorted(expected_kinds) == sorted(lay.kinds())
    assert torch.equal(parts["patches"], x_btd[:, -16:])
    if n_cls:
        assert parts["cls"].shape == (2, 32) and torch.equal(parts["cls"], x_btd[:, 0])
    if n_reg:
        assert parts["registers"].shape == (2, n_reg, 32)
        assert torch.equal(parts["registers"], x_btd[:, n_cls : n_cls + n_reg])
    # The patch tokens are the ones timm's own layout calls patches (after num_prefix_tokens).
    assert bb.model.num_prefix_tokens == lay.n_prefix


def test_forward_to_runs_only_what_is_needed_and_accepts_negative_layers(tiny_vit: str) -> None:
    bb = load_backbone(tiny_vit)
    x = images_bchw()
    calls: list[int] = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(bb.blocks)]
    outs = bb.forward_to(x, [-3, 1])
    for h in handles:
        h.remove()
    assert list(outs) == [1] and calls == [0, 1]  # -3 is block 1 of 4; blocks 2 and 3 never run
    full = bb.forward_to(x, [3])[3]
    torch.testing.assert_close(bb.forward_to(x, [-1])[3], full, rtol=0, atol=0)


def test_forward_from_uses_the_edited_residual(tiny_vit: str) -> None:
    bb = load_backbone(tiny_vit)
    x = images_bchw()
    resid = bb.forward_to(x, [1])[1].clone()
    plain_tokens = bb.forward_from(1, resid)
    plain = bb.head(plain_tokens)
    direction_d = torch.randn(32, generator=torch.Generator().manual_seed(1))  # not constant: LayerNorm removes that
    edited = resid.clone()
    edited[:, 5] += 3.0 * direction_d  # push one patch token: its own output moves, the others (via attention) a bit
    moved_tokens = bb.forward_from(1, edited)
    assert (moved_tokens[:, 5] - plain_tokens[:, 5]).abs().max() > 0.1
    assert (moved_tokens[:, 6] - plain_tokens[:, 6]).abs().max() > 0
    edited[:, 0] += 3.0 * direction_d  # the CLS token feeds the head directly
    assert not torch.allclose(bb.head(bb.forward_from(1, edited)), plain)
    torch.testing.assert_close(bb.head(bb.forward_from(1, resid + 0.0)), plain, rtol=0, atol=0)
    with torch.enable_grad():  # the probe needs gradients through the resumed part
        leaf = resid.clone().requires_grad_(True)
        bb.head(bb.forward_from(1, leaf)).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_layer_outside_the_model_is_a_layer_error(tiny_vit: str) -> None:
    bb = load_backbone(tiny_vit)
    for bad in (4, 12, -5):
        with pytest.raises(LayerError, match=r"outside .* blocks 0\.\.3"):
            bb.forward_to(images_bchw(1), [bad])
        with pytest.raises(LayerError):
            bb.forward_from(bad, torch.zeros(1, 17, 32))


def test_open_clip_split_anywhere_reproduces_full_forward(tiny_clip: tuple[str, Path]) -> None:
    import open_clip

    arch, ckpt = tiny_clip
    bb = load_backbone(f"open_clip:{arch}/{ckpt}")
    ref = open_clip.create_model(arch, pretrained=str(ckpt)).eval()
    x = images_bchw()
    with torch.no_grad():
        ref_emb = ref.encode_image(x)
    hooked = hooked_block_outputs(bb.visual.transformer.resblocks, lambda: bb.visual(x))
    outs = bb.forward_to(x, [0, 1, 2])
    for layer in range(3):
        torch.testing.assert_close(outs[layer], hooked[layer], rtol=0, atol=0)
        emb = bb.head(bb.forward_from(layer, outs[layer].clone()))
        torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-6)
    lay = bb.layout
    assert (lay.n_cls, lay.n_reg, lay.grid_h, lay.grid_w, bb.n_blocks, bb.d_model) == (1, 0, 4, 4, 3, 32)
    assert outs[0].shape == (3, 17, 32)
    assert bb.arch == arch
    assert bb.encode_text(["a photo of a cat", "a dog"]).shape == (2, 16)


def test_open_clip_checkpoint_file_forms_load_identical_weights(
    tiny_clip: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`open_clip:ARCH/path` with an absolute path (one or two slashes), a relative path, and a .bin file."""
    arch, ckpt = tiny_clip
    from safetensors.torch import load_file

    torch.save(load_file(str(ckpt)), tmp_path / "tiny.bin")
    monkeypatch.chdir(ckpt.parent)
    specs = [f"open_clip:{arch}/{ckpt}", f"open_clip:{arch}/{str(ckpt).lstrip('/')}", f"open_clip:{arch}/{ckpt.name}",
             f"open_clip:{arch}/{tmp_path / 'tiny.bin'}"]
    x = images_bchw(2)
    loaded = [load_backbone(s) for s in specs]
    ref = loaded[0](x)
    for bb in loaded[1:]:
        assert bb.weights_sha256 == loaded[0].weights_sha256
        torch.testing.assert_close(bb(x), ref, rtol=0, atol=0)


def test_open_clip_spec_errors(tiny_clip: tuple[str, Path], tiny_vit: str) -> None:
    arch, _ = tiny_clip
    with pytest.raises(ModelError, match="names no weights"):
        load_backbone(f"open_clip:{arch}")
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone(f"open_clip:{arch}/no/such/ckpt.safetensors")
    with pytest.raises(ModelError, match="no pretrained tag 'nonsense_tag'"):
        load_backbone("open_clip:ViT-B-32/nonsense_tag")
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        load_backbone("open_clip:ViT-Nope/openai")
    timm_weights = tiny_vit.removeprefix("local-dir:") + "/model.safetensors"
    with pytest.raises(ModelError, match=f"cannot load .* into open_clip {arch}"):
        load_backbone(f"open_clip:{arch}/{timm_weights}")


def test_weights_hash_identifies_weights(tmp_path: Path, tiny_vit: str) -> None:
    a = load_backbone(tiny_vit).weights_sha256
    assert a == load_backbone(tiny_vit).weights_sha256
    other = "local-dir:" + str(make_tiny_vit(tmp_path / "other", seed=1))
    assert load_backbone(other).weights_sha256 != a
    d = load_backbone(tiny_vit).describe()
    assert d["layout"] == {"n_cls": 1, "n_reg": 0, "grid_h": 4, "grid_w": 4}
    assert d["spec"] == tiny_vit and d["n_blocks"] == 4 and d["d_model"] == 32


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nonsense", "unknown model name"),
        ("foo:bar", "unknown model name"),
        ("timm:", "unknown model name"),
        ("timm:not_a_model_xyz", "unknown timm model"),
    ],
)
def test_unknown_model_names(spec: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_backbone(spec)


def test_local_dir_that_is_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"missing config.json, model.safetensors"):
        load_backbone(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_backbone(f"local-dir:{tmp_path}")


@pytest.fixture(scope="module")
def silent_server() -> Iterator[str]:
    """A local port that accepts connections and never answers: a black hole, as behind a dead proxy."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    "spec",
    [
        "timm:vit_tiny_patch16_224.augreg_in21k",
        "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k",
        "open_clip:ViT-B-32/openai",
    ],
)
@pytest.mark.parametrize("hub", ["refused", "black-hole"])
def test_hub_names_fail_fast_offline(
    spec: str, hub: str, silent_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both an unreachable and a silent hub fail within the probe timeout, with a hint to work offline."""
    import huggingface_hub.constants

    endpoint = closed_port() if hub == "refused" else silent_server
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("SAEVCTL_HUB_TIMEOUT", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        load_backbone(spec)
    # huggingface_hub's own retries take 30 s and more per file; timm builds the random model first (~1 s).
    assert time.monotonic() - t0 < 15
    line = info.value.one_line()
    assert "\n" not in line and f"the model hub ({endpoint}) is unreachable and it is not in the local cache" in line
    assert (
        ("local-dir:/that/folder" in line)
        if not spec.startswith("open_clip")
        else ("open_clip:ViT-B-32/path/to/" in line)
    )
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored for the rest of the process


def test_hub_probe_is_bounded_by_its_timeout(silent_server: str) -> None:
    from saevctl.vit.load import _hub_reachable

    t0 = time.monotonic()
    assert _hub_reachable(silent_server, 0.5) is False
    assert time.monotonic() - t0 < 1.5
    assert _hub_reachable(closed_port(), 0.5) is False


def test_parse_spec() -> None:
    assert parse_spec("demo") == ("demo", "")
    assert parse_spec("timm:vit_base_patch16_224.augreg_in21k") == ("timm", "vit_base_patch16_224.augreg_in21k")
    assert parse_spec("open_clip:ViT-B-16/laion2b_s34b_b88k") == ("open_clip", "ViT-B-16/laion2b_s34b_b88k")
    assert parse_spec("local-dir:/a/b") == ("local-dir", "/a/b")


SIZES = [(48, 40), (40, 48), (33, 33), (100, 37), (37, 100), (64, 64), (35, 50), (31, 20)]


def test_preprocess_matches_timm_eval_transform(timm_variants: dict[str, str]) -> None:
    import timm.data

    bb = load_backbone(timm_variants["cls"])
    cfg = timm.data.resolve_data_config({}, model=bb.model)
    assert cfg["crop_pct"] != 1.0  # the tiny model keeps timm's 0.9: the resize arithmetic is exercised
    reference = timm.data.create_transform(**cfg)
    rng = np.random.default_rng(0)
    for size in SIZES:
        img = draw_image(rng, size)
        torch.testing.assert_close(bb.preprocess(img), reference(img), rtol=0, atol=1e-6)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_preprocess_matches_open_clip_transform(tiny_clip: tuple[str, Path], resize_mode: str) -> None:
    from open_clip.transform import image_transform

    from saevctl.vit import Preprocess

    arch, ckpt = tiny_clip
    bb = load_backbone(f"open_clip:{arch}/{ckpt}")
    assert bb.preprocess.mode == "center_crop"
    ours = Preprocess(**{**bb.preprocess.to_dict(), "mean": bb.preprocess.mean, "std": bb.preprocess.std,
                         "mode": "squash" if resize_mode == "squash" else "center_crop"})
    reference = image_transform(32, is_train=False, resize_mode=resize_mode)
    rng = np.random.default_rng(1)
    for size in SIZES:
        img = draw_image(rng, size)
        torch.testing.assert_close(ours(img), reference(img), rtol=0, atol=1e-6)


def test_preprocess_round_trips_through_its_dict(tiny_vit: str) -> None:
    from saevctl.vit import Preprocess

    pre = load_backbone(tiny_vit).preprocess
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    u8 = pre.to_uint8(draw_image(np.random.default_rng(2)))
    assert u8.shape == (32, 32, 3) and u8.dtype == np.uint8 and u8.flags.writeable


def test_hub_name_in_the_local_cache_loads_offline(
    tiny_vit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model downloaded earlier keeps working without the hub: the loader falls back to the HF cache."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--saevctl-test--tiny-vit" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_vit.removeprefix("local-dir:"), snapshot)
    (cache / "models--saevctl-test--tiny-vit" / "refs").mkdir()
    (cache / "models--saevctl-test--tiny-vit" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_port())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    bb = load_backbone("hf-hub:saevctl-test/tiny-vit")
    assert bb.weights_sha256 == load_backbone(tiny_vit).weights_sha256
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
