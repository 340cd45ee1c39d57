"""Quality that can fail: activations built from a known sparse dictionary (more atoms than dimensions,
power-law frequencies, noise) written as a real store; trained ReLU and TopK SAEs must recover >= 90% of the
atoms (a decoder row at cosine > 0.9), while an untrained SAE recovers almost none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
