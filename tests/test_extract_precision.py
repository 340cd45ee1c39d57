"""--compute bfloat16: the forward runs under bfloat16 autocast (on a CPU too), its error against float32 is
measured on the first images and kept beside the store, and a store cannot be resumed in another precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saevctl.errors import SaevctlError
from saevctl.extract import Config, run
from saevctl.store import open_store


def _cfg(tiny_vit: str, image_dir: Path, out: Path, compute: str) -> Config:
    return Config(model=tiny_vit, images=str(image_dir), layers=(1, 3), out=out, dtype="float32", batch_size=4,
                  images_per_shard=4, device="cpu", compute=compute)


def test_bfloat16_forward_records_its_error_against_float32(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    ref = run(_cfg(tiny_vit, image_dir, tmp_path / "fp32", "auto"))
    low = run(_cfg(tiny_vit, image_dir, tmp_path / "bf16", "bfloat16"))
    assert ref.compute is None and not (tmp_path / "fp32" / "compute.json").exists()
    assert low.compute is not None
    rec = json.loads((tmp_path / "bf16" / "compute.json").read_text())
    assert rec == low.compute and rec["compute"] == "bfloat16" and rec["images_measured"] == 4
    a, b = open_store(tmp_path / "bf16"), open_store(tmp_path / "fp32")
    for layer in (1, 3):
        x, y = a.layer(layer).patches.torch(slice(0, 12)), b.layer(layer).patches.torch(slice(0, 12))
        stored_err = float((x - y).norm() / y.norm())
        # bfloat16 keeps 8 mantissa bits: about 0.4% per rounding, a few roundings deep; never exact float32.
        assert 1e-4 < stored_err < 5e-2
        # the recorded error is the same measurement on the first 4 images, so of the same size
        assert rec["rel_error_vs_float32"][str(layer)] == pytest.approx(stored_err, rel=1.0)
    assert not torch.equal(x, y)


def test_a_store_is_not_resumed_in_another_precision(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    run(_cfg(tiny_vit, image_dir, tmp_path / "s", "bfloat16"))
    with pytest.raises(SaevctlError, match="other settings"):
        run(_cfg(tiny_vit, image_dir, tmp_path / "s", "float32"))
