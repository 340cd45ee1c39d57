"""How much an edit changed a head's output: single-image before/after summaries, per-image effect sizes,
and bootstrap confidence intervals of their means (plain numpy, seeded).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

SALIENT = 0.5
"""Saliency probability above which a pixel counts as salient."""

# Per task: (metric key, label, magnitude?) — the magnitude metric is tested against the controls (the most sensitive
# measure of how far the head's output moved); DECISION says how many of the head's decisions the edit changed, which
# a verdict also needs: a shift no control matches can still flip only 0.5% of predictions.
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "classify": [
        ("tv", "total variation of class probabilities", True),
        ("dp_top", "Δ p(top class before)", False),
        ("top_changed", "prediction flips: top class changed (share of images)", False),
    ],
    "segment": [
        ("changed", "pixels whose class changed (share)", True),
        ("share_tv", "total variation of class pixel shares", False),
    ],
    "saliency": [
        ("mad", "mean |Δ saliency|", True),
        ("dmean", "Δ mean saliency", False),
        ("changed", "pixels crossing 0.5 (share)", False),
    ],
}
DECISION = {"classify": ("top_changed", "prediction flips"), "segment": ("changed", "pixels whose class changed"),
            "saliency": ("changed", "pixels crossing 0.5")}
"""Per task: the metric counting changed decisions (a share), and how a verdict names it."""
LABEL_METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "classify": [
        ("label_flips", "true-label flips: right before, wrong after (share of labelled images)", False),
        ("dacc", "Δ accuracy against the true label", False),
    ],
}
"""Metrics against the images' true labels (ImageFolder classes), where the head predicts those classes."""
VERDICT_TEST = ("specific when the edit's 95% bootstrap CI of the * effect lies above both controls' 95% CIs and the "
                "share of decisions it changes reaches --min-effect; 'too small' when only the first holds")


def primary_metric(task: str) -> str:
    return next(k for k, _, mag in METRICS[task] if mag)


def task_metrics(task: str, labelled: bool) -> list[tuple[str, str, bool]]:
    """The metrics reported for `task`, with the true-label ones when the images' labels are head classes."""
    return METRICS[task] + (LABEL_METRICS.get(task, []) if labelled else [])


def verdict(effect: dict[str, float], controls: dict[str, dict[str, float]], min_effect: float, label: str,
            size: dict[str, float] | None = None, size_label: str = "", share: bool = True) -> dict[str, Any]:
    """Whether an edit is specific, from its effect {mean, lo, hi} and each control's, and the share of decisions it
    changed (`size`, default the effect itself): 'specific' when the effect's CI lies above every control's CI and
    the size's mean reaches `min_effect`, 'too small' when only the first holds, else 'not specific'. The dict
    carries the test and the numbers, so a reader can check the call; `share` says the effect is a share."""
    size = size if size is not None else effect
    above = {c: bool(effect["lo"] > v["hi"]) for c, v in controls.items()}  # False when either is NaN
    separated = bool(above) and all(above.values())
    result = "specific" if separated and size["mean"] >= min_effect else "too small" if separated else "not specific"
    return {"result": result, "specific": result == "specific", "metric": label, "effect": effect,
            "controls": controls, "above": above, "size_metric": size_label or label, "size": size,
            "min_effect": min_effect, "share": share, "test": VERDICT_TEST}


def _ci_text(c: dict[str, float], share: bool) -> str:
    def f(x: float) -> str:
        return f"{100 * x:.1f}%" if share else f"{x:.4g}"

    return f"{f(c['mean'])} [{f(c['lo'])}, {f(c['hi'])}]"


def verdict_text(v: dict[str, Any]) -> str:
    """One line: the verdict, then the numbers behind it (no markup)."""
    ctrl = "; ".join(f"{c} {_ci_text(x, v['share'])}" for c, x in v["controls"].items())
    effect = f"{v['metric']} {_ci_text(v['effect'], v['share'])}"
    size = f"{v['size_metric']} {_ci_text(v['size'], True)}"
    floor = f"--min-effect {100 * v['min_effect']:.1f}%"
    if v["result"] == "not specific":
        return f"not specific: {effect} does not lie above both controls' CIs ({ctrl})"
    if v["result"] == "too small":
        return f"too small: {effect} lies above both controls' CIs ({ctrl}), but {size} is below {floor}"
    return f"specific: {effect} lies above both controls' CIs ({ctrl}), and {size} reaches {floor}"


# --- one image ---------------------------------------------------------------------------------------


def _ranks(p: np.ndarray) -> np.ndarray:
    order = np.argsort(-p, kind="stable")
    ranks = np.empty_like(order)
    ranks[order] = np.arange(len(p))
    return ranks + 1


def classify_summary(before_c: np.ndarray, after_c: np.ndarray, classes: list[str], k: int = 5) -> dict[str, Any]:
    """Top-k before and after, with deltas and ranks, and where the top class went."""
    rb, ra = _ranks(before_c), _ranks(after_c)

    def row(i: int) -> dict[str, Any]:
        return {"class": classes[i], "before": float(before_c[i]), "after": float(after_c[i]),
                "delta": float(after_c[i] - before_c[i]), "rank_before": int(rb[i]), "rank_after": int(ra[i])}

    top_b = np.argsort(-before_c, kind="stable")[:k]
    top_a = np.argsort(-after_c, kind="stable")[:k]
    top = int(top_b[0])
    return {
        "top_before": [row(int(i)) for i in top_b],
        "top_after": [row(int(i)) for i in top_a],
        "top_class": classes[top],
        "top_rank_after": int(ra[top]),
        "new_top_class": classes[int(top_a[0])],
        "tv": float(0.5 * np.abs(after_c - before_c).sum()),
    }


def dense_labels(probs_chw: np.ndarray, task: str) -> np.ndarray:
    """Per-pixel class: argmax for segmentation; salient (1) or not (0) for saliency."""
    labels_hw: np.ndarray = (probs_chw[0] > SALIENT).astype(np.int64) if task == "saliency" else probs_chw.argmax(0)
    return labels_hw


def dense_summary(
    before_chw: np.ndarray, after_chw: np.ndarray, task: str, classes: list[str], k: int = 10
) -> dict[str, Any]:
    """Per-class pixel share before and after, and the share of pixels whose class changed."""
    names = ["background", "salient"] if task == "saliency" else classes
    lb, la = dense_labels(before_chw, task), dense_labels(after_chw, task)
    n = len(names)
    share_b = np.bincount(lb.ravel(), minlength=n) / lb.size
    share_a = np.bincount(la.ravel(), minlength=n) / la.size
    shown = [i for i in np.argsort(-(share_b + share_a), kind="stable") if share_b[i] + share_a[i] > 0][:k]
    rows = [{"class": names[i], "before": float(share_b[i]), "after": float(share_a[i]),
             "delta": float(share_a[i] - share_b[i])} for i in shown]
    out: dict[str, Any] = {"rows": rows, "changed": float((lb != la).mean())}
    if task == "saliency":
        out["mean_before"], out["mean_after"] = float(before_chw.mean()), float(after_chw.mean())
        out["mad"] = float(np.abs(after_chw - before_chw).mean())
    return out


# --- many images ---------------------------------------------------------------------------------------


@torch.no_grad()
def effect_sizes(before: Tensor, after: Tensor, task: str, truth_b: Tensor | None = None) -> dict[str, np.ndarray]:
    """Per-image effect sizes (each a (b,) array) for the metrics of `task`; with `truth_b` (the true head class
    of each image, -1 unknown) also the true-label metrics, NaN where the truth is unknown."""
    if task == "classify":
        top = before.argmax(-1, keepdim=True)
        out = {
            "tv": 0.5 * (after - before).abs().sum(-1),
            "dp_top": (after.gather(-1, top) - before.gather(-1, top))[:, 0],
            "top_changed": (after.argmax(-1) != top[:, 0]).float(),
        }
        if truth_b is not None:
            truth = truth_b.to(before.device)
            known, right_b, right_a = truth >= 0, top[:, 0] == truth, after.argmax(-1) == truth
            nan = torch.full_like(out["tv"], float("nan"))
            out["label_flips"] = torch.where(known, (right_b & ~right_a).float(), nan)
            out["dacc"] = torch.where(known, right_a.float() - right_b.float(), nan)
    elif task == "segment":
        lb, la = before.argmax(1), after.argmax(1)
        share_b, share_a = class_shares(lb, before.shape[1]), class_shares(la, before.shape[1])
        out = {"changed": (lb != la).float().mean((1, 2)), "share_tv": 0.5 * (share_a - share_b).abs().sum(-1)}
    else:
        b, a = before[:, 0], after[:, 0]
        out = {
            "mad": (a - b).abs().mean((1, 2)),
            "dmean": (a - b).mean((1, 2)),
            "changed": ((a > SALIENT) != (b > SALIENT)).float().mean((1, 2)),
        }
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def class_shares(labels_bhw: Tensor, n_classes: int) -> Tensor:
    """Share of each image's pixels per class, (b, c), by counting (no one-hot of every pixel)."""
    flat = labels_bhw.reshape(labels_bhw.shape[0], -1)
    counts = torch.zeros(flat.shape[0], n_classes, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts / flat.shape[1]


def bootstrap_ci(
    values_n: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and a percentile bootstrap confidence interval of the mean (resampling images; NaN entries, images a
    metric does not apply to, are left out)."""
    v = np.asarray(values_n, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(v.mean()), float(lo), float(hi)
