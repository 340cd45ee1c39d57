"""PNG figures of a training run: the curves of every SAE, and MSE vs L0 across the sweep (the paper's Fig. 4),
drawn only when the sweep has more than one SAE (one point says nothing about a trade-off)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from saevctl import atomic

CURVES = (
    ("fvu", "normalised MSE (FVU)"),
    ("l0", "L0 (active latents / token)"),
    ("dead", "dead fraction"),
    ("dense", "dense fraction"),
)
FRACTIONS = ("dead", "dense")
# Point sizes: every label at least 9 pt, so the PNG is readable at its natural size.
FONTS = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "legend.fontsize": 9}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_worthy(values: list[float]) -> bool:
    """A log axis only where the values span more than a decade: on a narrow range it flattens the curve."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _panel(ax: Any, key: str, title: str, by_run: dict[str, list[dict[str, Any]]]) -> None:
    """One metric over training, every run; y from 0 for counts and fractions so a flat line reads as its value."""
    values = [r[key] for rs in by_run.values() for r in rs]
    for run, rs in sorted(by_run.items()):
        ax.plot([r["tokens"] for r in rs], [r[key] for r in rs], label=run, lw=1.5, marker="." if len(rs) < 30 else "")
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3)
    if key in ("fvu", "l0") and _log_worthy(values):
        ax.set_yscale("log")
    elif values:
        top = max(values)
        # Fractions: at least 0..5% so a run with no dead latents shows a line at 0, not noise around it.
        ax.set_ylim(0, max(top * 1.15, 0.05 if key in FRACTIONS else 1e-6))
        if key in FRACTIONS:
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if len(by_run) == 1 and values:  # one run: its value in the title, where no line can cover it
        last = next(iter(by_run.values()))[-1][key]
        title += f" ({'constant' if min(values) == max(values) else 'final'} "
        title += (f"{last:.1%}" if key in FRACTIONS else f"{last:.4g}") + ")"
    ax.set_title(title)


def curves(records: list[dict[str, Any]], fpath: Path) -> Path:
    plt = _plt()
    _save(plt, curves_figure(records), fpath)
    return fpath


def curves_figure(records: list[dict[str, Any]]) -> Any:
    """The 2x2 figure of FVU, L0, dead and dense fractions over training tokens, one line per run."""
    plt = _plt()
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_run[r["run"]].append(r)
    with plt.rc_context(FONTS):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
            _panel(ax, key, title, by_run)
        if 1 < len(by_run) <= 12:
            axes.flat[0].legend()
        elif len(by_run) == 1:
            fig.suptitle(next(iter(by_run)))
        fig.tight_layout()
    return fig


def wants_pareto(runs: list[dict[str, Any]]) -> bool:
    """MSE vs L0 needs at least two SAEs with final metrics."""
    return len(runs) > 1 and all(r["final"] for r in runs)


def mse_vs_l0(runs: list[dict[str, Any]], fpath: Path) -> Path:
    """Final normalised MSE against final L0, one point per SAE, coloured by activation."""
    plt = _plt()
    with plt.rc_context(FONTS):
        fig, ax = plt.subplots(figsize=(7, 5))
        by_act: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            by_act[r["activation"]].append(r)
        for act, rs in sorted(by_act.items()):
            ax.scatter([r["final"]["l0"] for r in rs], [r["final"]["fvu"] for r in rs], label=act, s=36)
            if len(runs) <= 24:  # names beyond that would cover the points
                for r in rs:
                    ax.annotate(r["name"], (r["final"]["l0"], r["final"]["fvu"]), fontsize=9, alpha=0.8,
                                xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel("normalised MSE (FVU)")
        ax.set_title("reconstruction vs sparsity across the sweep")
        ax.grid(alpha=0.3)
        if _log_worthy([r["final"]["l0"] for r in runs]):
            ax.set_xscale("log")
        ax.legend()
        fig.tight_layout()
        _save(plt, fig, fpath)
    return fpath


def _save(plt: Any, fig: Any, fpath: Path) -> None:
    """PNG bytes in memory, then one atomic write: a full disk leaves the previous plot or none, never half."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(fpath, buf.getvalue())
