"""CUDA against the CPU on the same inputs: stored activations, SAE weights after N training steps (relu, topk,
batchtopk; float32 and bfloat16), mined statistics and exemplars. Skipped without a CUDA GPU (marker `gpu`).

Each test records the error it measured before asserting, in the JSON-lines file named by SAEVCTL_PARITY_LOG when
set, so a GPU session keeps the figures even where a tolerance fails. The tolerances, and why:
- extraction, float32 store: relative error 5e-3. cuDNN runs the patch-embedding convolution in TF32 by default
  (10-bit mantissa), the blocks' matmuls in full float32.
- extraction, float16 store: relative error 3e-2. CUDA runs the forward under bfloat16 autocast (8-bit mantissa)
  where the CPU runs float32.
- training, float32: relative weight error 1e-3 after 40 steps; bfloat16: 5e-2, and the final FVU within 0.02.
  Adam divides each gradient by its running scale, so where a gradient is near zero, rounding can flip an
  update's sign: the error is bounded by lr x steps on those elements, which a norm-wise error averages out.
- mining: feature frequencies equal to 1e-3 absolute, maxima to 1e-3 relative, exemplar image sets of the
  firing features overlapping by at least 0.95 (ties at the k-th value can break differently).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
# The device compared with the CPU; "cpu" dry-runs this file on a machine without a GPU (CPU against CPU).
DEV = os.environ.get("SAEVCTL_PARITY_DEVICE", "cuda")


def _record(name: str, **figures: Any) -> None:
    log = os.environ.get("SAEVCTL_PARITY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [("float32", 5e-3), ("float16", 3e-2)])
def test_extract_on_cuda_matches_cpu(tiny_vit: str, image_dir: Path, tmp_path: Path, dtype: str, tol: float) -> None:
    from saevctl.extract import Config, run
    from saevctl.store import open_store

    stores = {}
    for dev in ("cpu", DEV):
        out = tmp_path / f"{dev}-{len(stores)}"
        run(Config(model=tiny_vit, images=str(image_dir), layers=(1, 3), out=out, dtype=dtype, batch_size=4,
                   images_per_shard=4, device=dev))
        stores[dev if not stores else "cuda"] = open_store(out)
    cpu, gpu = stores["cpu"], stores["cuda"]
    assert cpu.n_images == gpu.n_images == 12
    errs = {}
    for layer in (1, 3):
        for kind in ("patches", "cls"):
            a = getattr(gpu.layer(layer), kind).torch(slice(0, 12)).float()
            b = getattr(cpu.layer(layer), kind).torch(slice(0, 12)).float()
            assert torch.isfinite(a).all()
            errs[f"{kind}@{layer}"] = _rel(a, b)
    _record(f"extract-{dtype}", rel_err=errs, tolerance=tol)
    assert max(errs.values()) < tol, errs


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    from saevctl.train import synthetic as syn

    return syn.sample(syn.make_dictionary(32, 64, mean_active=4), 8192)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_on_cuda_matches_cpu(rows: np.ndarray, tmp_path: Path, dtype: str) -> None:
    from saevctl.sae import SAE
    from saevctl.train import Config, fit

    base = Config(width=("4x",), activation=("relu", "topk", "batchtopk"), k=(4,), batch_size=256,
                  n_tokens=256 * 40, log_every=10, lr_warmup=5, sparsity_warmup=10, n_norm_sample=4096,
                  buffer_rows=2048, dtype=dtype, lr=(1e-3,))
    for dev, out in (("cpu", "cpu"), (DEV, "cuda")):
        fit(rows, dataclasses.replace(base, out=tmp_path / out, device=dev))
    tol = 1e-3 if dtype == "float32" else 5e-2
    x = torch.from_numpy(rows[:4096]).float()
    figures: dict[str, dict[str, float]] = {}
    for ckpt in sorted(p.name for p in (tmp_path / "cpu").iterdir() if (p / "config.json").exists()):
        a, b = SAE.load(tmp_path / "cuda" / ckpt), SAE.load(tmp_path / "cpu" / ckpt)
        errs = {k: _rel(t, b.state_dict()[k]) for k, t in a.state_dict().items() if t.is_floating_point()}
        with torch.no_grad():
            fvu = [float(((s(x).x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()) for s in (a, b)]
        figures[ckpt] = {"max_rel_err": max(errs.values()), "fvu_cuda": fvu[0], "fvu_cpu": fvu[1]}
    _record(f"train-{dtype}", runs=figures, tolerance=tol)
    assert len(figures) == 3, figures
    for name, f in figures.items():
        assert f["max_rel_err"] < tol, (name, f)
        assert abs(f["fvu_cuda"] - f["fvu_cpu"]) < 0.02, (name, f)


def test_mine_on_cuda_matches_cpu(tiny_store: Path, tmp_path: Path) -> None:
    from saevctl.mine import Config as MineConfig
    from saevctl.mine import run as mine
    from saevctl.mine.index import Index
    from saevctl.sae import SAE, SAEConfig
    from saevctl.store import open_store

    store = open_store(tiny_store)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=store.d, n_latents=128, model=store.model, layer=3, tokens=("patches",)))
    sample = store.layer(3).patches.torch(slice(0, store.n_images)).float().reshape(-1, store.d)
    sae.set_normalization(sample)
    sae.save(tmp_path / "sae")
    tables = {}
    for dev in ("cpu", DEV):
        index = tmp_path / f"{len(tables)}.duckdb"
        mine(MineConfig(sae=tmp_path / "sae", store=tiny_store, index=index, device=dev, top_k=5, set_defaults=False))
        with Index.open(index) as idx:
            feats = idx.con.execute("SELECT feature, freq, max FROM features ORDER BY feature").fetchnumpy()
            ex = idx.con.execute("SELECT feature, image_id FROM exemplars").fetchall()
        tables["cpu" if not tables else "cuda"] = (feats, ex)
    (fc, exc), (fg, exg) = tables["cpu"], tables["cuda"]
    freq_err = float(np.abs(fc["freq"] - fg["freq"]).max())
    fired = fc["max"] > 0
    max_err = float((np.abs(fc["max"] - fg["max"])[fired] / fc["max"][fired]).max()) if fired.any() else 0.0
    sets_c: dict[int, set[int]] = {}
    sets_g: dict[int, set[int]] = {}
    for f, i in exc:
        sets_c.setdefault(f, set()).add(i)
    for f, i in exg:
        sets_g.setdefault(f, set()).add(i)
    overlap = [len(sets_c[f] & sets_g.get(f, set())) / len(sets_c[f]) for f in sets_c]
    mean_overlap = float(np.mean(overlap)) if overlap else 1.0
    _record("mine", freq_abs_err=freq_err, max_rel_err=max_err, exemplar_overlap=mean_overlap,
            features_fired=int(fired.sum()))
    assert fired.sum() > 10
    assert freq_err < 1e-3 and max_err < 1e-3 and mean_overlap >= 0.95


def test_eval_recon_on_cuda_matches_cpu(tiny_store: Path, tmp_path: Path) -> None:
    from saevctl.eval import run_recon
    from saevctl.eval.config import ReconConfig
    from saevctl.sae import SAE, SAEConfig
    from saevctl.store import open_store

    store = open_store(tiny_store)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=store.d, n_latents=128, model=store.model, layer=3, tokens=("patches",)))
    sae.set_normalization(store.layer(3).patches.torch(slice(0, store.n_images)).float().reshape(-1, store.d))
    sae.save(tmp_path / "sae")
    res = [run_recon(ReconConfig(sae=tmp_path / "sae", store=tiny_store, device=dev, batch_tokens=64,
                                 out=tmp_path / f"{i}.json"))
           for i, dev in enumerate(("cpu", DEV))]
    errs = {k: abs(getattr(res[1], k) - getattr(res[0], k)) / max(abs(getattr(res[0], k)), 1e-12)
            for k in ("mse", "nmse", "l0")}
    _record("eval-recon", rel_err=errs)
    assert max(errs.values()) < 1e-4, errs
