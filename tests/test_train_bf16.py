"""--dtype bfloat16 on a CPU: used where the CPU has fast bfloat16 (AMX / AVX512-BF16), float32 with a warning
where it would be emulated (slower than float32, #17)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pytest

from saevctl import hardware
from saevctl.hardware import cpu_has_fast_bf16
from saevctl.train import loop
from saevctl.train.config import Config


def _cfg(tmp_path: Path, dtype: Literal["float32", "bfloat16"]) -> Config:
    return Config(store=tmp_path / "store", out=tmp_path / "out", dtype=dtype, device="cpu")


def test_bf16_follows_the_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="saevctl.train.loop"):
        used = loop._use_bf16(_cfg(tmp_path, "bfloat16"), "cpu")
    assert used == cpu_has_fast_bf16()
    assert ("training in float32" in caplog.text) == (not used)


def test_bf16_falls_back_without_fast_bf16(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)  # a CPU without AMX / AVX512-BF16
    with caplog.at_level(logging.WARNING, logger="saevctl.train.loop"):
        assert not loop._use_bf16(_cfg(tmp_path, "bfloat16"), "cpu")
    assert "no AMX or AVX512-BF16" in caplog.text
    assert loop._use_bf16(_cfg(tmp_path, "bfloat16"), "cuda")
    assert not loop._use_bf16(_cfg(tmp_path, "float32"), "cpu")


def test_extract_bf16_falls_back_like_training(caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for both bfloat16 requests (hardware.bf16_is_fast): extract --compute bfloat16 on a CPU without fast
    bfloat16 computes in float32 with a warning, and is kept where it is fast."""
    from saevctl.extract import precision

    assert precision.resolve_compute("bfloat16", "cpu", "float16") == ("bfloat16" if cpu_has_fast_bf16()
                                                                         else "float32")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="saevctl.extract.precision"):
        assert precision.resolve_compute("bfloat16", "cpu", "float16") == "float32"
    assert "computing in float32" in caplog.text
    assert precision.resolve_compute("bfloat16", "cuda", "float16") == "bfloat16"
    assert precision.resolve_compute("auto", "cpu", "float16") == "float32"


def test_what_a_precision_runs_in_follows_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """hardware.runs_in says, before a run, the precision a request would work in (and record): eval reuses a
    baseline index mined that way, so on a CPU without fast bfloat16 an SAE mined in bfloat16 elsewhere does not
    have its baselines mined again at every run. It agrees with bf16_if_fast, which the runs themselves ask."""
    assert hardware.runs_in("float32", "cpu") == "float32"
    assert hardware.runs_in("bfloat16", "cuda") == "bfloat16"
    assert hardware.runs_in("bfloat16", "cpu") == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.runs_in("bfloat16", "cpu") == "float32"
    assert not hardware.bf16_if_fast("--compute bfloat16", "cpu", "mining")
    assert hardware.runs_in("bfloat16", "cuda") == "bfloat16" and hardware.bf16_if_fast("--dtype", "cuda", "x")


@pytest.mark.parametrize(("n", "dtype"), [(1024, "bfloat16"), (300, "bfloat16"), (512, "float32")])
def test_firing_counts_are_exact(n: int, dtype: str) -> None:
    """Counts far above 256 (where bfloat16 stops holding integers) come out exact, in blocks or by a plain sum."""
    import torch

    from saevctl.train.step_fast import _fired_counts

    gen = torch.Generator().manual_seed(n)
    f = torch.relu(torch.randn(2, n, 64, generator=gen) + torch.linspace(-3, 3, 64)).to(getattr(torch, dtype))
    expected = (f > 0).sum(1).float()
    assert expected.max() > 256 or n < 512
    counts = _fired_counts(f.clone())
    assert counts.dtype == torch.float32 and torch.equal(counts, expected)
