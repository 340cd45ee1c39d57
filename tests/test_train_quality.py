"""Quality that can fail: activations built from a known sparse dictionary (more atoms than dimensions,
power-law frequencies, noise) written as a real store; trained ReLU and TopK SAEs must recover >= 90% of the
atoms (a decoder row at cosine > 0.9), while an untrained SAE recovers almost none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from saevctl.hardware import cpu_has_fast_bf16
from saevctl.sae import SAE
from saevctl.train import Config, run
from saevctl.train import synthetic as syn

D, N_ATOMS, WIDTH, BATCH, STEPS = 16, 48, "6x", 256, 1500


@pytest.fixture(scope="module")
def dictionary_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[syn.Dictionary, Path]:
    dic = syn.make_dictionary(D, N_ATOMS, mean_active=3, alpha=0.5, seed=0)
    x = syn.sample(dic, BATCH * STEPS, noise=0.02, seed=1)
    return dic, syn.write_store(tmp_path_factory.mktemp("dict") / "store", x, images_per_shard=2048)


def _train(store: Path, out: Path, **kw: object) -> SAE:
    cfg = Config(store=store, out=out, width=(WIDTH,), batch_size=BATCH, lr_warmup=50, sparsity_warmup=100,
                 log_every=100, device="cpu", **kw)
    return SAE.load(run(cfg).runs[0]["path"])


def test_untrained_sae_fails_the_criterion(dictionary_store: tuple[syn.Dictionary, Path]) -> None:
    dic, _ = dictionary_store
    rows = np.random.default_rng(123).standard_normal((6 * D, D))  # not the dictionary's seed
    assert syn.recovered_fraction(dic.atoms_ad, rows) < 0.2


def test_relu_l1_recovers_the_dictionary(dictionary_store: tuple[syn.Dictionary, Path], tmp_path: Path) -> None:
    dic, store = dictionary_store
    sae = _train(store, tmp_path / "relu", activation=("relu",), lr=(3e-2,), sparsity=(0.1,))
    frac = syn.recovered_fraction(dic.atoms_ad, sae.W_dec.detach().numpy())
    assert frac >= 0.9, f"ReLU SAE recovered only {frac:.0%} of the atoms"


def test_topk_recovers_the_dictionary(dictionary_store: tuple[syn.Dictionary, Path], tmp_path: Path) -> None:
    dic, store = dictionary_store
    sae = _train(store, tmp_path / "topk", activation=("topk",), lr=(1e-2,), k=(4,))
    frac = syn.recovered_fraction(dic.atoms_ad, sae.W_dec.detach().numpy())
    assert frac >= 0.9, f"TopK SAE recovered only {frac:.0%} of the atoms"
    assert sae.cfg.train["final"]["fvu"] < 0.3


def test_auxk_revives_dead_latents_in_a_short_run(tmp_path: Path) -> None:
    """500k tokens, under the default --dead-after of 1M: the threshold is capped at a tenth of the run, so the AuxK
    loss sees dead latents and brings them back (with the loss switched off, more stay dead)."""
    dic = syn.make_dictionary(32, 512, mean_active=3, alpha=0.5, seed=0)  # more atoms than live latents want
    batch, steps = 1000, 500
    store = syn.write_store(
        tmp_path / "store", syn.sample(dic, batch * steps, noise=0.02, seed=2), images_per_shard=4096
    )

    def dead(aux_coef: float) -> float:
        cfg = Config(store=store, out=tmp_path / f"aux{aux_coef}", width=("16x",), batch_size=batch, lr_warmup=20,
                     log_every=50, device="cpu", activation=("topk",), lr=(3e-2,), k=(4,), aux_coef=aux_coef)
        assert cfg.dead_after_tokens(steps) == batch * steps // 10
        return float(run(cfg).runs[0]["final"]["dead"])

    with_aux, without = dead(1 / 32), dead(0.0)
    assert without > 0.05, "the set-up must produce dead latents for the test to mean anything"
    assert with_aux < 0.5 * without, f"AuxK left {with_aux:.1%} dead vs {without:.1%} without it"


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="bfloat16 trains in float32 on a CPU without AMX / AVX512-BF16")
@pytest.mark.parametrize(("act", "kw"), [("relu", {"lr": (3e-2,), "sparsity": (0.1,)}), ("topk", {"lr": (1e-2,),
                                                                                               "k": (4,)})])
def test_bf16_reconstructs_within_one_percent_of_fp32(dictionary_store: tuple[syn.Dictionary, Path], tmp_path: Path,
                                                     act: str, kw: dict) -> None:
    """#17: bfloat16 autocast training on the planted dictionary ends within 1% (relative) of float32's FVU, and
    recovers the dictionary as well."""
    dic, store = dictionary_store
    fvu = {}
    for dtype in ("float32", "bfloat16"):
        sae = _train(store, tmp_path / dtype, activation=(act,), dtype=dtype, **kw)
        fvu[dtype] = sae.cfg.train["final"]["fvu"]
        assert syn.recovered_fraction(dic.atoms_ad, sae.W_dec.detach().numpy()) >= 0.9, dtype
    assert abs(fvu["bfloat16"] - fvu["float32"]) <= 0.01 * fvu["float32"], fvu
