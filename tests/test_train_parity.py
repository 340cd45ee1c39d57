"""The fast (stacked, fused, sparse-decoder) step must match the plain reference step: gradients, metrics and the
weights after several updates, for every architecture; the bf16 path must stay close to fp32."""

from __future__ import annotations

import pytest
import torch

from saevctl.train.config import RunSpec
from saevctl.train.group import SAEGroup

D, S, B = 16, 64, 48
CASES = [
    ("relu", 0, ()),
    ("topk", 4, ()),
    ("batchtopk", 4, ()),
    ("relu", 0, (8, 24, 64)),
    ("topk", 4, (16, 64)),
    ("batchtopk", 3, (16, 64)),
]


def _pair(act: str, k: int, mat: tuple[int, ...], dead_every: int) -> list[SAEGroup]:
    specs = [RunSpec(f"s{i}", act, S, 1e-3 * (i + 1), 3e-2 * (i + 1), k, mat) for i in range(3)]
    groups = [SAEGroup(specs, D, seed=0, aux_coef=1 / 32, device="cpu") for _ in range(2)]
    for g in groups:
        g.trackers["since_fired"][:, ::dead_every] = 10**9  # some latents start dead, so AuxK is exercised
    return groups


@pytest.mark.parametrize("dead_every", [3, 1])  # a third of the latents dead, or all (AuxK's two selections)
@pytest.mark.parametrize("act,k,mat", CASES)
def test_fast_step_matches_reference(act: str, k: int, mat: tuple[int, ...], dead_every: int) -> None:
    ref, fast = _pair(act, k, mat, dead_every=dead_every)
    gen = torch.Generator().manual_seed(0)
    saw_aux = False
    for t in range(4):
        x = torch.randn(B, D, generator=gen) * 1.5 + 0.3
        o_ref = ref.compute(x, 1.0, 10**8, "reference", False)
        o_fast = fast.compute(x, 1.0, 10**8, "fast", False)
        for name in o_ref.grads:
            torch.testing.assert_close(o_fast.grads[name], o_ref.grads[name], rtol=1e-4, atol=1e-5, msg=name)
        for field in ("loss_m", "mse_m", "fvu_m", "l1_m", "aux_m", "fired_ms", "min_act_m"):
            torch.testing.assert_close(getattr(o_fast, field), getattr(o_ref, field), rtol=1e-4, atol=1e-5, msg=field)
        saw_aux |= bool((o_ref.aux_m > 0).any())
        ref.apply(o_ref, t, 1.0, fused=False)
        fast.apply(o_fast, t, 1.0)
    for name in ref.params:  # Adam normalises tiny gradient differences up to ~lr, hence the looser bound
        torch.testing.assert_close(fast.params[name], ref.params[name], rtol=1e-3, atol=3e-4)
    assert saw_aux == (act != "relu")
    # the decoder constraint holds after every update
    torch.testing.assert_close(fast.params["W_dec"].norm(dim=-1), torch.ones(3, S))


def test_stacked_sweep_equals_separate_runs() -> None:
    """Training SAEs stacked gives each the same weights as training it alone."""
    specs = [RunSpec(f"r{i}", "relu", S, 2e-3 * (i + 1), 1e-2, 0, ()) for i in range(2)]
    together = SAEGroup(specs, D, 0, 1 / 32, "cpu")
    alone = [SAEGroup([s], D, 0, 1 / 32, "cpu") for s in specs]
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        x = torch.randn(B, D, generator=gen)
        together.apply(together.compute(x, 1.0, 10**8, "fast", False), t, 1.0)
        for g in alone:
            g.apply(g.compute(x, 1.0, 10**8, "fast", False), t, 1.0)
    for i, g in enumerate(alone):
        torch.testing.assert_close(together.params["W_enc"][i], g.params["W_enc"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act,k", [("relu", 0), ("topk", 4), ("batchtopk", 4)])
def test_bf16_path_is_close_to_fp32(act: str, k: int) -> None:
    """Every gradient of the bfloat16 step within a few percent of the float32 step's (measured: at most 1% for
    ReLU, 2% for TopK, 4% for BatchTopK, whose selection differs at near-ties)."""
    groups = [SAEGroup([RunSpec("a", act, S, 1e-3, 1e-2, k, ())], D, 0, 1 / 32, "cpu") for _ in range(2)]
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(2))
    o32 = groups[0].compute(x, 1.0, 10**8, "fast", False)
    o16 = groups[1].compute(x, 1.0, 10**8, "fast", True)
    torch.testing.assert_close(o16.mse_m, o32.mse_m, rtol=3e-2, atol=1e-3)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g32, g16 = o32.grads[name], o16.grads[name]
        assert float((g16 - g32).norm() / g32.norm()) < 0.08, name


@pytest.mark.parametrize("impl", ["torch", "compiled"])
def test_fused_adam_matches_plain_adam(impl: str) -> None:
    from saevctl.train import optim, optim_cpu

    gen = torch.Generator().manual_seed(3)
    params = {"a": torch.randn(2, 5, 4, generator=gen), "b": torch.randn(2, 4, generator=gen)}
    twin = {k: v.clone() for k, v in params.items()}
    m1, m2 = optim.init_moments(params), optim.init_moments(twin)
    for t in range(5):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        optim.adam_update(params, grads, m1, [1e-2, 3e-3], t)
        if impl == "torch":
            optim.adam_update_fused(twin, grads, m2, [1e-2, 3e-3], t)
        else:
            optim_cpu.adam_step(twin, grads, m2, [1e-2, 3e-3], t)
    for k in params:
        torch.testing.assert_close(twin[k], params[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m2[f"v.{k}"], m1[f"v.{k}"], rtol=1e-5, atol=1e-9)


def test_compiled_adam_keeps_the_decoder_constraint_as_torch_does() -> None:
    """The compiled pass folds the parallel-gradient removal and the renormalisation into Adam: the same update as
    the three torch steps, for decoders stacked with their own learning rates, and the caller's gradient kept."""
    from saevctl.train import optim, optim_cpu

    gen = torch.Generator().manual_seed(4)
    W = torch.randn(3, 40, 24, generator=gen)
    optim.normalize_rows(W)
    params = {"W_dec": W.clone(), "b_dec": torch.randn(3, 24, generator=gen)}
    twin = {k: v.clone() for k, v in params.items()}
    m1, m2 = optim.init_moments(params), optim.init_moments(twin)
    lrs = [1e-2, 3e-3, 1e-1]
    for t in range(6):
        grads = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in params.items()}
        kept = {k: v.clone() for k, v in grads.items()}
        optim_cpu.adam_step(twin, grads, m2, lrs, t, frozenset({"W_dec"}))
        assert all(torch.equal(grads[k], kept[k]) for k in grads)
        optim.remove_parallel_grads(params["W_dec"], grads["W_dec"])
        optim.adam_update(params, grads, m1, lrs, t)
        optim.normalize_rows(params["W_dec"])
    for k in params:
        torch.testing.assert_close(twin[k], params[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin["W_dec"].norm(dim=-1), torch.ones(3, 40))
    assert not torch.allclose(twin["W_dec"], W)  # the weights moved (lr 1e-1 on the third)


@pytest.mark.gpu
@pytest.mark.parametrize("act,k", [("relu", 0), ("topk", 4), ("batchtopk", 4)])
def test_cuda_stacked_step_matches_cpu_reference(act: str, k: int) -> None:
    """On CUDA, same-shape SAEs run as one bmm; the result must match the CPU reference."""
    specs = [RunSpec(f"s{i}", act, S, 1e-3, 3e-2 * (i + 1), k, ()) for i in range(3)]
    cpu, gpu = SAEGroup(specs, D, 0, 1 / 32, "cpu"), SAEGroup(specs, D, 0, 1 / 32, "cuda")
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(4))
    o_cpu = cpu.compute(x, 1.0, 10**8, "reference", False)
    o_gpu = gpu.compute(x.cuda(), 1.0, 10**8, "fast", False)
    for name in o_cpu.grads:
        torch.testing.assert_close(o_gpu.grads[name].cpu(), o_cpu.grads[name], rtol=1e-3, atol=1e-4)
