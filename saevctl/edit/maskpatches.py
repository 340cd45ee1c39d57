"""Mask sets for probes and evaluations: `--masks DIR | NAME=DIR | NAME` (a set of the SAE's store), and
`--patches mask:CLASS` (or `mask:SET/CLASS`): the patches of each image whose mask class is CLASS.

A patch's class is the majority of its pixels after the model's resize and crop, exactly as `extract --masks` stores it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from saevctl.data.masks import MaskSet, open_masks, parse_mask_spec, patch_labels
from saevctl.data.preprocess import Preprocess
from saevctl.edit.heads import norm_class
from saevctl.errors import InputError, ProbeError, SaevctlError

log = logging.getLogger(__name__)


def store_mask_sets(store_dpath: Path | None) -> dict[str, Path]:
    """The mask folders of a store's sets by name, the default set first ({} without a store or masks)."""
    if store_dpath is None or not Path(store_dpath).is_dir():
        return {}
    from saevctl.store import open_store

    try:
        store = open_store(store_dpath)
        heads = {name: store.labels_info(extra) for name, extra in store.mask_sets().items()}
    except SaevctlError as e:
        log.info("not using the mask sets of %s: %s", store_dpath, e.message)
        return {}
    return {name: Path(str(h.get("given") or h["source"])) for name, h in heads.items() if h}


def mask_folders(specs: tuple[str, ...], store_dpath: Path | None) -> dict[str, Path]:
    """Named mask folders: each spec a folder (named after it), NAME=DIR, or the NAME of one of the store's sets;
    without specs, every set of the store."""
    return _named(specs, store_mask_sets(store_dpath))


def _named(specs: tuple[str, ...], known: dict[str, Path]) -> dict[str, Path]:
    if not specs:
        return known
    out: dict[str, Path] = {}
    for spec in specs:
        if "=" not in spec and spec in known and not Path(spec).expanduser().is_dir():
            out[spec] = known[spec]
            continue
        name, dpath = parse_mask_spec(spec)
        if not dpath.is_dir():
            sets = ", ".join(known) or "none"
            raise InputError(f"--masks {spec!r} is neither a mask folder nor a mask set of the SAE's store "
                             f"(its sets: {sets})", "pass a folder of PNG masks, NAME=DIR, or a set's name")
        out[name] = dpath
    return out


@dataclass(frozen=True)
class MaskPatches:
    """`--patches mask:CLASS` resolved: one class of one mask set."""

    set_name: str
    masks: MaskSet
    class_id: int

    @property
    def class_name(self) -> str:
        return self.masks.classes[self.class_id]

    def describe(self) -> str:
        return f"mask {self.set_name}/{self.class_name}"

    def select(self, image_path: str, pre: Preprocess, grid_hw: tuple[int, int]) -> np.ndarray | None:
        """(p,) bool: the image's patches of the class; None when the image has no mask in the set."""
        fpath = self.masks.path_for(image_path)
        if fpath is None:
            return None
        labels = patch_labels(fpath, _size(image_path), pre, grid_hw, image=image_path)
        selected: np.ndarray = labels == self.class_id
        return selected


def _size(image_path: str) -> tuple[int, int]:
    """An image's (width, height): the header of a file, else the decoded image (demo, tar and dataset paths)."""
    try:
        with Image.open(image_path) as img:
            return img.size
    except (OSError, ValueError):
        from saevctl.data import open_image

        return open_image(image_path).size


def _class_ids(masks: MaskSet, text: str) -> list[int]:
    """Ids (1..) of the classes of a set named `text` (case and spacing ignored), or the id `text` itself."""
    if text.isdigit():
        return [int(text)] if 0 < int(text) < len(masks.classes) else []
    want = norm_class(text)
    return [i for i, n in enumerate(masks.classes) if i > 0 and norm_class(n) == want]


def resolve_mask_patches(set_name: str | None, class_text: str, folders: dict[str, Path]) -> MaskPatches:
    """The set and class of `mask:[SET/]CLASS`: a class named in exactly one set needs no SET."""
    if not folders:
        raise ProbeError(f"--patches mask:{class_text} needs masks, and none were given",
                         "pass --masks DIR (a folder of PNG masks with its class file), or probe an SAE whose "
                         "store was extracted with --masks")
    if set_name is not None and set_name not in folders:
        raise ProbeError(f"no mask set {set_name!r} (mask sets: {', '.join(folders)})",
                         f"write --patches mask:SET/{class_text} with one of them")
    names = [set_name] if set_name is not None else list(folders)
    hits = [(n, m, i) for n in names for m in [open_masks(folders[n])] for i in _class_ids(m, class_text)]
    if not hits:
        where = f"mask set {set_name}" if set_name else f"the mask sets ({', '.join(names)})"
        raise ProbeError(f"no class {class_text!r} in {where}", "use a class name (or id) from the set's class file")
    if len({n for n, _, _ in hits}) > 1:
        sets = ", ".join(sorted({n for n, _, _ in hits}))
        raise ProbeError(f"class {class_text!r} is in several mask sets ({sets})",
                         f"name the set: --patches mask:SET/{class_text}")
    name, masks, class_id = hits[0]
    return MaskPatches(name, masks, class_id)


def sae_store(train_info: object) -> Path | None:
    """The store an SAE was trained on, from its checkpoint's training record (None when it does not say)."""
    ref = train_info.get("store") if isinstance(train_info, dict) else None
    return Path(ref) if ref else None


def mask_patches(patches_kind: str, mask_set: str | None, mask_class: str, specs: tuple[str, ...],
                 train_info: object) -> MaskPatches | None:
    """`--patches mask:...` resolved against `--masks` (default: the SAE's store's mask sets); None for other
    --patches."""
    if patches_kind != "mask":
        return None
    return resolve_mask_patches(mask_set, mask_class, mask_folders(specs, sae_store(train_info)))


def sae_store_of(sae: Path | str | None) -> Path | None:
    """The store an SAE checkpoint was trained on, read from its config.json without loading it (None when the
    checkpoint cannot be read or does not say: the full load reports what is wrong with it)."""
    import json

    from saevctl import layout, workspace

    try:
        ckpt = workspace.resolve_ckpt(workspace.resolve_sae_ref(Path(sae) if sae is not None else None))
        return sae_store(json.loads(layout.sae_config_fpath(ckpt).read_text()).get("train"))
    except (SaevctlError, OSError, ValueError, AttributeError):
        return None


def eval_mask_folder(spec: str | Path, sae: Path | str | None) -> tuple[Path, str]:
    """One evaluation --masks (a folder, NAME=DIR, or the NAME of a mask set of the SAE's store): its folder and
    the label level its classes were labelled at by `features label` (patch for the store's default set or a folder
    the store does not know, patch:NAME for another set)."""
    store_sets = store_mask_sets(sae_store_of(sae))
    dpath = next(iter(_named((str(spec),), store_sets).values()))
    real = dpath.expanduser().resolve()
    hit = next((n for n, d in store_sets.items() if d.expanduser().resolve() == real), None)
    return dpath, "patch" if hit is None or hit == next(iter(store_sets)) else f"patch:{hit}"
