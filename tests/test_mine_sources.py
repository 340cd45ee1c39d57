"""`mine --max-per-source`: a feature's exemplars spread over source photos (the demo's crops of one photo share a
source), equal to the brute-force greedy over every image, on a real store and a real DuckDB index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.data.images import source_of
from saevctl.errors import InputError
from saevctl.mine import Config, Index, run
from saevctl.store import StoreWriter, open_store

from test_mine import make_sae

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.mark.parametrize(("path", "source"), [
    ("skimage:chelsea#12,40,200,1", "skimage:chelsea"),
    ("skimage:chelsea", "skimage:chelsea"),
    ("shapes:chelsea#circle,3", "shapes:chelsea"),  # any demo kind: the part before '#'
    ("/data/imgs/a#b.png", "/data/imgs/a#b.png"),  # a file: its own source, '#' and all
    ("C:/data/a#1.png", "C:/data/a#1.png"),  # a Windows drive is not a demo kind
    ("wds:/data/shard-000.tar#img1.jpg", "wds:/data/shard-000.tar#img1.jpg"),  # one tar member each
    ("hf:cifar10:train#12", "hf:cifar10:train#12"),
])
def test_source_of(path: str, source: str) -> None:
    assert source_of(path) == source


def _store(dpath: Path, n: int = 48, p: int = 16, d: int = 32) -> Path:
    """A store of random activations whose images are crops of 4 photos, the photos interleaved."""
    model = {"spec": "synthetic", "arch": "none", "weights_sha256": "0" * 64, "n_blocks": 4, "d_model": d,
             "patch_size": 8, "layout": {"n_cls": 1, "n_reg": 0, "grid_h": 4, "grid_w": 4},
             "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "squash"}}
    config = {"model": model, "images": {"spec": "demo", "kind": "demo", "n": n, "fingerprint": "x"},
              "layers": [3], "tokens": ["patches"], "dtype": "float16", "images_per_shard": 20}
    w = StoreWriter(dpath, config, n)
    rng = np.random.default_rng(0)
    for s, (lo, hi) in enumerate(w.shard_ranges):
        rows = [{"id": i, "path": f"skimage:{PHOTOS[i * 3 % 4]}#{i},{i},100,0", "label": None, "width": 100,
                 "height": 100, "status": "ok"} for i in range(lo, hi)]
        w.write_shard(s, {(3, "patches"): rng.normal(size=(hi - lo, p, d)).astype(np.float16)}, rows)
    w.finalize()
    return dpath


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sources")
    store = _store(root / "store")
    sae = make_sae(store, root / "sae", n_latents=24)
    sae.save(root / "sae")
    x = open_store(store).layer(3).patches.torch().float()
    with torch.no_grad():
        scores = sae.encode(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1).amax(1)
    return {"root": root, "store": store, "sae": root / "sae", "scores": scores}


def _greedy(scores_n: torch.Tensor, src: list[str], k: int, cap: int | None) -> list[int]:
    """Rows of the best k positive scores with at most `cap` per source, best first."""
    kept: list[int] = []
    for r in scores_n.argsort(descending=True).tolist():
        if len(kept) < k and scores_n[r] > 0 and (cap is None or sum(src[j] == src[r] for j in kept) < cap):
            kept.append(r)
    return kept


@pytest.mark.parametrize("cap", [None, 1, 2, 8])
def test_exemplars_per_source_equal_brute_force(sources: dict, cap: int | None) -> None:
    index = sources["root"] / f"ix-{cap}.duckdb"
    run(Config(sae=sources["sae"], store=sources["store"], index=index, top_k=8, max_per_source=cap,
               chunk_images=5, device="cpu", set_defaults=False))
    src = [source_of(im["path"]) for im in open_store(sources["store"]).images]
    n_capped = 0
    with Index.open(index) as ix:
        sae_id = ix.resolve_sae(None)
        for f in range(24):
            ex = ix.top_exemplars(sae_id, f)
            want = _greedy(sources["scores"][:, f], src, 8, cap)
            assert [e["image_id"] for e in ex] == want, f  # row = image id in this store
            per = [sum(source_of(e["path"]) == source_of(x["path"]) for x in ex) for e in ex]
            assert max(per, default=0) <= (cap or 8)
            n_capped += want != _greedy(sources["scores"][:, f], src, 8, None)
    # The cap changed the grids (1 and 2 per photo bind with 4 photos and k = 8; 8 never does).
    assert (n_capped > 0) == (cap in (1, 2)), n_capped


def test_max_per_source_is_checked_and_is_a_cli_option(sources: dict) -> None:
    with pytest.raises(InputError) as e:
        Config(max_per_source=0)
    assert "--max-per-source 0 is out of range" in e.value.one_line()
    res = CliRunner().invoke(app, ["mine", "--sae", str(sources["sae"]), "--store", str(sources["store"]),
                                   "--index", str(sources["root"] / "cli.duckdb"), "--max-per-source", "1",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "at most 1 per source photo" in res.output
    with Index.open(sources["root"] / "cli.duckdb") as ix:
        sae_id = ix.resolve_sae(None)
        for f in range(24):
            paths = [source_of(e["path"]) for e in ix.top_exemplars(sae_id, f)]
            assert len(paths) == len(set(paths)) <= len(PHOTOS)
