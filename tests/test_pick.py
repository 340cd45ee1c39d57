"""`features pick`: the rule's spatial scores on known activation maps, padding from the store's letterbox, and the
command on a real mined index (rule stated, plain lines for scripts, loosened and tightened rules)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.mine.pick import _content, spatial_scores

runner = CliRunner()


def _map(cells: list[tuple[int, int]], grid: int = 8, value: float = 1.0) -> np.ndarray:
    a = np.zeros((grid, grid), np.float32)
    for r, c in cells:
        a[r, c] = value
    return a.ravel()


def test_spatial_scores_tell_blobs_from_scatter_and_borders() -> None:
    none = np.zeros((1, 64), np.float32)
    blob = _map([(r, c) for r in (3, 4, 5) for c in (3, 4)])
    scatter = _map([(1, 1), (3, 5), (6, 2)])
    band = _map([(0, c) for c in range(8)] + [(7, c) for c in range(8)])
    coh, border, pad = spatial_scores(np.stack([blob, blob, scatter]), (8, 8), np.zeros((3, 64)))
    assert coh == 1.0 and border == 0.0 and pad == 0.0  # the median image is a blob
    coh, _, _ = spatial_scores(np.stack([scatter, scatter, blob]), (8, 8), np.zeros((3, 64)))
    assert coh == 0.0
    padding = (band > 0).astype(np.float32)[None]
    coh, border, pad = spatial_scores(band[None], (8, 8), padding)
    assert coh == 1.0 and border == 1.0 and pad == 1.0
    assert spatial_scores(none, (8, 8), np.zeros((1, 64))) == (0.0, 0.0, 0.0)


def test_padding_comes_from_the_letterbox_of_each_image_size() -> None:
    import json

    pre = json.dumps({"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "letterbox", "crop_pct": 1.0,
                      "interpolation": "box"})
    wide = _content((451, 300), pre, (16, 16)).reshape(16, 16)  # chelsea: bands above and below
    assert wide[0].max() < 0.5 and wide[-1].max() < 0.5 and wide[8].min() == 1.0
    assert _content((300, 300), pre, (16, 16)).min() == 1.0


@pytest.fixture(scope="module")
def index(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from saevctl.mine import Config as MineConfig
    from saevctl.mine import run as mine
    from saevctl.train import Config as TrainConfig
    from saevctl.train import run as train

    tmp = tmp_path_factory.mktemp("pick")
    train(TrainConfig(store=tiny_store, layer=3, activation="topk", k=4, width=("4x",), batch_size=32,
                      n_tokens=512, out=tmp / "sae", device="cpu"))
    mine(MineConfig(sae=tmp / "sae", store=tiny_store, index=tmp / "index.duckdb", top_k=4, device="cpu",
                    set_defaults=False))
    return tmp / "index.duckdb"


def test_pick_states_its_rule_and_prints_lines_for_scripts(index: Path) -> None:
    loose = ["--index", str(index), "--max-freq", "1", "--min-img-freq", "0", "--max-img-freq", "1",
             "--min-coherence", "0", "--max-border", "1", "--max-padding", "1", "--min-sources", "1"]
    res = runner.invoke(app, ["features", "pick", *loose, "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert "rule: sparse" in res.output and "features pass the rule" in res.output and "picked: feature" in res.output
    plain = runner.invoke(app, ["features", "pick", *loose, "--limit", "2", "--plain"])
    lines = plain.output.strip().splitlines()
    assert plain.exit_code == 0 and len(lines) == 2
    feature, present, absent = lines[0].split("\t")
    assert feature.isdigit() and Path(present).is_file() and present != absent
    strict = runner.invoke(app, ["features", "pick", "--index", str(index), "--min-sources", "1000"])
    assert strict.exit_code == 0 and "no feature passes" in strict.output
    bad = runner.invoke(app, ["features", "pick", "--index", str(index), "--max-border", "2"])
    assert bad.exit_code == 2 and "error:" in bad.output
