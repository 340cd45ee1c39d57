"""The offline demo images: scikit-image's photos (colour, and greyscale as RGB), deterministic square crops, and on a
share of the crops one flat shape (disc, square or triangle) whose pixel mask is the demo's segmentation label.

A demo path says how to rebuild its image: `skimage:NAME`, `skimage:NAME#left,top,side,flip` (a crop, flip 1
mirrors it) and `skimage:NAME#left,top,side,flip+SHAPE:cx,cy,size,COLOUR` (a crop with a shape drawn on it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from saevctl.errors import InputError

log = logging.getLogger(__name__)

PREFIX = "skimage:"
COLOUR_PHOTOS = (
    "astronaut", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry", "logo", "retina",
    "rocket", "stereo_motorcycle",
)
# scikit-image's greyscale photographs and textures that ship inside the wheel (cells3d, kidney, lily and the other
# fetched data sets would need the network; checkerboard, horse and the phantom are drawings, not photos).
GREY_PHOTOS = ("brick", "camera", "cell", "clock", "coins", "grass", "gravel", "moon", "page", "text")
DEMO_PHOTOS = COLOUR_PHOTOS + GREY_PHOTOS
DEFAULT_DEMO_N = 2048

# (height, width) of each photo in scikit-image 0.24-0.26, so listing the demo source loads no pixels
# (the photos are then loaded by the decoding threads, overlapping the forward pass). A test checks it.
DEMO_SIZES = {
    "astronaut": (512, 512), "chelsea": (300, 451), "coffee": (400, 600), "colorwheel": (370, 371),
    "hubble_deep_field": (872, 1000), "immunohistochemistry": (512, 512), "logo": (500, 500),
    "retina": (1411, 1411), "rocket": (427, 640), "stereo_motorcycle": (500, 741),
    "brick": (512, 512), "camera": (512, 512), "cell": (660, 550), "clock": (300, 400), "coins": (303, 384),
    "grass": (512, 512), "gravel": (512, 512), "moon": (512, 512), "page": (191, 384), "text": (172, 448),
}

# --- the drawn shapes: what the demo's masks label ---------------------------------------------------------------

SHAPES = ("disc", "square", "triangle")
CLASSES = ("other", "photo", *SHAPES)
"""Mask class ids: 0 is never used (the ignored id), 1 every pixel of the photo, 2.. the shape drawn on it."""
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "magenta": (200, 50, 200), "cyan": (40, 200, 210),
}
SHAPE_SHARE = 0.5
"""Share of the crops that get a shape."""
MASKS_VERSION = "shapes-v1"
"""Bump when the drawing changes: the cached mask folder is keyed by it."""


@dataclass(frozen=True)
class Shape:
    kind: str
    cx: int
    cy: int
    size: int
    colour: str

    def spec(self) -> str:
        return f"{self.kind}:{self.cx},{self.cy},{self.size},{self.colour}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        kind, _, rest = text.partition(":")
        cx, cy, size, colour = rest.split(",")
        if kind not in SHAPES or colour not in COLOURS:
            raise ValueError(text)
        return cls(kind, int(cx), int(cy), int(size), colour)

    def draw(self, draw: ImageDraw.ImageDraw, fill: int | tuple[int, int, int]) -> None:
        """The same pixels for the image (a colour) and its mask (a class id): no anti-aliasing."""
        h = self.size // 2
        x0, y0, x1, y1 = self.cx - h, self.cy - h, self.cx - h + self.size - 1, self.cy - h + self.size - 1
        if self.kind == "disc":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif self.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(self.cx, y0), (x0, y1), (x1, y1)], fill=fill)


def _random_shape(rng: np.random.Generator, side: int) -> Shape:
    """A shape 25-45% of the crop's side, at least 5% of the side away from every edge (not a border feature)."""
    size = max(4, int(side * rng.uniform(0.25, 0.45)))
    margin = max(1, int(side * 0.05))
    lo, hi = margin + size // 2, side - margin - (size - size // 2)
    cx, cy = (int(rng.integers(lo, max(lo, hi) + 1)) for _ in range(2))
    kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
    colour = tuple(COLOURS)[int(rng.integers(0, len(COLOURS)))]
    return Shape(kind, cx, cy, size, colour)


def demo_paths(n: int) -> list[tuple[str, str]]:
    """(path, photo name) of the first n demo images: the photos, then seeded crops (some flipped, half of them
    with a shape) until n. A smaller n is a prefix of a larger one, so ids mean the same image."""
    out = [(f"{PREFIX}{name}", name) for name in DEMO_PHOTOS[:n]]
    rng = np.random.default_rng(0)
    while len(out) < n:
        name = DEMO_PHOTOS[len(out) % len(DEMO_PHOTOS)]
        h, w = demo_size(name)
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        flip = int(rng.integers(0, 2))
        path = f"{PREFIX}{name}#{left},{top},{side},{flip}"
        if rng.uniform() < SHAPE_SHARE:
            path += "+" + _random_shape(rng, side).spec()
        out.append((path, name))
    return out


@cache
def demo_array(name: str) -> np.ndarray:
    """A photo as (h, w, 3) uint8: greyscale repeated over the channels, the RGBA logo composited on white."""
    import skimage.data

    if name not in DEMO_SIZES:
        raise InputError(f"unknown demo photo {name!r}", f"use one of {', '.join(DEMO_PHOTOS)}")
    arr = skimage.data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 4:  # logo is RGBA: composite on white
        rgb, alpha = arr[..., :3].astype(np.float32), arr[..., 3:].astype(np.float32) / 255.0
        arr = (rgb * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    if arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-8)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def demo_size(name: str) -> tuple[int, int]:
    if name in DEMO_SIZES:
        return DEMO_SIZES[name]
    h, w = demo_array(name).shape[:2]
    return h, w


@cache
def _demo_image(name: str, mirrored: bool) -> Image.Image:
    img = Image.fromarray(demo_array(name))
    if mirrored:  # flipping each crop costs more than the crop: flip the photo once instead
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.load()  # unpack once; crops of a loaded image are plain copies (thread-safe, no re-decoding)
    return img


def _parse(path: str) -> tuple[str, tuple[int, int, int, int] | None, Shape | None]:
    name, _, rest = path.removeprefix(PREFIX).partition("#")
    crop, _, shape = rest.partition("+")
    try:
        vals = [int(v) for v in crop.split(",")] if crop else []
        if crop and len(vals) != 4:
            raise ValueError(crop)
        box = (vals[0], vals[1], vals[2], vals[3]) if crop else None
        return name, box, (Shape.parse(shape) if shape else None)
    except ValueError as e:
        raise InputError(f"bad demo image path {path!r}",
                         "write skimage:NAME, skimage:NAME#left,top,side,flip or add +SHAPE:cx,cy,size,COLOUR") from e


def open_demo(path: str) -> Image.Image:
    """The image a demo path describes (a fresh copy the caller may change)."""
    name, box, shape = _parse(path)
    if box is None:
        img = _demo_image(name, False).copy()
    else:
        left, top, side, flip = box
        base = _demo_image(name, bool(flip))
        if flip:  # the crop's mirror image is the mirrored photo's crop at the mirrored offset
            left = base.width - left - side
        img = base.crop((left, top, left + side, top + side))
    if shape is not None:
        shape.draw(ImageDraw.Draw(img), COLOURS[shape.colour])
    return img


def demo_mask(path: str) -> Image.Image:
    """The class ids of a demo image (mode L, its size): 1 (photo) everywhere, the shape's class where it is drawn."""
    name, box, shape = _parse(path)
    h, w = demo_size(name) if box is None else (box[2], box[2])
    mask = Image.new("L", (w, h), CLASSES.index("photo"))
    if shape is not None:
        shape.draw(ImageDraw.Draw(mask), CLASSES.index(shape.kind))
    return mask


def without_shape(path: str) -> str:
    """The same photo or crop with no shape drawn on it."""
    return path.partition("+")[0]


# --- `--masks demo`: the masks as a folder every mask reader takes ----------------------------------------------


def mask_stem(path: str) -> str:
    """The file stem the mask readers look an image's mask up by (`Path(image path).stem`)."""
    return Path(path).stem


def demo_masks_dpath() -> Path:
    """Where `--masks demo` lives: a folder named `shapes` (the mask set's default name), keyed by MASKS_VERSION."""
    from saevctl import layout

    return layout.cache_dpath() / "demo-masks" / MASKS_VERSION / "shapes"


def ensure_demo_masks(n: int | None = None) -> Path:
    """The demo's mask folder: classes.txt and one PNG per image of `demo:n` (default the whole demo; named by the
    image path's stem, as every mask reader pairs masks with images), written once under SAEVCTL_CACHE (about 7 s
    for 2,048). A file appears whole (written under a temporary name, then renamed) and the masks go in order, so
    classes.txt and the last image's mask mark a complete folder."""
    from saevctl import atomic

    paths = [p for p, _ in demo_paths(n or DEFAULT_DEMO_N)]
    dpath = demo_masks_dpath()
    if (dpath / "classes.txt").is_file() and (dpath / f"{mask_stem(paths[-1])}.png").is_file():
        return dpath
    dpath.mkdir(parents=True, exist_ok=True)
    for path in paths:
        fpath = dpath / f"{mask_stem(path)}.png"
        if not fpath.is_file():
            tmp = fpath.with_name(f".{fpath.name}.tmp{os.getpid()}")
            demo_mask(path).save(tmp, format="PNG")
            os.replace(tmp, fpath)
    atomic.write_text(dpath / "classes.txt", "\n".join(CLASSES) + "\n")
    log.info("wrote the masks of demo:%d to %s", len(paths), dpath)
    return dpath
