"""PNG figures of a training run: the curves of every SAE, and MSE vs L0 across the sweep (the paper's Fig. 4)."""

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


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(records: list[dict[str, Any]], fpath: Path) -> Path:
    plt = _plt()
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_run[r["run"]].append(r)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        for run, rs in sorted(by_run.items()):
            ax.plot([r["tokens"] for r in rs], [r[key] for r in rs], label=run, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        if key in ("fvu", "l0") and all(r[key] > 0 for r in records):
            ax.set_yscale("log")
    if len(by_run) <= 12:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    _save(plt, fig, fpath)
    return fpath


def mse_vs_l0(runs: list[dict[str, Any]], fpath: Path) -> Path:
    """Final normalised MSE against final L0, one point per SAE, coloured by activation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_act: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_act[r["activation"]].append(r)
    for act, rs in sorted(by_act.items()):
        ax.scatter([r["final"]["l0"] for r in rs], [r["final"]["fvu"] for r in rs], label=act, s=28)
        for r in rs:
            ax.annotate(r["name"], (r["final"]["l0"], r["final"]["fvu"]), fontsize=5, alpha=0.7)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("normalised MSE (fraction of variance unexplained)")
    ax.set_title("reconstruction vs sparsity across the sweep")
    if all(r["final"]["l0"] > 0 for r in runs):
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
