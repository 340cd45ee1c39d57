"""The SAE edit: the fast path equals the issue's literal definition, and a zero edit (or an edit to each
feature's own value) leaves every head kind's output equal to the plain forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saevctl.edit.clamps import parse_clamp
from saevctl.edit.controls import direction_generator, random_direction_edit
from saevctl.edit.edit import EditPlan, apply_edit, edit_fast, edit_reference, feature_codes, parse_patches, static_mask
from saevctl.edit.heads import describe_model, resolve_head, save_head
from saevctl.edit.session import Prober
from saevctl.errors import ProbeError
from saevctl.sae import SAE, SAEConfig
from saevctl.vit import load_backbone

from conftest import draw_image

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_sae(bb, layer: int, n_latents: int = 64, seed: int = 0, activation: str = "relu", k: int = 0) -> SAE:
    """A random SAE on `bb`'s layer, normalised on real activations, with biases that make features fire sometimes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.stack([bb.preprocess(draw_image(rng)) for _ in range(6)]).to(next(bb.parameters()).device)
    acts = bb.forward_to(x, [layer])[layer][:, bb.layout.n_prefix :].reshape(-1, bb.d_model).cpu()
    sae = SAE(SAEConfig(bb.d_model, n_latents, activation=activation, k=k, model=describe_model(bb), layer=layer))
    sae.set_normalization(acts)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(n_latents) * 0.5)
    return sae.eval().requires_grad_(False)


def images_bchw(bb, n: int = 3, seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([bb.preprocess(draw_image(rng)) for _ in range(n)]).to(next(bb.parameters()).device)


@pytest.fixture(scope="module")
def tiny_bb(tiny_vit):
    return load_backbone(tiny_vit)


@pytest.fixture(scope="module")
def sae_l2(tiny_bb):
    return make_sae(tiny_bb, layer=2)


@pytest.fixture(scope="module")
def clip_bb(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("clip")
    (d / "saevctl-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / "saevctl-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("saevctl-tiny-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "w.safetensors"))
    return load_backbone(f"open_clip:saevctl-tiny-clip/{d / 'w.safetensors'}")


def _linear_head_dir(bb, dpath: Path, task: str, layer: int) -> Path:
    torch.manual_seed(3)
    header = {"task": task, "model": describe_model(bb), "layer": layer, "final_norm": layer == bb.n_blocks - 1,
              "classes": ["a", "b", "c"], "metrics": {}}
    if task == "classify":
        header["pool"] = "mean"
    return save_head(dpath, torch.randn(3, bb.d_model), torch.randn(3), header)


def _check_zero_edit(prober: Prober, x: torch.Tensor) -> None:
    """Split at the SAE's layer = plain forward; an empty edit and an edit to each feature's own value change
    nothing."""
    lay, sae = prober.bb.layout, prober.sae
    plain = prober.plain(x)
    x_btd = prober.prefix(x)
    torch.testing.assert_close(prober.outputs(x_btd), plain, rtol=1e-5, atol=1e-6)
    feats = [0, 5, 7]
    own = feature_codes(sae, x_btd[:, lay.n_prefix :], feats)
    n, p, k = own.shape
    for fast in (True, False):
        empty = EditPlan(feats, torch.full((n, k), 9.0), torch.zeros(n, p, k, dtype=torch.bool))
        torch.testing.assert_close(
            prober.outputs(apply_edit(sae, x_btd, lay, empty, fast=fast)), plain, rtol=1e-4, atol=1e-5
        )
    for j in (0, p - 1):  # values are per image, so "its own value" is set on one patch at a time
        mask = torch.zeros(n, p, k, dtype=torch.bool)
        mask[:, j] = True
        plan = EditPlan(feats, own[:, j, :], mask)
        assert torch.equal(apply_edit(sae, x_btd, lay, plan, fast=True), x_btd)  # the fast path is exact
        edited = apply_edit(sae, x_btd, lay, plan, fast=False)  # decode(f') + (x - decode(f)), literally
        torch.testing.assert_close(prober.outputs(edited), plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["timm", "trained", "classify", "segment", "classify-mid"])
def test_zero_edit_equals_plain_forward_timm_heads(tiny_bb, tmp_path, kind, image_dir, tiny_vit):
    sae = make_sae(tiny_bb, layer=1)
    if kind == "timm":
        head = resolve_head("timm", tiny_bb)
    elif kind == "trained":  # a classify head made by `heads train` on the ImageFolder fixture
        from saevctl.probe.train_head import HeadTrainConfig, train_head

        res = train_head(HeadTrainConfig(task="classify", images=str(image_dir), model=tiny_vit, out=tmp_path / "t",
                                         device="cpu", epochs=5), backbone=tiny_bb)
        head = resolve_head(str(res.out), tiny_bb)
    elif kind == "classify-mid":  # a head on the residual stream after block 2 (not the final tokens)
        head = resolve_head(str(_linear_head_dir(tiny_bb, tmp_path / "h", "classify", 2)), tiny_bb)
    else:
        head = resolve_head(str(_linear_head_dir(tiny_bb, tmp_path / "h", kind, tiny_bb.n_blocks - 1)), tiny_bb)
    _check_zero_edit(Prober(sae, tiny_bb, head), images_bchw(tiny_bb))


def test_zero_edit_equals_plain_forward_clip_zero_shot(clip_bb):
    head = resolve_head("clip", clip_bb, classes="a photo of a cat, a photo of a dog, a diagram")
    assert head.task == "classify" and head.classes == ["a photo of a cat", "a photo of a dog", "a diagram"]
    _check_zero_edit(Prober(make_sae(clip_bb, layer=0), clip_bb, head), images_bchw(clip_bb))


def test_zero_edit_equals_plain_forward_saliency():
    from saevctl.errors import ModelError

    try:
        bb = load_backbone("demo")
    except ModelError as e:
        pytest.skip(e.one_line())
    head = resolve_head("saliency", bb)
    assert head.task == "saliency"
    prober = Prober(make_sae(bb, layer=6, n_latents=256), bb, head)
    x = images_bchw(bb, n=2)
    _check_zero_edit(prober, x)
    probs = prober.plain(x)
    assert probs.shape == (2, 1, 224, 224) and float(probs.min()) >= 0 and float(probs.max()) <= 1


def test_edit_changes_only_selected_patches_at_the_layer(tiny_bb):
    sae = make_sae(tiny_bb, layer=1)
    lay = tiny_bb.layout
    x_btd = tiny_bb.forward_to(images_bchw(tiny_bb), [1])[1]
    mask_p = static_mask(parse_patches("1,2;3,0"), lay, tiny_bb.patch_size)
    n = x_btd.shape[0]
    plan = EditPlan([4], torch.full((n, 1), 9.0), mask_p[None, :, None].expand(n, lay.n_patches, 1))
    out = apply_edit(sae, x_btd, lay, plan)
    changed = (out - x_btd).abs().amax(-1) > 0
    expect = torch.zeros(lay.n_tokens, dtype=torch.bool)
    expect[lay.n_prefix + 1 * 4 + 2] = expect[lay.n_prefix + 3 * 4 + 0] = True
    assert torch.equal(changed, expect.expand(n, -1))
    # with tied init weights, an edited patch where the feature fired re-encodes to exactly the clamp value
    fired = feature_codes(sae, x_btd[:, lay.n_prefix :], [4])[..., 0] > 0
    sel = fired & mask_p[None, :]
    assert sel.any()
    codes = feature_codes(sae, out[:, lay.n_prefix :], [4])[..., 0][sel]
    torch.testing.assert_close(codes, torch.full_like(codes, 9.0), rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    activation=st.sampled_from(["relu", "topk", "batchtopk"]),
    features=st.lists(st.integers(0, 23), min_size=1, max_size=3, unique=True),
    values=st.lists(st.floats(-3, 8, allow_nan=False), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fast_edit_matches_reference(activation, features, values, seed):
    g = torch.Generator().manual_seed(seed)
    d, s = 8, 24
    sae = SAE(SAEConfig(d, s, activation=activation, k=4 if activation != "relu" else 0))
    sae.set_normalization(torch.randn(64, d, generator=g) * 3 + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(s, generator=g) * 0.3)
        sae.threshold.fill_(0.2)
    x = torch.randn(2, 5, d, generator=g) * 3 + 1
    mask = torch.rand(2, 5, len(features), generator=g) > 0.4
    vals = torch.tensor([values[: len(features)]] * 2)
    ref = edit_reference(sae, x, features, vals, mask)
    fast = edit_fast(sae, x, features, vals, mask)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_random_direction_has_the_edit_norm_on_each_patch(tiny_bb):
    sae = make_sae(tiny_bb, layer=1)
    lay = tiny_bb.layout
    x_btd = tiny_bb.forward_to(images_bchw(tiny_bb), [1])[1]
    n = x_btd.shape[0]
    mask = feature_codes(sae, x_btd[:, lay.n_prefix :], [2]) > 0
    plan = EditPlan([2], torch.full((n, 1), 6.0), mask)
    real = apply_edit(sae, x_btd, lay, plan) - x_btd
    rand = random_direction_edit(sae, x_btd, lay, plan, direction_generator(0)) - x_btd
    torch.testing.assert_close(rand.norm(dim=-1), real.norm(dim=-1), rtol=1e-4, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(rand[:, lay.n_prefix :], real[:, lay.n_prefix :], dim=-1)
    assert float(cos[mask[..., 0]].abs().max()) < 0.99  # another direction, not the feature's


@pytest.mark.parametrize(
    ("text", "feature", "value", "multiple"),
    [("6909=0", 6909, 0.0, False), ("12=3.5", 12, 3.5, False), ("7=2x", 7, 2.0, True), ("top=0", None, 0.0, False),
     (" 3 = -1.5e1 ", 3, -15.0, False)],
)
def test_parse_clamp(text, feature, value, multiple):
    c = parse_clamp(text)
    assert (c.feature, c.value, c.multiple) == (feature, value, multiple)


@pytest.mark.parametrize("text", ["6909", "x=1", "5=abc", "5=2y", "-3=1"])
def test_parse_clamp_rejects(text):
    with pytest.raises(ProbeError, match="bad --clamp"):
        parse_clamp(text)


def test_patch_masks(tiny_bb):
    lay, ps = tiny_bb.layout, tiny_bb.patch_size  # 4x4 grid of 8-px patches
    assert static_mask(parse_patches("all"), lay, ps).all()
    assert static_mask(parse_patches("fired"), lay, ps) is None
    m = static_mask(parse_patches("box:0,0,9,8"), lay, ps).reshape(4, 4)
    assert m.sum() == 2 and m[0, 0] and m[0, 1]
    with pytest.raises(ProbeError, match=r"patch \(4,0\) is outside the 4x4 patch grid"):
        static_mask(parse_patches("4,0"), lay, ps)
    with pytest.raises(ProbeError, match="outside the 32x32 model input"):
        static_mask(parse_patches("box:0,0,40,8"), lay, ps)
    with pytest.raises(ProbeError, match="bad --patches"):
        parse_patches("1,2,3")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    features=st.lists(st.integers(0, 63), min_size=1, max_size=4, unique=True),
    cells=st.lists(st.booleans(), min_size=16, max_size=16),
    seed=st.integers(0, 1000),
)
def test_own_value_edit_is_the_plain_forward_property(tiny_bb, sae_l2, features, cells, seed):
    """For any features and any patch set, setting each feature to its own value leaves the timm head's output as is."""
    sae = sae_l2
    prober = Prober(sae, tiny_bb, resolve_head("timm", tiny_bb))
    x = images_bchw(tiny_bb, n=1, seed=seed)
    x_btd = prober.prefix(x)
    own = feature_codes(sae, x_btd[:, 1:], features)  # (1, p, k)
    mask = torch.tensor(cells)[None, :, None].expand_as(own)
    # one value per image, so only patches whose code equals the value are no-ops: pick patch j's value and
    # select the patches that share it (a feature's code is often 0 on many patches, so ablations are covered)
    j = int(torch.nonzero(torch.tensor(cells))[0]) if any(cells) else 0
    values = own[:, j, :]
    same = (own == values[:, None, :]) & mask
    plan = EditPlan(features, values, same)
    assert torch.equal(apply_edit(sae, x_btd, tiny_bb.layout, plan, fast=True), x_btd)
    out = prober.outputs(apply_edit(sae, x_btd, tiny_bb.layout, plan, fast=False))
    torch.testing.assert_close(out, prober.plain(x), rtol=1e-4, atol=1e-5)



def test_fired_patches_are_per_feature(tiny_bb, sae_l2):
    from saevctl.edit.edit import make_plan

    lay = tiny_bb.layout
    x_npd = tiny_bb.forward_to(images_bchw(tiny_bb), [2])[2][:, lay.n_prefix :]
    codes = feature_codes(sae_l2, x_npd, [1, 2])
    assert (codes > 0).any() and not (codes > 0).all()
    plan = make_plan(sae_l2, x_npd, [1, 2], torch.zeros(3, 2), parse_patches("fired"), None)
    assert torch.equal(plan.mask_npk, codes > 0)  # each feature only where it fires
    out = edit_fast(sae_l2, x_npd, [1], torch.zeros(3, 1), plan.mask_npk[..., :1])
    assert float(feature_codes(sae_l2, out, [1]).abs().max()) < 1e-4  # tied init: an ablation re-encodes to 0


def test_chunked_outputs_equal_one_pass(tiny_bb, sae_l2):
    prober = Prober(sae_l2, tiny_bb, resolve_head("timm", tiny_bb))
    x_btd = prober.prefix(images_bchw(tiny_bb, n=5))
    torch.testing.assert_close(prober.outputs(x_btd, chunk=2), prober.outputs(x_btd), rtol=1e-5, atol=1e-6)
    assert prober.variant_chunk(5) == 5  # CPU: one variant at a time
