"""Which live features get pages when `--max-features` caps them, by interpretability signals (RULE, also
written on the index page); `--pick freq` takes the most frequent instead (Index.fired_features).

Numpy only, on the feature table the report reads anyway (data.feature_table).
"""

from __future__ import annotations

import numpy as np

DENSE_FREQ = 0.05
"""A feature firing on more than this fraction of tokens is dense: on everything, so it explains nothing."""
MIN_IMAGES = 5
"""A feature firing on fewer images than this is near-dead: too few exemplars to tell what it means."""
MAX_IMG_FREQ = 0.5
"""A feature firing in more than this fraction of images is global (position, padding, texture), not a concept."""

RULE = (f"live features that fire on at most {DENSE_FREQ:.0%} of tokens, on at least {MIN_IMAGES} images and on at "
        f"most {MAX_IMG_FREQ:.0%} of images come first, ranked by score = (max / mean when firing) x (1 - share of "
        "an image's patches it fires on, averaged over the images where it fires): a high peak over its typical "
        "value, on a small part of the image; the other live features follow, by the same score")


def scores(stats: dict[str, np.ndarray], n_images: int, patches: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per feature (eligible, score) from a token kind's feature table (STAT_COLUMNS, indexed by feature id).

    `patches`: the table is of patch tokens, so freq / img_freq is the share of an image's patches a feature
    covers where it fires (one CLS token per image covers the whole image: no concentration term)."""
    freq, img_freq = stats["freq"].astype(np.float64), stats["img_freq"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        selectivity = np.where(stats["mean"] > 0, stats["max"] / stats["mean"], 0.0)
        cover = np.where(img_freq > 0, freq / img_freq, 1.0) if patches else np.zeros_like(freq)
    score = selectivity * (1.0 - np.clip(cover, 0.0, 1.0))
    eligible = (freq <= DENSE_FREQ) & (np.rint(img_freq * n_images) >= MIN_IMAGES) & (img_freq <= MAX_IMG_FREQ)
    return eligible, score


def pick(fired: np.ndarray, stats: dict[str, np.ndarray], n_images: int, patches: bool, limit: int) -> np.ndarray:
    """The `limit` fired features that come first by RULE (ties by id), ascending."""
    fired = np.asarray(fired, dtype=np.int64)
    eligible, score = scores(stats, n_images, patches)
    order = np.lexsort((fired, -score[fired], ~eligible[fired]))
    return np.sort(fired[order[:limit]])
