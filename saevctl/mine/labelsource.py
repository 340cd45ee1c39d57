"""Where `features label` gets its labels: the store's mask sets (per patch, or class presence per image) and
its ImageFolder labels, as (item, class) pairs for each chunk of rows, and what a class is ranked against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from saevctl.errors import StoreError
from saevctl.store import Store

NEGATIVES = {
    "foreground": "the other labelled (foreground) patches; --negatives all ranks against every patch of the masked "
                  "images, as AUROC is usually reported",
    "all": "every other patch of the images with a mask, unlabelled ('other') patches included",
    "image": "the other labelled images",
}


@dataclass
class LevelLabels:
    """One level's labels: per chunk, (item, class) pairs for the items of rows lo..hi."""

    level: str
    """patch or image: how items are scored."""
    classes: tuple[str, ...]
    pairs: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    skip_class: int | None = None
    """Class id never used as a label (a mask's ignored id 0)."""
    multi_label: bool = False
    """Items may carry several classes (image-level presence from masks)."""
    name: str = ""
    """The level as written to the index (default: `level`; a further mask set's adds :NAME)."""
    negatives: str = "image"
    """Key of NEGATIVES: what a class is ranked against."""

    @property
    def written(self) -> str:
        return self.name or self.level


def _single_pairs(labels: np.ndarray) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
    """One class per item: patch labels (rows, patches), flattened row-major like the codes, or image labels (rows,)."""
    def pairs(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        lab = np.asarray(labels[lo:hi]).reshape(-1)
        items = np.flatnonzero(lab >= 0)
        return items, lab[items].astype(np.int64)
    return pairs


def _all_pairs(labels: np.ndarray) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
    """--negatives all: every patch of a row with a mask is an item; an unlabelled one gets the ignored class 0, so
    it counts as a negative of every class and a positive of none. A row with no labelled patch (no mask, an
    unreadable one, or all 'other': the store cannot tell them apart) is left out."""
    def pairs(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        lab = np.asarray(labels[lo:hi])
        masked: np.ndarray = np.asarray((lab >= 0).any(1))
        flat = np.where(masked[:, None], np.maximum(lab, 0), -1).reshape(-1)
        items = np.flatnonzero(flat >= 0)
        return items, flat[items].astype(np.int64)
    return pairs


def _presence_pairs(patch_labels: np.ndarray, n_classes: int) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
    """Image-level labels from masks: an image is positive for every class that labels one of its patches."""
    def pairs(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        lab = np.asarray(patch_labels[lo:hi])
        present = np.zeros((len(lab), n_classes), dtype=bool)
        r, p = np.nonzero(lab >= 0)
        present[r, lab[r, p]] = True
        items, cls = np.nonzero(present)
        return items, cls.astype(np.int64)
    return pairs


def level_labels(store: Store, level: str, mask_set: str | None = None, negatives: str = "foreground"
                 ) -> list[LevelLabels]:
    """The labels of each requested level, from the store's mask set `mask_set` (None: its default set); a one-line
    error when the store has none for it."""
    extra = store.mask_set(mask_set)
    suffix = f":{mask_set}" if extra is not None else ""
    masks, images = store.patch_labels_of(extra), store.image_labels
    classes = store.classes_of(extra) or ()
    hint = "extract the store with --masks DIR (per-patch labels) or from an ImageFolder tree (image labels)"
    if level == "auto":
        levels = [lv for lv, ok in (("patch", masks is not None), ("image", images is not None)) if ok]
        if not levels:
            raise StoreError(f"the store {store.dpath} holds no class labels", hint)
        return [lab for lv in levels for lab in level_labels(store, lv, mask_set, negatives)]
    if level == "patch":
        if masks is None:
            raise StoreError(f"the store {store.dpath} holds no per-patch labels", "re-extract it with --masks DIR")
        pairs = _all_pairs(masks) if negatives == "all" else _single_pairs(masks)
        return [LevelLabels("patch", classes, pairs, skip_class=0, name="patch" + suffix, negatives=negatives)]
    if images is not None:
        return [LevelLabels("image", store.image_classes or (), _single_pairs(images))]
    if masks is not None:
        return [LevelLabels("image", classes, _presence_pairs(masks, len(classes)), skip_class=0, multi_label=True,
                        name="image" + suffix)]
    raise StoreError(f"the store {store.dpath} holds no image labels", hint)
