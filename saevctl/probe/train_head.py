"""`saevctl heads train`: fit a linear head on a frozen ViT's tokens (classify: CLS or mean-pooled;
segment: per patch from ADE20K-style PNG masks), report validation accuracy or mIoU, save it."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from saevctl import layout, lock, rerun
from saevctl.config import resolve_device
from saevctl.data import ImageRecord, open_image, resolve_images
from saevctl.data.masks import IGNORED, MaskSet, check_masks, mask_dir, mask_geometry, read_classes
from saevctl.edit.heads import LinearClassifyHead, LinearSegmentHead, describe_model, save_head
from saevctl.errors import InputError, SaevctlError
from saevctl.probe import fresh
from saevctl.probe.config import HeadTrainConfig
from saevctl.vit import Backbone, Preprocess, load_backbone

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


@dataclass
class HeadTrainResult:
    out: Path
    task: str
    classes: list[str]
    n_train: int
    n_val: int
    metrics: dict[str, float]
    seconds: float
    unchanged: bool = False
    """The head in `out` was trained from the same inputs (saevctl.rerun): kept, nothing trained."""


def read_class_names(fpath: Path) -> tuple[list[str], int]:
    """(names, offset): mask value v is class v - offset; ADE20K's objectInfo150.csv has offset 1 (0 = other)."""
    try:
        lines = [ln.strip() for ln in Path(fpath).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise InputError(
            f"cannot read class names {fpath} ({e.strerror})", "pass a text file, one class name per line"
        ) from e
    if lines and lines[0].lower().startswith("idx,"):
        return [ln.split(",")[-1].split(";")[0].strip() for ln in lines[1:]], 1
    if not lines:
        raise InputError(f"the class-name file {fpath} is empty", "write one class name per line")
    return lines, 0


def _mask_folder_classes(masks: Path) -> tuple[str, ...] | None:
    """Class names from the mask folder's class file (classes.txt, objectInfo150), if it has one."""
    try:
        return read_classes(masks.expanduser().resolve())
    except InputError:
        return None


def _pair_masks(records: list[ImageRecord], masks: Path) -> list[tuple[ImageRecord, Path]]:
    """Each image with its mask (the same file stem); a mask whose size differs from its image's is refused, as
    `extract --masks` refuses it (headers only, before any compute)."""
    if not masks.is_dir():
        raise InputError(f"mask folder {masks} does not exist", "pass --masks DIR with one PNG per image")
    by_stem = {p.stem: p for p in sorted(masks.rglob("*.png"))}
    pairs = [(r, by_stem[Path(r.path).stem]) for r in records if Path(r.path).stem in by_stem]
    if not pairs:
        raise InputError(f"no mask in {masks} matches an image's file name", "masks are PNGs named like their images")
    # The pairs as a MaskSet, for the one size check extract and eval use (a head's mask folder needs no class file).
    check_masks(MaskSet(masks, (), {Path(m).stem: (m,) for _, m in pairs}), [r for r, _ in pairs])
    if len(pairs) < len(records):
        log.warning("%d images have no mask and are skipped", len(records) - len(pairs))
    return pairs


def mask_to_input(mask: Image.Image, pre: Preprocess, offset: int, n_classes: int, ignore: int) -> np.ndarray:
    """A mask through the image's geometry (nearest), as class indices; -1 where unlabelled or padded."""
    # The same nearest-neighbour geometry as `extract --masks` (16-bit ids survive it); the white canvas marks
    # what the geometry padded, which is never labelled even where id 0 is a real class.
    ids = mask if mask.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L") else mask.convert("L")
    values = mask_geometry(np.asarray(ids).astype(np.int32), pre).astype(np.int64)
    geo = dataclasses.replace(pre, interpolation="nearest")
    valid = np.asarray(geo.geometry(Image.new("RGB", mask.size, (255, 255, 255))))[..., 0] > 127
    labels = values - offset
    bad = ~valid | (values == ignore) | (labels < 0) | (labels >= n_classes)
    return np.where(bad, -1, labels)


def patch_labels(labels_hw: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """The most common labelled class in each patch (-1 when a patch has no labelled pixel)."""
    h, w = labels_hw.shape
    ph, pw = h // grid_h, w // grid_w
    blocks = labels_hw[: grid_h * ph, : grid_w * pw].reshape(grid_h, ph, grid_w, pw).transpose(0, 2, 1, 3)
    cells = blocks.reshape(grid_h * grid_w, ph * pw)
    out = np.full(grid_h * grid_w, -1, np.int64)
    for i, cell in enumerate(cells):
        vals = cell[cell >= 0]
        if vals.size:
            out[i] = np.bincount(vals).argmax()
    return out


@torch.no_grad()
def _tokens(bb: Backbone, layer: int, u8: np.ndarray, device: str) -> torch.Tensor:
    x = bb.preprocess.normalize(torch.from_numpy(u8).to(device))
    if layer == bb.n_blocks - 1:
        return bb.forward_tokens(x)
    return bb.forward_to(x, [layer])[layer]


def _fit(
    x_nd: torch.Tensor, y_n: torch.Tensor, n_classes: int, cfg: HeadTrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features; returns weights in raw feature space."""
    torch.manual_seed(cfg.seed)
    keep = y_n >= 0
    x, y = x_nd[keep].float(), y_n[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    lin = torch.nn.Linear(x.shape[1], n_classes).to(x.device)
    opt = torch.optim.AdamW(lin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = 8192
    # The cross-entropy gradient by hand, into reused buffers: autograd and a fresh (batch, d) gather per step cost
    # several times the step's own arithmetic, over the 1,000-odd steps of a head.
    z_buf = torch.empty(min(bs, len(z)), z.shape[1], device=z.device)
    lin.weight.grad, lin.bias.grad = torch.zeros_like(lin.weight), torch.zeros_like(lin.bias)
    W, bias = lin.weight.detach(), lin.bias.detach()  # views: opt.step updates them in place
    with torch.no_grad():
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(z), device=z.device)
            for i in range(0, len(z), bs):
                idx = perm[i : i + bs]
                zb = torch.index_select(z, 0, idx, out=z_buf[: len(idx)])
                g = torch.addmm(bias, zb, W.t()).softmax(1)  # d loss / d logits = (softmax - onehot) / batch
                g[torch.arange(len(idx), device=g.device), y[idx]] -= 1
                g /= len(idx)
                torch.mm(g.t(), zb, out=lin.weight.grad)
                torch.sum(g, 0, out=lin.bias.grad)
                opt.step()
    w = lin.weight.detach() / std
    return w, lin.bias.detach() - w @ mean


def _split(n: int, cfg: HeadTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise InputError(f"{cfg.images} has {n} usable image(s); a head needs at least 2", "add images")
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_val = min(n - 1, max(1, round(cfg.val_fraction * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _load_u8(records: list[ImageRecord], bb: Backbone) -> tuple[list[int], np.ndarray]:
    ok, arrays = [], []
    for i, r in enumerate(records):
        try:
            arrays.append(bb.preprocess.to_uint8(open_image(r.path)))
            ok.append(i)
        except SaevctlError as e:
            log.warning("skipping %s: %s", r.path, e.message)
    return ok, np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)


def _features(
    bb: Backbone, layer: int, records: list[ImageRecord], cfg: HeadTrainConfig, device: str,
    pick: Callable[[torch.Tensor], torch.Tensor], progress: Progress | None,
) -> tuple[list[int], torch.Tensor]:
    """Head inputs of every readable image (and the indices of those images)."""
    kept, feats = [], []
    for lo in range(0, len(records), cfg.batch_size):
        ok, u8 = _load_u8(records[lo : lo + cfg.batch_size], bb)
        if ok:
            feats.append(pick(_tokens(bb, layer, u8, device)))
            kept += [lo + i for i in ok]
        if progress:
            progress(len(records[lo : lo + cfg.batch_size]))
    if not feats:
        raise InputError(f"none of the images in {cfg.images} could be read", "check the --images folder")
    return kept, torch.cat(feats)


def _header(cfg: HeadTrainConfig, bb: Backbone, layer: int, classes: list[str], metrics: dict[str, float],
            extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": cfg.task, "model": describe_model(bb), "layer": layer, "final_norm": layer == bb.n_blocks - 1,
        "classes": classes, "metrics": metrics, **extra,
        "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
    }


def train_head(
    cfg: HeadTrainConfig, progress: Progress | None = None, backbone: Backbone | None = None,
    on_total: Progress | None = None,
) -> HeadTrainResult:
    """Cache the head's input features for every image, fit a linear head, evaluate it, save it.

    `on_total(n)` is told the number of images once they are listed (`progress` advances once per image). The head
    folder's write lock is held from the start, so a second training into it is refused before any work."""
    out = cfg.out or layout.heads_dpath() / cfg.task
    with lock.exclusive(out, "the head", "--out"):
        return _train_head(cfg, out, progress, backbone, on_total)


def _train_head(cfg: HeadTrainConfig, out: Path, progress: Progress | None, backbone: Backbone | None,
                on_total: Progress | None) -> HeadTrainResult:
    t0 = time.perf_counter()
    inputs = fresh.head_inputs(cfg)
    kept = None if cfg.force else rerun.kept(layout.head_config_fpath(out), inputs)
    if kept is not None and layout.head_weights_fpath(out).is_file():
        return HeadTrainResult(out, kept["task"], list(kept["classes"]), int(kept.get("n_train", 0)),
                               int(kept.get("n_val", 0)), dict(kept["metrics"]), float(kept.get("seconds", 0.0)),
                               unchanged=True)
    if cfg.masks is not None:  # `--masks demo`: the demo's shape masks, as extract and eval read them
        cfg = dataclasses.replace(cfg, masks=mask_dir(cfg.masks))
    device = resolve_device(cfg.device)
    records = list(resolve_images(cfg.images, cfg.max_images).records)
    if on_total:
        on_total(len(records))
    pairs = _pair_masks(records, cfg.masks) if cfg.masks is not None and cfg.task == "segment" else []
    bb = backbone if backbone is not None else load_backbone(cfg.model, device)
    layer = bb.check_layer(cfg.layer)
    if cfg.task == "classify":
        fitted = _train_classify(cfg, bb, layer, records, device, progress)
    else:
        if progress and len(pairs) < len(records):
            progress(len(records) - len(pairs))  # images without a mask are skipped
        fitted = _train_segment(cfg, bb, layer, pairs, device, progress)
    classes, metrics, extra, w, b, n_tr, n_val = fitted
    save_head(out, w, b, {**_header(cfg, bb, layer, classes, metrics, extra), "n_train": n_tr, "n_val": n_val,
                          "seconds": time.perf_counter() - t0, rerun.KEY: inputs})
    return HeadTrainResult(out, cfg.task, classes, n_tr, n_val, metrics, time.perf_counter() - t0)


def _train_classify(cfg: HeadTrainConfig, bb: Backbone, layer: int, records: list[ImageRecord], device: str,
                    progress: Progress | None) -> tuple[Any, ...]:
    classes = sorted({r.label for r in records if r.label is not None})
    if len(classes) < 2:
        raise InputError(f"{cfg.images} has no class labels (or only one class)",
                         "use an ImageFolder: one subfolder per class with its images inside")
    pool = cfg.pool if cfg.pool != "auto" else ("cls" if bb.layout.n_cls else "mean")
    if pool == "cls" and not bb.layout.n_cls:
        raise InputError(f"{bb.spec} has no CLS token", "use --pool mean")
    n_c = len(classes)
    probe = LinearClassifyHead(torch.zeros(n_c, bb.d_model), torch.zeros(n_c), pool, bb.layout.n_prefix)
    labelled = [r for r in records if r.label is not None]
    labels = [r.label for r in labelled if r.label is not None]  # aligned with `labelled`
    if progress and len(labelled) < len(records):
        progress(len(records) - len(labelled))  # unlabelled images are skipped
    kept, x = _features(bb, layer, labelled, cfg, device, probe.features, progress)
    y = torch.tensor([classes.index(labels[i]) for i in kept], device=x.device)
    tr, va = _split(len(kept), cfg)
    w, b = _fit(x[tr], y[tr], len(classes), cfg)

    def acc(idx: np.ndarray) -> float:
        return float(((x[idx] @ w.T + b).argmax(-1) == y[idx]).float().mean())

    metrics = {"val_accuracy": acc(va), "train_accuracy": acc(tr)}
    return classes, metrics, {"pool": pool}, w, b, len(tr), len(va)


def _train_segment(cfg: HeadTrainConfig, bb: Backbone, layer: int, pairs: list[tuple[ImageRecord, Path]],
                   device: str, progress: Progress | None) -> tuple[Any, ...]:
    assert cfg.masks is not None
    ignore = cfg.ignore_index
    if cfg.class_names is not None:
        classes, offset = read_class_names(cfg.class_names)
    elif (found := _mask_folder_classes(cfg.masks)) is not None:
        # the folder's own class file, read as `extract --masks` reads it: value 0 is 'other', never a class
        classes, offset, ignore = list(found), 0, IGNORED
    else:
        seen = set().union(*(np.unique(np.asarray(Image.open(m))).tolist() for _, m in pairs)) - {cfg.ignore_index}
        classes, offset = [f"class {v}" for v in range(max(seen, default=0) + 1)], 0
    lay = bb.layout
    kept, x = _features(bb, layer, [r for r, _ in pairs], cfg, device, lambda t: t[:, lay.n_prefix :], progress)
    pix = np.stack([mask_to_input(Image.open(pairs[i][1]), bb.preprocess, offset, len(classes), ignore) for i in kept])
    y = torch.from_numpy(np.stack([patch_labels(p, lay.grid_h, lay.grid_w) for p in pix])).to(x.device)
    tr, va = _split(len(kept), cfg)
    w, b = _fit(x[tr].reshape(-1, bb.d_model), y[tr].reshape(-1), len(classes), cfg)
    head = LinearSegmentHead(w.cpu(), b.cpu(), lay)
    size = (bb.preprocess.size, bb.preprocess.size)
    with torch.no_grad():
        pred = torch.cat([head.from_patches(x[i : i + 1].cpu(), size).argmax(1) for i in va]).numpy()
    truth = pix[va]
    metrics = {"val_miou": mean_iou(pred, truth, len(classes)),
               "val_pixel_accuracy": float((pred == truth)[truth >= 0].mean())}
    return classes, metrics, {}, w, b, len(tr), len(va)


def mean_iou(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """Mean of |pred ∩ truth| / |pred ∪ truth| over classes present in either (labelled pixels only)."""
    valid = truth >= 0
    p, t = pred[valid], truth[valid]
    inter = np.bincount(t[p == t], minlength=n_classes)
    union = np.bincount(p, minlength=n_classes) + np.bincount(t, minlength=n_classes) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")
