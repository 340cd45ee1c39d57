"""PNG pictures of a probe: the image with edited patches outlined next to before/after outputs,
and the batch mode's effect sizes with confidence intervals beside its two controls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl import atomic

if TYPE_CHECKING:  # matplotlib loads on first use
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, fpath: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    atomic.write_bytes(fpath, buf.getvalue())
    return fpath


def _outline(ax: Axes, image_u8: np.ndarray, edited_hw: np.ndarray, title: str) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(image_u8)
    gh, gw = edited_hw.shape
    ph, pw = image_u8.shape[0] / gh, image_u8.shape[1] / gw
    for r, c in zip(*np.nonzero(edited_hw), strict=True):
        ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="#00e5ff", linewidth=1.2))
    ax.set_title(title, fontsize=9)


def _segment_rgb(labels_hw: np.ndarray, n_classes: int) -> np.ndarray:
    cmap = _pyplot().get_cmap("tab20", max(n_classes, 2))
    rgb_hw3: np.ndarray = cmap(labels_hw % max(n_classes, 2))[..., :3]
    return rgb_hw3


def probe_figure(
    fpath: Path, task: str, image_u8: np.ndarray, edited_hw: np.ndarray, before: np.ndarray, after: np.ndarray,
    classes: list[str], title: str,
) -> Path:
    """image | before | after | change (dense heads), or image | before/after bar chart (classifiers)."""
    plt = _pyplot()
    n_edited = int(edited_hw.sum())
    if task == "classify":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 1.4]}, layout="constrained")
        _outline(axes[0], image_u8, edited_hw, f"edited patches ({n_edited})")
        _bars(axes[1], before, after, classes)
    else:
        fig, axes = plt.subplots(1, 4, figsize=(16, 4), layout="constrained")
        _outline(axes[0], image_u8, edited_hw, f"edited patches ({n_edited})")
        if task == "saliency":
            for ax, probs, name in ((axes[1], before, "before"), (axes[2], after, "after")):
                ax.imshow(image_u8)
                im = ax.imshow(probs[0], cmap="inferno", vmin=0, vmax=1, alpha=0.7)
                ax.set_title(f"{name}: saliency (mean {probs.mean():.3f})", fontsize=9)
            fig.colorbar(im, ax=axes[1:3], fraction=0.046, shrink=0.8)
            diff = after[0] - before[0]
        else:
            lb, la = before.argmax(0), after.argmax(0)
            for ax, labels, name in ((axes[1], lb, "before"), (axes[2], la, "after")):
                ax.imshow(_segment_rgb(labels, len(classes)))
                present = ", ".join(classes[i] for i in np.unique(labels)[:6])
                ax.set_title(f"{name}: {present}", fontsize=8)
            diff = (lb != la).astype(np.float32)
        lim = max(float(np.abs(diff).max()), 1e-6)
        im = axes[3].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[3].set_title("after − before" if task == "saliency" else "changed pixels", fontsize=9)
        fig.colorbar(im, ax=axes[3], fraction=0.046, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, fpath)


def _bars(ax: Axes, before_c: np.ndarray, after_c: np.ndarray, classes: list[str], k: int = 5) -> None:
    shown = list(dict.fromkeys([*np.argsort(-before_c)[:k], *np.argsort(-after_c)[:k]]))
    y = np.arange(len(shown))
    ax.barh(y - 0.2, before_c[shown], height=0.4, label="before", color="#8c8c8c")
    ax.barh(y + 0.2, after_c[shown], height=0.4, label="after", color="#d62728")
    ax.set_yticks(y, [classes[i][:40] for i in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    ax.legend(fontsize=8)


def batch_figure(fpath: Path, rows: list[dict[str, Any]], title: str, names: dict[str, str] | None = None) -> Path:
    """One panel per metric: mean and CI for the feature edit and each control (`names` relabels conditions)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False, layout="constrained")
    colors = ["#d62728", "#7f7f7f", "#bcbd22"]
    for ax, row in zip(axes[0], rows, strict=True):
        labels = [(names or {}).get(c["condition"], c["condition"]) for c in row["conditions"]]
        means = np.array([c["mean"] for c in row["conditions"]])
        err = np.array([[c["mean"] - c["lo"], c["hi"] - c["mean"]] for c in row["conditions"]]).T
        ax.bar(range(len(labels)), means, yerr=err, capsize=4, color=colors[: len(labels)])
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(row["label"], fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, fpath)
