"""Images the explorer shows, addressed by id only: the store's images by their integer id in the index, uploads by
`u` + 16 hex digits of their content hash. A client's text is never joined onto a path; uploads are checked
(size, format, pixel count from the header) before the same decoder as every other command reads them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from saevctl import atomic
from saevctl.data import open_image
from saevctl.errors import InputError

log = logging.getLogger(__name__)
UPLOAD_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
"""Decoders an upload may use (PIL tries no others), with the suffix its file is kept under."""
_STORE_ID = re.compile(r"[0-9]{1,12}")
_UPLOAD_ID = re.compile(r"u[0-9a-f]{16}")


class UploadTooLarge(InputError):
    """An upload over --max-upload-mb (answered 413)."""


@dataclass(frozen=True)
class ImageRef:
    """One image the explorer can show: its id, where the library reads it, and what the page calls it."""

    id: str
    path: str
    """What open_image reads: the store's recorded path, or the server's own copy of an upload."""
    name: str
    label: str | None = None
    upload: bool = False

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "label": self.label, "upload": self.upload}


def display_name(text: str, limit: int = 120) -> str:
    """A file name as the page shows it: its last path part, control characters dropped, shortened."""
    name = PurePosixPath(text.replace("\\", "/")).name or text
    name = "".join(c for c in name if c.isprintable())
    return name if len(name) <= limit else name[: limit - 1] + "…"


def store_refs(rows: list[dict[str, Any]]) -> dict[str, ImageRef]:
    """The store's readable images (index image table rows with a stored row), by id."""
    return {str(r["image_id"]): ImageRef(str(r["image_id"]), str(r["path"]), display_name(str(r["path"])),
                                         r["label"]) for r in rows if int(r["row"]) >= 0}


def check_id(image_id: str) -> str:
    """An image id as the client sent it, refused unless it has the shape of a store or upload id."""
    if not (_STORE_ID.fullmatch(image_id) or _UPLOAD_ID.fullmatch(image_id)):
        raise InputError(f"bad image id {image_id[:40]!r}", "pick an image from the list or upload one")
    return image_id


def sniff(data: bytes, max_pixels: int) -> str:
    """The upload's format, from its header only: refused when empty, not one of UPLOAD_FORMATS, or over
    `max_pixels` (no pixel is decoded here, so a decompression bomb costs nothing)."""
    if not data:
        raise InputError("the upload is empty", "choose an image file (PNG, JPEG, WebP or BMP)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=list(UPLOAD_FORMATS)) as img:
                fmt, (w, h) = str(img.format), img.size
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:  # PIL's own, larger limit
            raise InputError(f"the upload is over the limit of {max_pixels:,} pixels ({str(e).split(',')[0]})",
                             "upload a smaller image") from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise InputError(f"the upload is not an image saevctl reads ({type(e).__name__})",
                             "upload a PNG, JPEG, WebP or BMP file") from e
    if w * h > max_pixels:
        raise InputError(f"the upload is {w:,} x {h:,} = {w * h:,} pixels, over the limit of {max_pixels:,}",
                         "upload a smaller image, or start the server with a larger --max-upload-pixels")
    return fmt


class Uploads:
    """Uploaded images kept under the server's own folder, named by content hash; the oldest are dropped past
    `keep`. Thread-safe."""

    def __init__(self, dpath: Path, max_bytes: int, max_pixels: int, keep: int = 200) -> None:
        self.dpath, self.max_bytes, self.max_pixels, self.keep = dpath, max_bytes, max_pixels, keep
        self._refs: OrderedDict[str, ImageRef] = OrderedDict()
        self._lock = threading.Lock()

    def too_large(self, n_bytes: int) -> UploadTooLarge:
        mb = self.max_bytes / 1e6
        return UploadTooLarge(f"the upload is over the limit of {mb:g} MB ({n_bytes / 1e6:.3g} MB or more)",
                              "upload a smaller image, or start the server with a larger --max-upload-mb")

    def add(self, data: bytes, name: str) -> ImageRef:
        """Check, keep and decode one upload; its id is stable for the same bytes."""
        if len(data) > self.max_bytes:
            raise self.too_large(len(data))
        fmt = sniff(data, self.max_pixels)
        uid = "u" + hashlib.sha256(data).hexdigest()[:16]
        fpath = self.dpath / f"{uid}{UPLOAD_FORMATS[fmt]}"
        shown = display_name(name or "upload") or "upload"
        atomic.write_bytes(fpath, data)
        try:
            open_image(str(fpath))  # the decoder every command uses: truncated or corrupt data fails here
        except InputError as e:
            fpath.unlink(missing_ok=True)
            raise InputError(f"cannot decode the upload {shown!r}: the {fmt} file is truncated or corrupt",
                             "upload the image again, or another file") from e
        ref = ImageRef(uid, str(fpath), shown, None, upload=True)
        with self._lock:
            self._refs[uid] = ref
            self._refs.move_to_end(uid)
            while len(self._refs) > self.keep:
                _, old = self._refs.popitem(last=False)
                Path(old.path).unlink(missing_ok=True)
        log.info("upload %s (%s, %d bytes) as %s", shown, fmt, len(data), uid)
        return ref

    def get(self, uid: str) -> ImageRef | None:
        with self._lock:
            return self._refs.get(uid)
