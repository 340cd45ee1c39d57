"""The one pass over a store that the vision metrics share (spatial coherence, sparse probing, absorption), and the
image labels they test against: ImageFolder labels, or mask classes (an image has a class when any patch has it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from saevctl.errors import InputError
from saevctl.eval.moran import morans_i_grid
from saevctl.memory import check_memory, device_memory, physical_memory
from saevctl.sae.compat import check_compatible
from saevctl.sae.model import SAE
from saevctl.store.reader import Store

Progress = Callable[[int], None]
BATCH_TOKENS = 4096
"""Patches encoded at once (whole images): memory is about 5 x this x n_latents floats."""


@dataclass
class ImageCodes:
    """Image-level codes of an SAE over the first `n_images` rows of a store, and the spatial sums."""

    codes_ns: np.ndarray
    """float32 (n, s): each latent's max over the image's patches (0: silent on the whole image)."""
    raw_nd: np.ndarray
    """float32 (n, d): each raw activation dimension's max over the image's patches (the same pooling)."""
    moran_sum_s: np.ndarray
    """float64 (s,): Moran's I summed over the images where the feature fires (and its map is not flat)."""
    moran_n_s: np.ndarray
    """int64 (s,): how many images entered `moran_sum_s`."""
    grid: tuple[int, int]
    layer: int

    @property
    def n_images(self) -> int:
        return len(self.codes_ns)


def _check_patches(sae: SAE, store: Store) -> int:
    if "patches" not in sae.cfg.tokens:
        raise InputError(f"the SAE was trained on {', '.join(sae.cfg.tokens)} tokens; the vision metrics read the "
                         "patch grid", "evaluate an SAE trained on patch tokens (saevctl train --tokens patches)")
    layer = check_compatible(sae.cfg, store=store, kinds=("patches",))
    lay = store.layout
    if lay.grid_h * lay.grid_w < 2:
        raise InputError(f"the store's patch grid is {lay.grid_h}x{lay.grid_w}: no neighbours to compare",
                         "use a model with more than one patch per image")
    return layer


@torch.no_grad()
def encode_store(sae: SAE, store: Store, *, max_images: int | None = None, batch_tokens: int = BATCH_TOKENS,
                 progress: Progress | None = None, on_total: Callable[[int], None] | None = None) -> ImageCodes:
    """Encode the patches of the first `max_images` stored images (all by default) a few whole images at a time,
    on the SAE's device: pooled codes and raw activations, and each feature's Moran's I per image where it fires."""
    layer = _check_patches(sae, store)
    arr = store.layer(layer).kind("patches")
    n = min(len(arr), max_images or len(arr))
    h, w = store.layout.grid_h, store.layout.grid_w
    s, d = sae.cfg.n_latents, store.d
    step = max(1, batch_tokens // (h * w))
    device = next(sae.parameters()).device
    available, where = device_memory(str(device))
    check_memory(5 * 4 * step * h * w * s, f"encoding {step} images of {h * w} patches into {s:,} latents",
                 "evaluate a narrower SAE", available=available, where=where)
    check_memory(4 * n * (s + d), f"image-level codes of {n:,} images", "pass --vision-max-images",
                 available=physical_memory())
    if on_total:
        on_total(n)
    out = ImageCodes(np.zeros((n, s), np.float32), np.zeros((n, d), np.float32), np.zeros(s, np.float64),
                     np.zeros(s, np.int64), (h, w), layer)
    moran_sum = torch.zeros(s, dtype=torch.float64, device=device)
    moran_n = torch.zeros(s, dtype=torch.int64, device=device)
    encode = sae.encoder()
    buf = torch.empty(step * h * w, s, device=device)  # reused: a fresh one per batch costs its page faults
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        x_bpd = arr.torch(slice(lo, hi)).to(device).float()
        codes_bps = encode(x_bpd.reshape(-1, d), out=buf[: (hi - lo) * h * w]).reshape(hi - lo, h * w, s)
        fired_bs = codes_bps.amax(dim=1)
        out.codes_ns[lo:hi] = fired_bs.cpu().numpy()
        out.raw_nd[lo:hi] = x_bpd.amax(dim=1).cpu().numpy()
        # every feature on every image of the batch from the codes' nonzeros; scored where it fires
        i_bs, defined_bs = morans_i_grid(codes_bps, h, w)
        scored_bs = defined_bs & (fired_bs > 0)
        moran_sum += torch.where(scored_bs, i_bs, torch.zeros_like(i_bs)).sum(0)
        moran_n += scored_bs.sum(0)
        if progress:
            progress(hi - lo)
    out.moran_sum_s[:], out.moran_n_s[:] = moran_sum.cpu().numpy(), moran_n.cpu().numpy()
    return out


# --- labels ----------------------------------------------------------------------------------------------------


@dataclass
class LabelSet:
    """Binary image labels, one column per class kept (enough images with and without it)."""

    source: str
    """"image" (ImageFolder labels) or "mask" (an image has a class when any of its patches has it)."""
    classes: list[str]
    y_nc: np.ndarray
    """bool (n, c): image has the class; rows without any label are all False and excluded by `known_n`."""
    known_n: np.ndarray
    """bool (n,): the image carries labels (an ImageFolder label, or a mask)."""
    n_dropped: int
    """Classes left out for having fewer than min_positives images with, or without, them."""
    note: str = ""
    """Why no class is left, when none is (then `classes` is empty)."""


def _image_source(store: Store, n: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    classes, labels = store.image_classes, store.image_labels
    if classes is None or labels is None or len(classes) < 2:
        return None
    lab = np.asarray(labels[:n], dtype=np.int64)
    y = np.zeros((n, len(classes)), bool)
    known = lab >= 0
    y[np.flatnonzero(known), lab[known]] = True
    return list(classes), y, known


def _mask_source(store: Store, n: int, name: str | None) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    extra = store.mask_set(name)  # a StoreError naming the store's sets when it has no set `name`
    classes, patches = store.classes_of(extra), store.patch_labels_of(extra)
    if classes is None or patches is None:
        return None
    lab = np.asarray(patches[:n], dtype=np.int64)
    y = np.zeros((n, len(classes)), bool)
    hit = (lab >= 1) & (lab < len(classes))  # value 0 is the ignored class
    rows = np.broadcast_to(np.arange(n)[:, None], lab.shape)
    y[rows[hit], lab[hit]] = True
    return list(classes[1:]), y[:, 1:], np.asarray((lab >= 0).any(axis=1))


def label_set(store: Store, source: str, n_images: int, min_positives: int, allow_empty: bool = False) -> LabelSet:
    """The store's image labels from `source` (auto, image, mask or mask:NAME) for its first `n_images` rows, keeping
    the classes
    with at least `min_positives` labelled images with and without them. InputError when the store has no such
    labels, and when no class is left unless `allow_empty` (then the set has no class and says why)."""
    found, used = None, source
    if source in ("auto", "image"):
        found, used = _image_source(store, n_images), "image"
    if found is None and (source in ("auto", "mask") or source.startswith("mask:")):
        name = source[len("mask:"):] if source.startswith("mask:") else None
        found, used = _mask_source(store, n_images, name), source if name else "mask"
    if found is None:
        what = {"auto": "neither ImageFolder labels of two or more classes nor mask classes",
                "image": "no ImageFolder labels of two or more classes"}.get(source, "no mask classes")
        raise InputError(f"the store {store.dpath} has {what}",
                         "extract from an ImageFolder tree or with --masks DIR, or pass another --labels")
    classes, y, known = found
    n_pos = y[known].sum(0)
    n_neg = int(known.sum()) - n_pos
    keep = (n_pos >= min_positives) & (n_neg >= min_positives)
    note = ""
    if not keep.any():
        note = (f"no {used} class of the store {store.dpath} has {min_positives} images with it and {min_positives} "
                "without it")
        if not allow_empty:
            raise InputError(note, "pass a lower --min-positives, or evaluate on more images")
    return LabelSet(used, [c for c, k in zip(classes, keep, strict=True) if k], y[:, keep], known,
                    int((~keep).sum()), note)
