"""Training plots that say something for one run: linear axes where a log axis would flatten the curve, y from 0
with the value written where a line is flat, labels of at least 9 pt, and MSE vs L0 only for two SAEs or more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.train import plots
from saevctl.train import synthetic as syn


def _records(run: str, fvu: list[float], l0: float, dead: float) -> list[dict]:
    return [{"run": run, "tokens": 1000 * (i + 1), "fvu": v, "l0": l0, "dead": dead, "dense": 0.1}
            for i, v in enumerate(fvu)]


def _texts(fig: Any) -> list[Any]:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text()]


def test_single_run_panels_are_readable() -> None:
    import matplotlib.pyplot as plt

    fig = plots.curves_figure(_records("topk-w64", [0.9, 0.5, 0.3, 0.25], l0=32.0, dead=0.0))
    fvu, l0, dead, _dense = fig.axes
    assert fvu.get_yscale() == "linear"  # 0.25..0.9 is less than a decade
    assert l0.get_yscale() == "linear" and l0.get_ylim()[0] == 0 and l0.get_ylim()[1] > 32
    assert dead.get_ylim() == pytest.approx((0, 0.05))  # a line at 0 on a 0..5% axis, not on noise
    assert [ax.get_title() for ax in fig.axes] == ["normalised MSE (FVU) (final 0.25)",
                                                    "L0 (active latents / token) (constant 32)",
                                                    "dead fraction (constant 0.0%)", "dense fraction (constant 10.0%)"]
    assert min(t.get_fontsize() for t in _texts(fig)) >= 9
    plt.close(fig)
    wide = plots.curves_figure(_records("relu", [1.0, 0.1, 0.01], l0=5.0, dead=0.2))
    assert wide.axes[0].get_yscale() == "log"  # two decades: log shows the shape
    plt.close(wide)


def test_pareto_plot_only_for_several_saes(tmp_path: Path) -> None:
    dic = syn.make_dictionary(16, 32, mean_active=3)
    store = syn.write_store(tmp_path / "store", syn.sample(dic, 2048), images_per_shard=64)
    base = ["train", "--store", str(store), "--batch-size", "64", "--n-tokens", "1280", "--device", "cpu",
            "--log-every", "5"]
    one = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "one")], terminal_width=200)
    assert one.exit_code == 0, one.output
    assert "curves.png" in one.output and "mse_vs_l0" not in one.output
    assert not (tmp_path / "one" / "plots" / "mse_vs_l0.png").exists()
    two = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "two"), "--width", "2x,3x"], terminal_width=200)
    assert two.exit_code == 0, two.output
    assert "mse_vs_l0.png" in two.output and (tmp_path / "two" / "plots" / "mse_vs_l0.png").stat().st_size > 1000
