"""Synthetic activations with known ground truth, for the quality test and the benchmark: a sparse code over a
random overcomplete dictionary (power-law atom frequencies, plus noise), written as a real activation store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saevctl.store import StoreWriter


@dataclass(frozen=True)
class Dictionary:
    atoms_ad: np.ndarray
    """Unit-norm atoms (n_atoms, d)."""
    freq_a: np.ndarray
    """Probability that each atom is active in a sample."""


def make_dictionary(d: int, n_atoms: int, mean_active: float, alpha: float = 0.5, seed: int = 0) -> Dictionary:
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    weights = (np.arange(n_atoms) + 1.0) ** -alpha
    freq = np.clip(weights / weights.sum() * mean_active, 0, 1)
    return Dictionary(atoms.astype(np.float32), freq)


def sample(dic: Dictionary, n: int, noise: float = 0.02, seed: int = 1) -> np.ndarray:
    """n samples: sum of active atoms with magnitudes in [0.5, 1.5], plus isotropic noise of std `noise`."""
    rng = np.random.default_rng(seed)
    active = rng.random((n, len(dic.freq_a))) < dic.freq_a
    mags = rng.uniform(0.5, 1.5, active.shape) * active
    x: np.ndarray = mags.astype(np.float32) @ dic.atoms_ad
    x += rng.standard_normal(x.shape).astype(np.float32) * noise
    return x


def recovered_fraction(atoms_ad: np.ndarray, W_dec_sd: np.ndarray, min_cos: float = 0.9) -> float:
    """Share of atoms whose best-matching decoder row has cosine above `min_cos`."""
    w = W_dec_sd / np.linalg.norm(W_dec_sd, axis=1, keepdims=True).clip(1e-12)
    best = (atoms_ad @ w.T).max(axis=1)
    return float((best > min_cos).mean())


def write_store(dpath: Path, acts_nd: np.ndarray, n_patches: int = 16, layer: int = 0,
                dtype: str = "float32", images_per_shard: int = 1024) -> Path:
    """Store rows as fake images of `n_patches` patch tokens each (a 1-row grid) plus a CLS token (their mean)."""
    n_img = len(acts_nd) // n_patches
    d = acts_nd.shape[1]
    patches = acts_nd[: n_img * n_patches].reshape(n_img, n_patches, d)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    config = {
        "model": {
            "spec": "synthetic",
            "arch": "synthetic-dictionary",
            "weights_sha256": "0" * 64,
            "n_blocks": layer + 1,
            "d_model": d,
            "layout": {"n_cls": 1, "n_reg": 0, "grid_h": 1, "grid_w": n_patches},
        },
        "layers": [layer],
        "tokens": ["patches", "cls"],
        "dtype": dtype,
        "images": {"spec": "synthetic", "n": n_img},
        "images_per_shard": images_per_shard,
    }
    writer = StoreWriter(dpath, config, n_img)
    for index, (lo, hi) in enumerate(writer.shard_ranges):
        arrays = {(layer, "patches"): patches[lo:hi].astype(np_dtype),
                  (layer, "cls"): patches[lo:hi].mean(1).astype(np_dtype)}
        images = [{"id": i, "path": f"synthetic/{i}", "label": None, "width": n_patches, "height": 1, "status": "ok"}
                  for i in range(lo, hi)]
        writer.write_shard(index, arrays, images)
    writer.finalize()
    return dpath
