"""Packaging: the CPU install uses faiss-cpu (and the code takes the CPU path here); the `gpu` extra and the
Dockerfile bring faiss-gpu from PyPI instead; the `hf` extra brings `datasets`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from saevctl.mine import vectors

ROOT = Path(__file__).resolve().parents[1]


def test_extras_name_the_right_faiss_and_datasets() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("faiss-cpu") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert any(d.startswith("datasets") for d in extras["hf"])
    assert any(d.startswith("datasets") for d in extras["test"])


def test_dockerfile_swaps_faiss_cpu_for_faiss_gpu() -> None:
    """Both wheels install the same `faiss` package folder, so the image must end with only the GPU one."""
    text = (ROOT / "Dockerfile").read_text()
    install = text.index("pip install '.[gpu")
    remove = text.index("pip uninstall -y faiss-cpu")
    reinstall = text.index("--force-reinstall --no-deps faiss-gpu")
    assert install < remove < reinstall


def test_cpu_faiss_path_is_chosen_without_a_gpu(tmp_path: Path) -> None:
    import faiss

    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        pytest.skip("this machine's faiss sees a GPU")
    w = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    index_fpath = tmp_path / "index.duckdb"
    vectors.save_decoder(index_fpath, "sae-1", w, "sha")
    index = vectors.load(index_fpath, "sae-1", "sha")
    assert "Gpu" not in type(index).__name__
    assert isinstance(index, faiss.Index)
    _, ids = vectors.search(index, w[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]


@pytest.mark.gpu
def test_gpu_faiss_path_is_chosen_with_a_gpu(tmp_path: Path) -> None:
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss-cpu is installed here (pip install 'saevctl[gpu]' for faiss-gpu)")
    w = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    index_fpath = tmp_path / "index.duckdb"
    vectors.save_decoder(index_fpath, "sae-1", w, "sha")
    assert "Gpu" in type(vectors.load(index_fpath, "sae-1", "sha")).__name__
