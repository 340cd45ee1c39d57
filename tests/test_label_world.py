"""Dense-concept check on planted ground truth: images tiled with K known concepts (one per 8 px patch tile),
masks naming them; extract --masks, train an SAE, mine and label must find a feature for most concepts, while
the same pipeline on spatially shuffled masks (labels unrelated to the pixels) finds none.

Thresholds (justified in docs/eval.md, section "Labels"): a concept is found when some feature reaches AUROC >= 0.9;
at least 70% of the K = 8 concepts (6) must be found; the shuffled control must find at most 1 in 8.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from saevctl.extract import Config as ExtractConfig
from saevctl.extract import run as extract
from saevctl.mine import Config as MineConfig
from saevctl.mine import Index
from saevctl.mine import run as mine
from saevctl.mine.label import Config as LabelConfig
from saevctl.mine.label import run as label
from saevctl.train import Config as TrainConfig
from saevctl.train import run as train
from saevctl.vit import Preprocess, load_backbone

K = 8  # planted concepts
TILE, GRID = 8, 4  # the tiny ViT's 8 px patches on its 32 px input: a 4 x 4 grid of tiles
N_IMAGES = 160
MIN_AUROC, MIN_FOUND, MAX_FOUND_SHUFFLED = 0.9, 0.7, 1 / 8

# Each concept: a fixed random binary texture of one patch, in its own colour. Random 8x8x3 textures are
# nearly orthogonal, so a random ViT's patch embedding keeps the concepts apart (the test measures whether the
# SAE + labelling recover them, not whether a random model can see them).
def _textures(seed: int = 1234) -> np.ndarray:
    rng = np.random.default_rng(seed)
    colours = rng.uniform(60, 200, (K, 1, 1, 3))
    return colours + 55 * rng.choice([-1.0, 1.0], (K, TILE, TILE, 3))


def _tile(textures: np.ndarray, concept: int, rng: np.random.Generator) -> np.ndarray:
    """One tile of a concept, with random contrast, brightness and pixel noise so no two tiles are equal."""
    t = textures[concept]
    mean = t.mean()
    return (t - mean) * rng.uniform(0.5, 1.0) + mean + rng.uniform(-30, 30) + rng.normal(0, 20, t.shape)


def make_world(root: Path, pre: Preprocess, seed: int, shuffle_masks: bool = False) -> tuple[Path, Path]:
    """N_IMAGES tiled images and their masks (class id = concept + 1; 0 = the border; classes.txt names them).

    Images are drawn at the size the model's centre crop keeps unscaled, with the tiles where the crop puts
    the patch grid, so each tile is exactly one patch of the model input (the mask goes through the same crop).
    """
    rng = np.random.default_rng(seed)
    textures = _textures()
    side = int(pre.size / pre.crop_pct)  # Preprocess resizes the shorter side to this: no resize at this size
    off = round((side - pre.size) / 2.0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(N_IMAGES):
        ids = rng.integers(0, K, (GRID, GRID))
        pixels = np.full((side, side, 3), 128.0)
        for r in range(GRID):
            for c in range(GRID):
                y, x = off + r * TILE, off + c * TILE
                pixels[y : y + TILE, x : x + TILE] = _tile(textures, int(ids[r, c]), rng)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / f"world{i:04d}.png")
        if shuffle_masks:  # the control: same class frequencies, ids no longer where their concept is
            ids = rng.permutation(ids.ravel()).reshape(GRID, GRID)
        mask = np.zeros((side, side), dtype=np.uint8)
        mask[off : off + GRID * TILE, off : off + GRID * TILE] = np.kron(ids + 1, np.ones((TILE, TILE), dtype=np.int64))
        Image.fromarray(mask, "L").save(masks / f"world{i:04d}.png")
    (masks / "classes.txt").write_text("other\n" + "\n".join(f"concept{k}" for k in range(K)) + "\n")
    return images, masks


def _pipeline(tiny_vit: str, root: Path, images: Path, masks: Path, sae_dpath: Path | None) -> tuple[Path, float]:
    """extract --masks, (train), mine, label; returns (SAE checkpoint, share of concepts found)."""
    store = root / "store"
    extract(ExtractConfig(model=tiny_vit, images=str(images), layers=(1,), out=store, masks=masks, dtype="float32",
                          batch_size=32, device="cpu"))
    if sae_dpath is None:
        res = train(TrainConfig(store=store, layer=1, out=root / "sae", activation=("topk",), width=("4x",),
                                k=(4,), lr=(3e-3,), batch_size=256, n_tokens=256 * 300, lr_warmup=20,
                                device="cpu", log_every=100, ckpt_every=10_000))
        sae_dpath = Path(res.runs[0]["path"])
    index = root / "index.duckdb"
    mine(MineConfig(sae=sae_dpath, store=store, index=index, device="cpu", set_defaults=False))
    result = label(LabelConfig(sae=sae_dpath, index=index, level="patch", device="cpu"))
    with Index.open(index) as idx:
        coverage = idx.label_coverage(result.sae_id, "patch", MIN_AUROC)
        assert coverage == result.levels["patch"].coverage[MIN_AUROC]
    return sae_dpath, coverage


def test_planted_concepts_are_found_and_shuffled_labels_are_not(tiny_vit: str, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    pre = load_backbone(tiny_vit, "cpu").preprocess
    images, masks = make_world(tmp_path / "world", pre, seed=0)
    sae_dpath, found = _pipeline(tiny_vit, tmp_path / "world", images, masks, None)
    # The control reuses the trained SAE on the same pixels: only the masks' ids are moved within each image.
    images_c, masks_c = make_world(tmp_path / "control", pre, seed=0, shuffle_masks=True)
    _, found_shuffled = _pipeline(tiny_vit, tmp_path / "control", images_c, masks_c, sae_dpath)
    print(f"concepts found: {found:.0%}, shuffled control: {found_shuffled:.0%}, {time.perf_counter() - t0:.1f} s")
    assert found >= MIN_FOUND
    assert found_shuffled <= MAX_FOUND_SHUFFLED
