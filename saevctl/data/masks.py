"""Segmentation-mask folders (ADE20K style): one single-channel PNG of class ids per image, plus class names.

`open_masks(dir)` finds the masks and the class file; `patch_labels` turns one mask into a class id per ViT patch.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from saevctl.errors import InputError

if TYPE_CHECKING:
    from saevctl.data.images import ImageRecord
    from saevctl.data.preprocess import Preprocess

log = logging.getLogger(__name__)

CLASSES_TXT = "classes.txt"
ADE_OBJECT_INFO = "objectInfo150.csv"
ADE_OBJECT_INFO_TXT = "objectInfo150.txt"  # ADEChallengeData2016's own copy: tab-separated, names "a, b"
IGNORED = 0
"""Pixel value of 'other / unlabelled' (ADE20K's 0): never a class of a patch."""
UNLABELLED = -1
"""Patch (or image row) label meaning: no class (majority 0, no mask, or unreadable mask)."""


class MaskSizeError(InputError):
    """A mask whose pixel size differs from its image's: the folder pairs masks with the wrong images."""


@dataclass(frozen=True)
class MaskSet:
    dpath: Path
    """The mask folder (searched recursively for <image stem>.png)."""
    classes: tuple[str, ...]
    """Class names by id; classes[0] is the ignored 'other' class."""
    by_stem: Mapping[str, tuple[Path, ...]] = field(default_factory=dict, repr=False, compare=False)
    """Mask files by file stem (several when two sub-folders hold the same name)."""

    def path_for(self, image_path: str) -> Path | None:
        """The mask of an image, matched by file stem; None when there is none.

        When several masks share the stem, the one whose parent folders match the image's wins.
        """
        p = Path(image_path)
        found = self.by_stem.get(p.stem, ())
        if len(found) <= 1:
            return found[0] if found else None
        for depth in range(1, len(p.parts)):
            tail = p.parts[-1 - depth : -1]
            hits = [m for m in found if m.relative_to(self.dpath).parts[:-1][-depth:] == tail]
            if len(hits) == 1:
                return hits[0]
        raise InputError(
            f"{len(found)} masks in {self.dpath} are named {p.stem}.png ({found[0]}, {found[1]})",
            "give each image's mask a unique name, or mirror the image folders' layout in the mask folder",
        )

    @property
    def fingerprint(self) -> dict[str, object]:
        """What a store records so that a resume with other masks is refused."""
        return {"dpath": str(self.dpath), "classes": list(self.classes)}


def _read_classes_txt(fpath: Path) -> tuple[str, ...]:
    try:
        lines = fpath.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"cannot read the class file {fpath} ({type(e).__name__})", "write one UTF-8 class name per line"
        ) from e
    names = tuple(line.strip() for line in lines)
    while names and not names[-1]:
        names = names[:-1]
    if len(names) < 2:
        raise InputError(f"the class file {fpath} names {len(names)} classes",
                         "line 0 names the ignored class (e.g. other), lines 1.. name the classes")
    return names


def _read_object_info(fpath: Path) -> tuple[str, ...]:
    """ADE20K's objectInfo150.csv (Idx,Ratio,Train,Val,Name; 'building;edifice' -> 'building') or the
    challenge zip's tab-separated objectInfo150.txt ('building, edifice' -> 'building')."""
    try:
        with open(fpath, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if fpath.suffix == ".txt" else ","))
        by_id = {int(r["Idx"]): r["Name"].replace(";", ",").split(",")[0].strip() for r in rows}
    except (OSError, UnicodeDecodeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise InputError(f"cannot read the class file {fpath} ({type(e).__name__})",
                         "it needs ADE20K's Idx and Name columns") from e
    if not by_id or min(by_id) < 1:
        raise InputError(f"the class file {fpath} lists no classes with Idx >= 1", "use ADE20K's objectInfo150.csv")
    names = ["other"] + [by_id.get(i, f"class {i}") for i in range(1, max(by_id) + 1)]
    return tuple(names)


def _class_files(dpath: Path) -> list[Path]:
    """Where a mask folder's class file may sit, nearest first: classes.txt or ADE20K's objectInfo150.csv/.txt in the
    folder; objectInfo150 in its parent; classes.txt or objectInfo150 in its grandparent, beside the parent as
    ADE20K lays it out (ADEChallengeData2016/objectInfo150.txt beside annotations/training/). The path as given
    is searched first (a symlinked mask tree keeps the layout it is linked into), then as its links resolve."""
    given = Path(os.path.abspath(dpath.expanduser()))
    ade = (ADE_OBJECT_INFO, ADE_OBJECT_INFO_TXT)
    out: list[Path] = []
    for base in (given, given.resolve()):
        for d, names in ((base, (CLASSES_TXT, *ade)), (base.parent, ade), (base.parent.parent, (CLASSES_TXT, *ade))):
            out += [d / n for n in names if d / n not in out]
    return out


def read_classes(dpath: Path) -> tuple[str, ...]:
    """Class names of a mask folder from the nearest class file (`_class_files`): one name per line (classes.txt),
    or ADE20K's Idx/Name table."""
    for fpath in _class_files(dpath):
        if fpath.is_file():
            return _read_classes_txt(fpath) if fpath.name == CLASSES_TXT else _read_object_info(fpath)
    raise InputError(
        f"the mask folder {dpath} has no class file ({CLASSES_TXT} in it, or {ADE_OBJECT_INFO} or .txt in it, "
        f"its parent or grandparent, where {CLASSES_TXT} counts too)",
        f"add {CLASSES_TXT}: one class name per line, line 0 the ignored class",
    )


def _pngs(root: Path) -> Iterator[Path]:
    """Every .png under `root`, following symlinked folders (each real folder once, so a link loop ends) and
    skipping hidden files and folders."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if name.endswith(".png") and not name.startswith(".") and p.is_file():
                yield p


# --- named mask sets (extract --masks NAME=DIR, repeatable) ------------------------------------------------

_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


DEMO_MASKS = "demo"
"""`--masks demo`: the shapes drawn on the demo images (saevctl.data.demo), as `--images demo` names the images."""


def mask_dir(dpath: str | Path) -> Path:
    """The folder a --masks value names: `demo` is the demo's shape masks (written once under SAEVCTL_CACHE, a
    folder named `shapes`), anything else the path itself (~ expanded)."""
    if str(dpath).strip() == DEMO_MASKS:
        from saevctl.data.demo import ensure_demo_masks

        return ensure_demo_masks()
    return Path(dpath).expanduser()


def parse_mask_spec(text: str) -> tuple[str, Path]:
    """`NAME=DIR` or `DIR` (named after the folder, as given): one mask set's name and folder."""
    name, sep, rest = str(text).partition("=")
    if sep and _SET_NAME.fullmatch(name.strip()) and rest.strip():
        return name.strip(), mask_dir(rest.strip())
    dpath = mask_dir(str(text).strip())
    return Path(os.path.abspath(dpath)).name, dpath


def parse_mask_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """Several mask sets, names unique (the first is the store's default set)."""
    out = [parse_mask_spec(s) for s in specs]
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"two mask sets are named {dup!r}",
                         "name each set: --masks shape=DIR --masks colour=DIR")
    bad = next((n for n in names if not _SET_NAME.fullmatch(n)), None)
    if bad is not None:
        raise InputError(f"bad mask set name {bad!r}", "name it with letters, digits, '.', '_' or '-': NAME=DIR")
    return out


def open_masks(dpath: str | Path) -> MaskSet:
    """Index a mask folder (or `demo`); a missing folder, a folder without PNGs or without a class file is an
    InputError."""
    dpath = mask_dir(dpath)
    if not dpath.is_dir():
        raise InputError(f"mask folder {dpath} does not exist", "pass the folder of per-image PNG masks to --masks")
    given, dpath = dpath, dpath.resolve()
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(_pngs(dpath)):
        by_stem.setdefault(p.stem, []).append(p)
    if not by_stem:
        raise InputError(f"the mask folder {dpath} holds no .png masks",
                         "put one single-channel PNG of class ids per image there, named <image stem>.png")
    classes = read_classes(given)
    return MaskSet(dpath, classes, {k: tuple(v) for k, v in by_stem.items()})


def read_mask(mask_fpath: Path) -> np.ndarray:
    """A mask as an (h, w) int32 array of class ids; InputError when it is unreadable or not single-channel."""
    try:
        with Image.open(mask_fpath) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise InputError(f"mask {mask_fpath} is a {img.mode} image, not single-channel class ids",
                                 "save masks as 8- or 16-bit greyscale (or palette) PNGs whose values are class ids")
            return np.asarray(img).astype(np.int32)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InputError(
            f"cannot read mask {mask_fpath} ({type(e).__name__})", "the file is corrupt or not a PNG"
        ) from e


def mask_geometry(ids_hw: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Apply the model's resize/crop/pad to a class-id array with nearest-neighbour sampling: (size, size) int32.

    The ids travel as RGB (id >> 16, id >> 8, id & 255) through `Preprocess.geometry` itself, so the geometry is
    exactly the model's; nearest sampling copies whole pixels, and black padding decodes to the ignored id 0.
    """
    assert ids_hw.min(initial=0) >= 0 and ids_hw.max(initial=0) < 1 << 24, "class ids fit in 24 bits"
    rgb = np.stack([(ids_hw >> 16) & 255, (ids_hw >> 8) & 255, ids_hw & 255], axis=-1).astype(np.uint8)
    nearest = dataclasses.replace(pre, interpolation="nearest")
    out = np.asarray(nearest.geometry(Image.fromarray(rgb, "RGB")), dtype=np.int32)
    return (out[..., 0] << 16) | (out[..., 1] << 8) | out[..., 2]


def majority_per_patch(ids_hw: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Most common id among each patch's pixels, row-major over the grid: (gh * gw,) int16, -1 where that is 0.

    Ties go to the smaller id (so a patch half 'other' and half a class counts as unlabelled).
    """
    gh, gw = grid_hw
    h, w = ids_hw.shape
    assert h % gh == 0 and w % gw == 0, (ids_hw.shape, grid_hw)
    ph, pw = h // gh, w // gw
    patches = ids_hw.reshape(gh, ph, gw, pw).transpose(0, 2, 1, 3).reshape(gh * gw, ph * pw)
    # Dense ids for the bincount, so a mask using id 40000 does not allocate 40000 counters per patch.
    uniq, dense = np.unique(patches, return_inverse=True)
    dense = dense.reshape(patches.shape)
    k = len(uniq)
    counts = np.bincount((np.arange(gh * gw)[:, None] * k + dense).ravel(), minlength=gh * gw * k).reshape(gh * gw, k)
    best = uniq[counts.argmax(1)]
    return np.where(best == IGNORED, UNLABELLED, best).astype(np.int16)


def patch_labels(
    mask_fpath: Path,
    image_size: tuple[int, int],
    pre: Preprocess,
    grid_hw: tuple[int, int],
    *,
    image: str | None = None,
) -> np.ndarray:
    """Class id of each patch (row-major, int16, -1 unlabelled) of the image whose mask this is.

    `image_size` is the image's (width, height); a mask of another size is an InputError (`image` names it).
    """
    ids_hw = read_mask(Path(mask_fpath))
    mh, mw = ids_hw.shape
    iw, ih = image_size
    if (mw, mh) != (iw, ih):
        raise MaskSizeError(
            f"mask {mask_fpath} is {mw}x{mh} but its image {image or ''} is {iw}x{ih}".replace("  ", " "),
            "masks must have their image's exact pixel size (width x height)",
        )
    if int(ids_hw.max(initial=0)) > 0x7FFF:
        raise InputError(f"mask {mask_fpath} holds class id {int(ids_hw.max())}", "class ids must be below 32768")
    return majority_per_patch(mask_geometry(ids_hw, pre), grid_hw)


def check_masks(masks: MaskSet, records: Sequence[ImageRecord]) -> int:
    """Before any compute: every mask found has its image's size (headers only); at least one image has a mask.

    Returns how many images have a mask. Unreadable images are left to the activation pass to report.
    """
    n_found = 0
    for rec in records:
        mask_fpath = masks.path_for(rec.path)
        if mask_fpath is None:
            continue
        n_found += 1
        try:
            with Image.open(rec.path) as img:
                image_size = img.size
            with Image.open(mask_fpath) as mask:
                mask_size = mask.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # read fully later: an unreadable image has no row, an unreadable mask labels nothing
        if mask_size != image_size:
            raise MaskSizeError(
                f"mask {mask_fpath} is {mask_size[0]}x{mask_size[1]} but its image {rec.path} is "
                f"{image_size[0]}x{image_size[1]}",
                "masks must have their image's exact pixel size (width x height)",
            )
    if not n_found:
        raise InputError(f"no image has a mask in {masks.dpath} (masks are matched by file stem: <image stem>.png)",
                         "pass the mask folder of these images")
    log.info("%d of %d images have a mask in %s", n_found, len(records), masks.dpath)
    return n_found
