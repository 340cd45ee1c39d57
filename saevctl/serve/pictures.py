"""The explorer's pictures as PNG bytes: exemplar strips and tiles (mine's heat renderer, so they match the CLI's
grids and the report), and the before/after panels of an edit for saliency and segmentation heads (PIL + numpy,
no matplotlib, so an edit's answer is not held up by plotting).
"""

from __future__ import annotations

import base64
import colorsys
import io

import numpy as np
from PIL import Image

from saevctl.edit.effects import dense_labels
from saevctl.mine.figures import LUT

CHANGED_RGB = (255, 0, 255)
"""Pixels whose class an edit changed are painted this colour (magenta: absent from the heat and class palettes)."""


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast to write; these are sent once, not archived
    return buf.getvalue()


def data_url(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def hstrip(tiles: list[Image.Image], gap: int = 3) -> Image.Image:
    """Tiles side by side on white, `gap` pixels apart."""
    if not tiles:
        return Image.new("RGB", (1, 1), "white")
    h = max(t.height for t in tiles)
    out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), h), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def heat_overlay(image_u8: np.ndarray, values_hw: np.ndarray, alpha: float = 0.7) -> Image.Image:
    """Values in [0, 1] on the heat scale over the image (as the probe's figure draws saliency)."""
    idx = (np.clip(values_hw, 0, 1) * 255).astype(np.uint8)
    out = image_u8.astype(np.float32) * (1 - alpha) + LUT[idx].astype(np.float32) * alpha
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def palette(n: int) -> np.ndarray:
    """n distinct class colours (golden-ratio hues, two brightness levels), (n, 3) uint8."""
    rgb = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95 if i % 2 == 0 else 0.7) for i in range(max(n, 1))]
    return (np.array(rgb) * 255).astype(np.uint8)


def _changed_panel(image_u8: np.ndarray, changed_hw: np.ndarray, signed_hw: np.ndarray | None) -> Image.Image:
    """The image dimmed to grey, the signed change tinted (red up, blue down), changed pixels painted magenta."""
    grey = image_u8.astype(np.float32).mean(-1, keepdims=True).repeat(3, -1) * 0.45 + 70
    if signed_hw is not None:
        lim = max(float(np.abs(signed_hw).max()), 1e-6)
        t = np.clip(signed_hw / lim, -1, 1)[..., None]
        red, blue = np.array([220.0, 40, 40]), np.array([40.0, 90, 220])
        tint = np.where(t > 0, red, blue)
        grey = grey * (1 - np.abs(t)) + tint * np.abs(t)
    grey[changed_hw] = CHANGED_RGB
    return Image.fromarray(grey.clip(0, 255).astype(np.uint8))


def dense_panels(task: str, image_u8: np.ndarray, before: np.ndarray, after: np.ndarray,
                 n_classes: int) -> dict[str, str]:
    """before / after maps and the changed pixels of a saliency (1, h, w) or segmentation (c, h, w) output, as
    PNG data URLs at the model input's size."""
    lb, la = dense_labels(before, task), dense_labels(after, task)  # the classes the probe's summary counts
    if task == "saliency":
        panels = {"before": heat_overlay(image_u8, before[0]), "after": heat_overlay(image_u8, after[0]),
                  "changed": _changed_panel(image_u8, lb != la, after[0] - before[0])}
    else:
        colours = palette(n_classes)
        mix = image_u8.astype(np.float32) * 0.35
        panels = {"before": Image.fromarray((mix + colours[lb] * 0.65).astype(np.uint8)),
                  "after": Image.fromarray((mix + colours[la] * 0.65).astype(np.uint8)),
                  "changed": _changed_panel(image_u8, lb != la, None)}
    return {k: data_url(png(v)) for k, v in panels.items()}
