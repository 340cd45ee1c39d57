"""What the evaluations share: where they write, which token kinds an SAE replaces, the patch grid, and
per-image class labels from a mask folder mapped to a head's classes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saevctl import layout, lock, workspace
from saevctl.data import ImageRecord
from saevctl.data.masks import MaskSet
from saevctl.data.preprocess import Preprocess
from saevctl.edit.heads import class_index, norm_class
from saevctl.edit.session import Prober
from saevctl.errors import IndexError_, ProbeError
from saevctl.sae.model import SAE
from saevctl.store.format import TokenLayout

log = logging.getLogger(__name__)
FORMAT = "saevctl-eval"


@contextlib.contextmanager
def summary_target(sae: Path | None, index: Path | None, out: Path | None, kind: str) -> Iterator[tuple[Path, Path]]:
    """(the SAE's checkpoint path, the JSON summary to write) of one evaluation, with the summary's write lock held
    for the block: `out`, else `<kind>.json` in the SAE's eval folder (see `out_dpath`)."""
    sae_path = workspace.resolve_sae_ref(sae)
    summary = out or layout.eval_summary_fpath(out_dpath(sae_path, index), kind)
    with lock.exclusive(summary, "the evaluation summary", "--out"):
        yield sae_path, summary


def out_dpath(sae_path: Path, index: Path | None) -> Path:
    """Default output folder of one SAE's evaluations: beside the mined index (--index, else the workspace's)
    when that index holds the SAE, so `saevctl report` links the card; else ./eval/<checkpoint name>."""
    ref = str(index) if index is not None else workspace.get_default("index")
    if ref is not None and Path(ref).expanduser().is_file():
        from saevctl.mine.index import Index

        fpath = Path(ref).expanduser()
        try:
            with Index.open(fpath, read_only=True) as idx:
                return layout.eval_dpath(fpath, idx.resolve_sae(str(sae_path)))
        except IndexError_ as e:
            log.info("not writing beside the index %s: %s", fpath, e.message)
    return layout.eval_dpath(None, ckpt_name(sae_path))


def ckpt_name(sae_path: Path) -> str:
    """The checkpoint folder's name (a one-SAE `train --out` folder names its only run)."""
    return workspace.resolve_ckpt(sae_path.expanduser()).resolve().name


def spliced_kinds(sae: SAE, n_cls: int) -> tuple[str, ...]:
    """Token kinds the SAE replaces: those it was trained on (patches by default; CLS too when trained on it)."""
    kinds = tuple(k for k in sae.cfg.tokens if k == "patches" or (k == "cls" and n_cls))
    if not kinds:
        raise ProbeError(f"the SAE was trained on {', '.join(sae.cfg.tokens)} tokens, none of which this model has",
                         "evaluate an SAE trained on patch or CLS tokens")
    return kinds


def token_slices(lay: TokenLayout, kinds: tuple[str, ...]) -> list[slice]:
    return [slice(lay.n_prefix, lay.n_tokens) if k == "patches" else slice(0, 1) for k in kinds]


def grid_hw(prober: Prober) -> tuple[int, int]:
    return prober.bb.layout.grid_h, prober.bb.layout.grid_w


# --- masks -> head classes ------------------------------------------------------------------------------


def mask_to_head(mask_classes: tuple[str, ...], head_classes: list[str]) -> np.ndarray:
    """Lookup table mask value -> head class index (-1: no such class in the head, or value 0, the ignored class).

    Names are matched (case and spacing ignored); a head trained without class names ("class V") matches value V.
    """
    by_name = class_index(head_classes)
    table = np.full(max(len(mask_classes), 1), -1, np.int64)
    for v, name in enumerate(mask_classes):
        if v == 0:
            continue
        hit = by_name.get(norm_class(name), by_name.get(f"class {v}"))
        if hit is not None:
            table[v] = hit
    return table


def open_checked_masks(spec: Path | str, records: list[ImageRecord], sae: Path | None = None) -> MaskSet:
    """The mask folder (`spec`: a folder, or the name of a mask set of the SAE's store), refused before any compute
    when its class file is missing, a mask's size differs from its image's (headers only), or no image has a mask
    (the checks `extract --masks` makes)."""
    from saevctl.data.masks import check_masks, open_masks
    from saevctl.edit.maskpatches import eval_mask_folder

    masks = open_masks(eval_mask_folder(spec, sae)[0])
    check_masks(masks, records)
    return masks


class MaskLabels:
    """Per-image patch labels from a mask folder (saevctl.data.masks), in mask values and in head classes."""

    def __init__(self, masks: MaskSet, prober: Prober, need_head: bool = True) -> None:
        """`need_head`: refuse masks none of whose classes the head predicts (off where only the patches of each
        class are needed, as when a classify head is tested)."""
        self.masks = masks
        self.prober = prober
        self.to_head = mask_to_head(tuple(self.masks.classes), prober.head.classes)
        if need_head and not (self.to_head >= 0).any():
            raise ProbeError(
                f"none of the mask classes in {masks.dpath} is a class of head {prober.head.name}",
                "use the head trained on these masks (saevctl heads train --task segment --masks DIR)",
            )

    def values(self, image_path: str, size_wh: tuple[int, int]) -> np.ndarray | None:
        """(p,) mask value per patch (-1 unlabelled), or None when the image has no mask."""
        from saevctl.data.masks import patch_labels

        fpath = self.masks.path_for(image_path)
        if fpath is None:
            return None
        bb = self.prober.bb
        labels = patch_labels(fpath, size_wh, bb.preprocess, grid_hw(self.prober), image=image_path)
        return np.asarray(labels, dtype=np.int64)

    def head_labels(self, values_p: np.ndarray) -> np.ndarray:
        """Mask values to head class indices (-1 where unlabelled or unknown to the head)."""
        ok = (values_p >= 0) & (values_p < len(self.to_head))
        return np.where(ok, self.to_head[np.clip(values_p, 0, len(self.to_head) - 1)], -1)


# --- images in batches --------------------------------------------------------------------------------


class Batch:
    """Decoded images of one batch: uint8 model inputs, their records and original sizes (w, h)."""

    def __init__(self, u8: np.ndarray, records: list[ImageRecord], sizes: list[tuple[int, int]], n_failed: int) -> None:
        self.u8, self.records, self.sizes, self.n_failed = u8, records, sizes, n_failed


def _decode(records: list[ImageRecord], pre: Preprocess) -> Batch:
    from saevctl.data import open_image
    from saevctl.errors import SaevctlError

    arrays, ok, sizes = [], [], []
    for rec in records:
        try:
            img = open_image(rec.path)
            arrays.append(pre.to_uint8(img))
        except SaevctlError as e:
            log.warning("skipping %s: %s", rec.path, e.message)
            continue
        ok.append(rec)
        sizes.append(img.size)
    u8 = np.stack(arrays) if arrays else np.zeros((0, pre.size, pre.size, 3), np.uint8)
    return Batch(u8, ok, sizes, len(records) - len(ok))


def iter_images(records: list[ImageRecord], pre: Preprocess, batch_size: int, n_workers: int) -> Iterator[Batch]:
    """Batches in order, decoded by threads at most `n_workers + 1` batches ahead (memory stays bounded)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    with ThreadPoolExecutor(max(1, n_workers)) as pool:
        pending: list[Future[Batch]] = []
        for i in range(len(chunks)):
            while len(pending) < min(n_workers + 1, len(chunks) - i):
                pending.append(pool.submit(_decode, chunks[i + len(pending)], pre))
            yield pending.pop(0).result()


def to_input(prober: Prober, u8: np.ndarray) -> Tensor:
    return prober.bb.preprocess.normalize(torch.from_numpy(u8).to(prober.device))


def jsonable(obj: Any) -> Any:
    """NaN and infinities become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def kinds_text(kinds: Iterable[str]) -> str:
    """Token kinds as words: ("patches", "cls") -> "patch + CLS"."""
    return " + ".join({"patches": "patch", "cls": "CLS"}.get(k, k) for k in kinds)
