"""Resolve an --images argument into an ordered list of records and open each one as an RGB PIL image.

Ids are positions in a sorted listing, so they are stable across runs of the same source.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from saevctl.data import demo, hf, wds
from saevctl.data.demo import DEFAULT_DEMO_N, DEMO_PHOTOS, DEMO_SIZES  # noqa: F401  (re-exported)
from saevctl.data.demo import demo_array as _demo_array  # noqa: F401  (re-exported)
from saevctl.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageRecord:
    id: int
    """Position in the source listing (stable)."""
    path: str
    """File path, `skimage:NAME#...` for demo photos, `wds:TAR#MEMBER` or `hf:SOURCE[:SPLIT]#ROW`."""
    label: str | None = None
    """Class from an ImageFolder subfolder or a list file's second column."""


@dataclass(frozen=True)
class ImageSource:
    spec: str
    """The --images argument as given."""
    kind: str
    """folder, imagefolder, list, demo, wds or hf."""
    records: tuple[ImageRecord, ...]

    def fingerprint(self) -> str:
        """Hash of the ordered paths and labels: a store resumes only over the same listing."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.path}\t{r.label}\n".encode())
        return h.hexdigest()

    @property
    def labels(self) -> list[str]:
        return sorted({r.label for r in self.records if r.label is not None})


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _what_was_found(files: list[Path]) -> str:
    """`found 2 files (1 .txt, 1 empty .jpg)`: what a folder without usable images holds, for the error."""
    if not files:
        return "it holds no files"
    kinds: dict[str, int] = {}
    for p in files:
        suffix = p.suffix.lower() or "no extension"
        key = f"empty {suffix}" if _is_image(p) and p.stat().st_size == 0 else suffix
        kinds[key] = kinds.get(key, 0) + 1
    shown = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))[:6])
    return f"found {len(files)} file{'s' if len(files) != 1 else ''} ({shown}{', ...' if len(kinds) > 6 else ''})"


def _from_folder(root: Path, spec: str) -> ImageSource:
    # Hidden folders (.git, .ipynb_checkpoints, a store's temp files) never hold the user's images.
    found = [p for p in root.rglob("*") if not any(x.startswith(".") for x in p.relative_to(root).parts)]
    files = sorted((p for p in found if _is_image(p)), key=lambda p: p.relative_to(root).as_posix())
    hint = "put .jpg/.png/.webp/.bmp files there (searched recursively), or pass --images demo"
    if not files:
        raise InputError(f"no images found in {root}: {_what_was_found([p for p in found if p.is_file()])}", hint)
    if all(p.stat().st_size == 0 for p in files):  # refused before any work, not stored as 0 images
        raise InputError(f"no readable images in {root}: {_what_was_found([p for p in found if p.is_file()])}",
                         hint)
    rel = [p.relative_to(root) for p in files]
    is_imagefolder = all(len(r.parts) == 2 for r in rel) and len({r.parts[0] for r in rel}) >= 2
    records = tuple(
        ImageRecord(i, str(p), r.parts[0] if is_imagefolder else None)
        for i, (p, r) in enumerate(zip(files, rel, strict=True))
    )
    return ImageSource(spec, "imagefolder" if is_imagefolder else "folder", records)


def _from_list(fpath: Path, spec: str) -> ImageSource:
    if fpath.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(
            f"--images {fpath} is a single image file",
            "pass the folder that holds it, a .txt file listing image paths, or demo",
        )
    try:
        text = fpath.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise InputError(
            f"cannot read {fpath} as a text list of image paths ({type(e).__name__})",
            "pass an image folder, a UTF-8 .txt file with one path per line, or demo",
        ) from e
    records: list[ImageRecord] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.partition("\t")
        if _dataset_path(path):  # a store's own path for a demo photo, tar member or dataset row: kept as is
            records.append(ImageRecord(len(records), path, label or None))
            continue
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = fpath.parent / p
        records.append(ImageRecord(len(records), str(p), label or None))
    if not records:
        raise InputError(f"the image list {fpath} names no images", "write one image path per line")
    if not any(_nonempty(r.path) for r in records):  # stops at the first usable file: cheap for a good list
        raise InputError(f"no readable images in the list {fpath}: its {len(records)} paths are all missing or empty",
                         "write paths relative to the list's folder, or absolute paths")
    return ImageSource(spec, "list", tuple(records))


def _dataset_path(path: str) -> bool:
    """A path open_image reads from a dataset rather than a file (demo photo, WebDataset member, HF row)."""
    return path.startswith((demo.PREFIX, wds.PREFIX, hf.PREFIX))


def _nonempty(path: str) -> bool:
    if _dataset_path(path):
        return True
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def demo_records(n: int) -> tuple[ImageRecord, ...]:
    """The scikit-image photos, then deterministic square crops (some flipped, half with a shape) until n images."""
    return tuple(ImageRecord(i, path, name) for i, (path, name) in enumerate(demo.demo_paths(n)))


def source_of(path: str) -> str:
    """The source photo an image was made from: for a demo path (`KIND:NAME#how`, e.g. `skimage:chelsea#12,40,200,1`)
    the part before '#' (`skimage:chelsea`); every other path is its own source. File paths are absolute (no
    `KIND:` prefix; a one-letter prefix is a Windows drive), and a `wds:`/`hf:` path's '#' names a member or row of
    a dataset, not a crop. `mine --max-per-source` caps a feature's exemplars per source."""
    kind, sep, _ = path.partition(":")
    if sep and len(kind) > 1 and kind.isidentifier() and not path.startswith((wds.PREFIX, hf.PREFIX)):
        return path.partition("#")[0]
    return path


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white (as the demo's logo), not on whatever RGB hides there."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's convert would clip everything above 255 to white.
        arr = np.asarray(img).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8)).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def open_image(path: str) -> Image.Image:
    """Open one image as RGB; raises InputError when the file is missing or not a readable image.
    `wds:TAR#MEMBER` and `hf:SOURCE[:SPLIT]#ROW` paths read one tar member or dataset row."""
    if path.startswith(demo.PREFIX):
        return demo.open_demo(path)
    if path.startswith((wds.PREFIX, hf.PREFIX)):
        data, path = (wds if path.startswith(wds.PREFIX) else hf).open_bytes(path)
        return _open_file(io.BytesIO(data), path)
    return _open_file(path, path)


def _open_file(fp: str | io.BytesIO, path: str) -> Image.Image:
    try:
        with Image.open(fp) as img:
            img.load()
            return _to_rgb(img)
    except FileNotFoundError as e:
        raise InputError(f"image {path} does not exist", "check the path") from e
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InputError(f"cannot read image {path} ({type(e).__name__})", "the file is corrupt or not an image") from e


def _from_wds(spec: str) -> ImageSource:
    samples = wds.list_samples(spec)
    records = tuple(ImageRecord(i, wds.record_path(s), s.label) for i, s in enumerate(samples))
    return ImageSource(wds.normalize(spec), "wds", records)


def _from_hf(spec: str) -> ImageSource:
    rows = hf.list_rows(spec)
    return ImageSource(
        hf.normalize(spec), "hf", tuple(ImageRecord(i, path, label) for i, (path, label) in enumerate(rows))
    )


def resolve_images(spec: str, max_images: int | None = None) -> ImageSource:
    """Folder (recursive; ImageFolder when every image sits in one class subfolder), list file, demo[:N],
    WebDataset shards (wds:/path/{000000..000099}.tar) or a Hugging Face dataset (hf:NAME[:split])."""
    if spec.startswith((wds.PREFIX, hf.PREFIX)):
        src = _from_wds(spec) if spec.startswith(wds.PREFIX) else _from_hf(spec)
        return ImageSource(src.spec, src.kind, src.records[:max_images]) if max_images else src
    if spec == "demo" or spec.startswith("demo:"):
        n = DEFAULT_DEMO_N
        if spec.startswith("demo:"):
            try:
                n = int(spec.removeprefix("demo:"))
            except ValueError as e:
                raise InputError(f"bad demo size in {spec!r}", "write demo or demo:N with N a number") from e
            if n < 1:
                raise InputError(f"bad demo size in {spec!r}", "write demo:N with N at least 1")
        n = min(n, max_images) if max_images else n
        return ImageSource(spec, "demo", demo_records(n))
    p = Path(spec).expanduser()
    if not p.exists():
        raise InputError(f"image folder {p} does not exist", "pass an existing folder, a .txt list of paths, or demo")
    # Absolute paths: the image table must still find the files when later stages run from elsewhere.
    p = p.resolve()
    src = _from_folder(p, str(p)) if p.is_dir() else _from_list(p, str(p))
    if max_images:
        src = ImageSource(src.spec, src.kind, src.records[:max_images])
    return src
