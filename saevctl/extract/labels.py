"""The mask pass of `extract --masks`: one class id per patch of every stored row, beside the activations.

Runs after the activation pass (it needs the final row numbers); skipped when labels matching the masks exist.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl import atomic, layout
from saevctl.data.images import ImageRecord
from saevctl.data.masks import UNLABELLED, MaskSet, MaskSizeError, check_masks, parse_mask_specs, patch_labels
from saevctl.data.preprocess import Preprocess
from saevctl.errors import InputError

if TYPE_CHECKING:
    from saevctl.extract.config import Config
    from saevctl.extract.pipeline import Result
    from saevctl.vit import Backbone

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


def _labels_header(masks: MaskSet, name: str, given: Path, n_labelled: int, n_unreadable: int) -> dict[str, Any]:
    """`source` is the resolved mask folder (what a resume compares); `given` the folder as named, symlinks kept,
    where readers reopen the set (its class file may sit where only the given path leads)."""
    return {"schema": layout.LABELS_SCHEMA, "name": name, "classes": list(masks.classes), "source": str(masks.dpath),
            "given": os.path.abspath(given.expanduser()), "n_labelled_rows": n_labelled,
            "n_unreadable_masks": n_unreadable}


def labels_match(store_dpath: Path, masks: MaskSet, n_rows: int, n_patches: int, extra: str | None = None) -> bool:
    """Whether complete labels from these masks already sit beside the store (in labels/<extra>/ for a further
    mask set)."""
    try:
        head = json.loads(layout.store_classes_fpath(store_dpath, extra).read_text())
        arr = np.load(layout.store_patch_labels_fpath(store_dpath, extra), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return (isinstance(head, dict) and head.get("schema") == layout.LABELS_SCHEMA
            and head.get("classes") == list(masks.classes) and head.get("source") == str(masks.dpath)
            and arr.dtype == np.int16 and arr.shape == (n_rows, n_patches))


def _one_row(
    masks: MaskSet, im: dict[str, Any], pre: Preprocess, grid_hw: tuple[int, int]
) -> tuple[np.ndarray | None, bool]:
    """(labels or None when the image has no mask, whether its mask was unreadable)."""
    mask_fpath = masks.path_for(im["path"])
    if mask_fpath is None:
        return None, False
    try:
        labels = patch_labels(mask_fpath, (int(im["width"]), int(im["height"])), pre, grid_hw, image=im["path"])
    except MaskSizeError:
        raise
    except InputError as e:
        log.warning("ignoring mask %s: %s", mask_fpath, e.message)
        return None, True
    if int(labels.max(initial=0)) >= len(masks.classes):
        raise InputError(f"mask {mask_fpath} uses class id {int(labels.max())}, but the class file names ids "
                         f"0..{len(masks.classes) - 1}", "add the missing class names to the class file")
    return labels, False


def write_labels(
    store_dpath: Path, masks: MaskSet, images: list[dict[str, Any]], pre: Preprocess, grid_hw: tuple[int, int],
    n_workers: int = 4, progress: Progress | None = None, name: str = "masks", extra: str | None = None,
    given: Path | None = None,
) -> dict[str, Any]:
    """Label every stored row (images with row >= 0) and write patches.npy then classes.json, in labels/ (or
    labels/<extra>/ for a further mask set)."""
    rows = [im for im in images if im.get("row", -1) >= 0]
    n_patches = grid_hw[0] * grid_hw[1]
    out_fpath = layout.store_patch_labels_fpath(store_dpath, extra)
    tmp = out_fpath.with_name(f".{out_fpath.name}.tmp{os.getpid()}")
    n_labelled = n_unreadable = 0
    with atomic.translate_os_errors(out_fpath):
        out_fpath.parent.mkdir(parents=True, exist_ok=True)
        # A memory map cannot be empty: a store without rows gets a plain (0, n_patches) array.
        arr_np = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(len(rows), n_patches)) if rows
                  else np.zeros((0, n_patches), dtype=np.int16))
        try:
            arr_np[:] = UNLABELLED
            # PIL decodes and resizes without the GIL, so threads scale over the masks.
            with ThreadPoolExecutor(max(1, n_workers)) as pool:
                done = pool.map(lambda im: _one_row(masks, im, pre, grid_hw), rows)
                for im, (labels, unreadable) in zip(rows, done, strict=True):
                    if labels is not None:
                        arr_np[im["row"]] = labels
                        n_labelled += 1
                    n_unreadable += unreadable
                    if progress:
                        progress(1)
            if isinstance(arr_np, np.memmap):  # rows to write
                arr_np.flush()
            else:
                with open(tmp, "wb") as f:
                    np.lib.format.write_array(f, arr_np, allow_pickle=False)
            del arr_np
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out_fpath)
        finally:
            tmp.unlink(missing_ok=True)
    header = _labels_header(masks, name, given or masks.dpath, n_labelled, n_unreadable)
    atomic.write_json(layout.store_classes_fpath(store_dpath, extra), header)
    log.info("labelled %d of %d rows from %s", n_labelled, len(rows), masks.dpath)
    return header


def ensure_labels(
    store_dpath: Path, masks: MaskSet, pre: Preprocess, grid_hw: tuple[int, int], n_workers: int = 4,
    progress: Progress | None = None, name: str = "masks", extra: str | None = None, given: Path | None = None,
) -> dict[str, Any]:
    """Write one mask set's labels unless labels from these masks are already complete (resume); `extra` names the
    labels/ subfolder of a set after the first."""
    from saevctl.store import open_store

    store = open_store(store_dpath)
    n_no_row = len(store.images) - store.n_images  # unreadable images: listed, nothing to label
    if labels_match(store_dpath, masks, store.n_images, grid_hw[0] * grid_hw[1], extra):
        if progress:
            progress(len(store.images))
        kept: dict[str, Any] = json.loads(layout.store_classes_fpath(store_dpath, extra).read_text())
        return kept
    # A half-written pair (killed between the two files) is stale: classes.json goes first.
    layout.store_classes_fpath(store_dpath, extra).unlink(missing_ok=True)
    header = write_labels(store_dpath, masks, store.images, pre, grid_hw, n_workers, progress, name, extra, given)
    if progress and n_no_row:
        progress(n_no_row)
    return header


# --- hooks called by extract.pipeline.run ---------------------------------------------------------------


def masks_config(masks: tuple[str, ...]) -> dict[str, Any]:
    """The store-config entries for --masks (none without it, so stores made without masks keep their config): the
    first set under "masks" as stores of one set always had it (its name only when it differs from its folder's),
    the others under "mask_sets". A resume with other mask folders, names or class names is refused like any other
    changed setting."""
    sets = parse_mask_specs(masks)
    if not sets:
        return {}
    from saevctl.data.masks import read_classes

    def entry(name: str, given: Path) -> dict[str, Any]:
        dpath = given.expanduser().resolve()
        return {"name": name, "dpath": str(dpath), "classes": list(read_classes(given))}

    first = entry(*sets[0])
    if first["name"] == Path(first["dpath"]).name:
        del first["name"]
    out: dict[str, Any] = {"masks": first}
    if len(sets) > 1:
        out["mask_sets"] = [entry(name, given) for name, given in sets[1:]]
    return out


def before_extract(masks: tuple[str, ...], records: Sequence[ImageRecord]) -> None:
    """Refuse a bad mask folder (missing, no PNGs, no class file, wrong sizes) before the model even loads."""
    from saevctl.data.masks import open_masks

    for _, dpath in parse_mask_specs(masks):
        check_masks(open_masks(dpath), records)


def after_extract(cfg: Config, bb: Backbone, result: Result, progress: Progress | None = None) -> Result:
    """Write (or keep) the labels of every mask set once the store's activations are complete; rank 0 only under
    torchrun. `progress` is advanced once per listed image and set (the extract bar counts images once per pass).
    The result comes back with the sets' labels headers, which the CLI's summary shows."""
    from saevctl import dist
    from saevctl.data.masks import open_masks

    if not cfg.masks or not dist.is_main():
        return result
    lay = bb.layout
    headers = []
    for i, (name, dpath) in enumerate(parse_mask_specs(cfg.masks)):
        headers.append(ensure_labels(result.out, open_masks(dpath), bb.preprocess, (lay.grid_h, lay.grid_w),
                                     cfg.n_workers, progress, name, name if i else None, dpath))
    return dataclasses.replace(result, labels=headers[0], label_sets=headers)
