"""`report --max-features N` picks pages by interpretability signals (not density) and says so on the index
page; neighbours left out say so (not "never fired"); tiles, thumbnails and exemplar tables carry image ids; the
colour bar says what the colour means. Real store, real mine into DuckDB, real report HTML."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saevctl import layout
from saevctl.mine import Config as MineConfig
from saevctl.mine import Index
from saevctl.mine import run as mine
from saevctl.mine.figures import COLORBAR_PX, _colorbar, caption
from saevctl.report import Config, run

from test_mine import make_sae
from test_mine_sources import _store

N_LATENTS, DEAD = 32, (3, 11)


@pytest.fixture(scope="module")
def picked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """60 images; features from dense to rare (biases spread), two never fire."""
    root = tmp_path_factory.mktemp("pick")
    store = _store(root / "store", n=60)
    sae = make_sae(store, root / "sae", n_latents=N_LATENTS)
    with torch.no_grad():
        sae.b_enc.copy_(-torch.linspace(0.0, 3.0, N_LATENTS) * sae.W_enc.norm(dim=0))
        sae.b_enc[list(DEAD)] = -1e4
    sae.save(root / "sae")
    index = root / "ix.duckdb"
    mine(MineConfig(sae=root / "sae", store=store, index=index, top_k=6, device="cpu", set_defaults=False))
    with Index.open(index) as idx:
        sae_id = idx.resolve_sae(None)
        rows = idx.list_features(sae_id, sort="feature", where="n_fired > 0", limit=1000, descending=False)
        ex = {r["feature"]: [e["image_id"] for e in idx.top_exemplars(sae_id, r["feature"])] for r in rows}
    return {"root": root, "index": index, "rows": rows, "exemplars": ex}


def _by_rule(rows: list[dict], n: int) -> list[int]:
    """The rule of docs/report.md, recomputed here from the index's columns."""
    def key(r: dict) -> tuple:
        eligible = r["freq"] <= 0.05 and round(r["img_freq"] * 60) >= 5 and r["img_freq"] <= 0.5
        score = r["max"] / r["mean"] * (1 - r["freq"] / r["img_freq"])
        return (not eligible, -score, r["feature"])
    return sorted(r["feature"] for r in sorted(rows, key=key)[:n])


def _pages(out: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in out.glob("saes/*/feature-*.html"))


def test_max_features_picks_by_interpretability_and_says_so(picked: dict) -> None:
    rows, out = picked["rows"], picked["root"] / "report"
    eligible = [r for r in rows if r["freq"] <= 0.05 and round(r["img_freq"] * 60) >= 5 and r["img_freq"] <= 0.5]
    densest = sorted(rows, key=lambda r: -r["freq"])[:5]
    assert len(eligible) >= 5 and all(r["freq"] > 0.05 for r in densest[:2]), "the fixture spans dense to rare"
    res = run(Config(index=picked["index"], out=out, max_features=5, neighbours=N_LATENTS - 1, workers=0))
    got = _pages(out)
    assert got == _by_rule(rows, 5) and res.saes[0]["n_pages"] == 5
    assert {r["feature"] for r in eligible} >= set(got) and not {r["feature"] for r in densest[:2]} & set(got)
    text = layout.report_index_fpath(out).read_text()
    assert f"Pages: 5 of the {len(rows)} live features (--max-features 5), picked by interpretability" in text
    assert "on at most 5% of tokens" in text and "max / mean when firing" in text
    # A page's neighbours: every other feature, so some are left out (fired) and some never fired.
    page = (next(out.glob("saes/*")) / layout.report_feature_name(got[0])).read_text()
    left_out = re.findall(r"feature (\d+) \(not in this report: fired; left out by --max-features 5\): "
                          r"run saevctl features show --id (\d+)", page)
    never = [int(f) for f in re.findall(r"feature (\d+) \(never fired, no page\)", page)]
    assert sorted(never) == sorted(set(range(N_LATENTS)) - {r["feature"] for r in rows}) and set(DEAD) <= set(never)
    assert left_out and all(a == b and int(a) not in got and int(a) not in DEAD for a, b in left_out)
    assert len(left_out) == len(rows) - 5


def test_pick_freq_takes_the_most_frequent(picked: dict) -> None:
    out = picked["root"] / "report-freq"
    run(Config(index=picked["index"], out=out, max_features=4, pick="freq", neighbours=0, workers=0))
    want = sorted(r["feature"] for r in sorted(picked["rows"], key=lambda r: (-r["freq"], r["feature"]))[:4])
    assert _pages(out) == want
    assert "the most frequent (--pick freq)" in layout.report_index_fpath(out).read_text()


def test_pages_and_thumbnails_carry_image_ids(picked: dict) -> None:
    out = picked["root"] / "report-all"
    res = run(Config(index=picked["index"], out=out, neighbours=0, workers=0))
    assert res.saes[0]["n_pages"] == len(picked["rows"])
    assert "Pages: every feature that fired." in layout.report_index_fpath(out).read_text()
    sae_dpath = next(out.glob("saes/*"))
    for f, ids in picked["exemplars"].items():
        page = (sae_dpath / layout.report_feature_name(f)).read_text()
        table = re.search(r'<table class="exemplars">.*?</table>', page, re.S).group(0)
        assert "<th>image id</th>" in table
        assert [int(i) for i in re.findall(r"<tr><td>\d+</td><td>(\d+)</td>", table)] == ids
        with Image.open(sae_dpath / layout.report_feature_name(f, "thumb", "patches", "png")) as thumb:
            assert thumb.size == (128, 128)
            # The id is written on a black band in the top-left corner, over the picture.
            corner = np.asarray(thumb.convert("L"))[:14, :40]
            assert (corner == 0).mean() > 0.3 and (corner > 200).any()


def test_captions_and_colour_bar_say_what_they_show() -> None:
    assert caption(0, 1.2345, 1402) == "#1  1.23  · id 1402"
    bar = np.asarray(_colorbar(400, 2.5).convert("L"))
    plain = np.asarray(_colorbar(400, 2.5, label="").convert("L"))
    assert bar.shape[0] == COLORBAR_PX
    label_band = slice(18, COLORBAR_PX)
    assert (bar[label_band] < 128).sum() > 50 and (plain[label_band] < 128).sum() == 0
