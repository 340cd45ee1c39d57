"""k-sparse linear probes for image labels: for each class (one against the rest), the k features whose standardised
class means differ most on a training split, then a class-balanced logistic regression on them, scored on held-out
images; the same for the raw activations (k dimensions), with paired bootstrap CIs over the held-out images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from saevctl.errors import InputError
from saevctl.eval.imagecodes import ImageCodes, LabelSet
from saevctl.eval.metrics import percentile_ci, resample_weights

TEST_FRAC = 0.25
"""Share of the labelled images held out to score the probes."""
L2 = 1e-3
"""Weight of the squared L2 penalty on the probe's weights (on standardised features): keeps separable fits finite."""
MAX_ITER = 200
CHANCE = 0.5
"""Balanced accuracy of a probe that ignores its input."""


@dataclass
class SparseProbeResult:
    source: str
    classes: list[str]
    ks: list[int]
    rows: list[dict[str, Any]]
    """Per k: balanced accuracy averaged over classes, `sae`, `raw` and `diff` (sae - raw), each mean/lo/hi."""
    per_class: dict[str, dict[str, list[float | None]]]
    """{"sae"|"raw": {str(k): balanced accuracy per class}} (None where a class has no held-out positive)."""
    top_feature: list[int]
    """The SAE latent chosen first for each class (its k=1 probe)."""
    n_train: int
    n_test: int
    n_dropped: int
    notes: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, labels: LabelSet, ks: tuple[int, ...]) -> SparseProbeResult:
        """No class to probe (`labels.note` says why)."""
        return cls(labels.source, [], sorted(set(ks)), [], {}, [], 0, 0, labels.n_dropped, [labels.note])

    def figures(self) -> dict[str, Any]:
        return {"labels": self.source, "classes": self.classes, "ks": self.ks, "chance": CHANCE, "rows": self.rows,
                "per_class": self.per_class, "top_feature": self.top_feature, "n_train": self.n_train,
                "n_test": self.n_test, "n_classes_dropped": self.n_dropped, "test_frac": TEST_FRAC, "notes": self.notes}


def split(labels: LabelSet, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) of the labelled images, seeded: stratified by class for single-label (ImageFolder)
    labels, a plain random split for mask classes (an image may hold several)."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(labels.known_n)
    if labels.source == "image":
        groups = [rows[labels.y_nc[rows, c]] for c in range(labels.y_nc.shape[1])]
        groups.append(rows[~labels.y_nc[rows].any(1)])  # images of the classes dropped
    else:
        groups = [rows]
    test = [g[rng.permutation(len(g))[: round(TEST_FRAC * len(g))]] for g in groups if len(g)]
    test_rows = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_rows = np.setdiff1d(rows, test_rows)
    if not len(test_rows) or not len(train_rows):
        raise InputError(f"{len(rows)} labelled images are too few to hold out {TEST_FRAC:.0%} of them",
                         "evaluate on more images (or raise --min-positives)")
    return train_rows, test_rows


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = np.where(sd > 0, sd, np.inf)  # a constant feature becomes 0 everywhere
    return (torch.from_numpy((x_train - mu) / sd), torch.from_numpy((x_test - mu) / sd))


def select_features(z_nf: torch.Tensor, y_nc: torch.Tensor, k: int) -> torch.Tensor:
    """(c, k) indices: per class, the k features of largest |mean among positives - mean among negatives| of the
    standardised features (the class-mean difference in units of each feature's spread), largest first."""
    y = y_nc.double()
    mean_pos = (y.T @ z_nf) / y.sum(0).clamp_min(1)[:, None]
    mean_neg = ((1 - y).T @ z_nf) / (1 - y).sum(0).clamp_min(1)[:, None]
    return (mean_pos - mean_neg).abs().topk(min(k, z_nf.shape[1]), dim=1).indices


def fit_logistic(x_cnk: torch.Tensor, y_cn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (c, k) and biases (c,) of one logistic regression per class, fitted together (their losses are
    independent), each with positives and negatives weighted to count equally; L-BFGS in float64."""
    y = y_cn.double()
    n_pos = y.sum(1, keepdim=True).clamp_min(1)
    n_neg = (1 - y).sum(1, keepdim=True).clamp_min(1)
    weight = y * (0.5 / n_pos) + (1 - y) * (0.5 / n_neg)  # sums to 1 per class
    sign = 2 * y - 1
    w = torch.zeros(x_cnk.shape[0], x_cnk.shape[2], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x_cnk.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=MAX_ITER, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.einsum("cnk,ck->cn", x_cnk, w) + b[:, None]
        loss = (weight * torch.nn.functional.softplus(-sign * logits)).sum() + L2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _probe(z_train: torch.Tensor, z_test: torch.Tensor, y_train: torch.Tensor,
           ks: list[int]) -> tuple[dict[int, np.ndarray], torch.Tensor]:
    """Held-out predictions (c, n_test) bool of the k-sparse probe of each class for each k, and the features in
    the order they were chosen (c, max k)."""
    order = select_features(z_train, y_train, max(ks))
    out = {}
    for k in ks:
        idx = order[:, :k]  # (c, k); fewer where k exceeds the features
        w, b = fit_logistic(z_train[:, idx].permute(1, 0, 2), y_train.T)
        logits = torch.einsum("cnk,ck->cn", z_test[:, idx].permute(1, 0, 2), w) + b[:, None]
        out[k] = (logits > 0).numpy()
    return out, order


def balanced_accuracy(pred_cn: np.ndarray, y_cn: np.ndarray, w_bn: np.ndarray) -> np.ndarray:
    """(b, c) balanced accuracy (mean of the recalls of positives and negatives) of each class, for each row of image
    weights (a bootstrap resample, or ones); NaN where the weighted images hold no positive or no negative."""
    hit = pred_cn == y_cn
    tp, pos = w_bn @ (hit & y_cn).T.astype(np.float64), w_bn @ y_cn.T.astype(np.float64)
    tn, neg = w_bn @ (hit & ~y_cn).T.astype(np.float64), w_bn @ (~y_cn).T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(0.5 * (tp / pos + tn / neg))


def _nanmean(a: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():  # an all-NaN row (no held-out positive) stays NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _ci(point: float, boot: np.ndarray) -> dict[str, float]:
    lo, hi = percentile_ci(boot)
    return {"mean": point, "lo": lo, "hi": hi}


def probe_from_codes(codes: ImageCodes, labels: LabelSet, ks: tuple[int, ...], n_boot: int,
                     seed: int) -> SparseProbeResult:
    """Fit and score the k-sparse probes of every class on the SAE's codes and on the raw activations."""
    train, test = split(labels, seed)
    y_train = torch.from_numpy(labels.y_nc[train])
    y_test = labels.y_nc[test].T  # (c, n_test)
    ks_ = sorted(set(ks))
    preds, order = {}, {}
    for name, x in (("sae", codes.codes_ns), ("raw", codes.raw_nd)):
        z_train, z_test = _standardise(x[train].astype(np.float64), x[test].astype(np.float64))
        preds[name], order[name] = _probe(z_train, z_test, y_train, ks_)
        del z_train, z_test
    ones = np.ones((1, len(test)))
    w = resample_weights(len(test), n_boot, seed + 1)
    rows: list[dict[str, Any]] = []
    per_class: dict[str, dict[str, list[float | None]]] = {"sae": {}, "raw": {}}
    for k in ks_:
        point = {m: balanced_accuracy(preds[m][k], y_test, ones)[0] for m in preds}
        boot = {m: _nanmean(balanced_accuracy(preds[m][k], y_test, w), axis=1) for m in preds}
        row: dict[str, Any] = {"k": k}
        for m in preds:
            row[m] = _ci(float(_nanmean(point[m])), boot[m])
            per_class[m][str(k)] = [float(v) if np.isfinite(v) else None for v in point[m]]
        row["diff"] = _ci(row["sae"]["mean"] - row["raw"]["mean"], boot["sae"] - boot["raw"])
        rows.append(row)
    notes = []
    if max(ks_) > min(codes.codes_ns.shape[1], codes.raw_nd.shape[1]):
        notes.append(f"a k above the number of features ({codes.raw_nd.shape[1]} raw dimensions, "
                     f"{codes.codes_ns.shape[1]} latents) uses them all")
    return SparseProbeResult(labels.source, labels.classes, ks_, rows, per_class, order["sae"][:, 0].tolist(),
                             len(train), len(test), labels.n_dropped, notes)
