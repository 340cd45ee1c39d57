"""The `features` and `sql` commands on a real index: no-flag defaults, tables, PNGs, neighbours that equal
brute force, cross-SAE matches, image search through the real model, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saevctl import workspace
from saevctl.cli import app
from saevctl.mine import Config, Index, run, vectors
from saevctl.mine.schema import N_HIST
from saevctl.store import open_store

from test_mine import make_sae, plant

runner = CliRunner()


def _ok(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


def _fails(args: list[str], text: str) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    return r.stderr


def _first_row(out: str) -> str:
    """The first data row of the first rich table in the output."""
    return out.split("┡", 1)[1].splitlines()[1]


@pytest.fixture(autouse=True)
def wide_console() -> None:
    from saevctl.console import console

    console.width = 250  # CliRunner is no terminal: without this rich wraps paths at 80 columns


@pytest.fixture(scope="module")
def env(tiny_store: Path, tiny_vit: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SAE A (planted feature 7), SAE B of the same model whose feature 11 is A's 7, and SAE C of another
    model whose feature 5 fires on the image A's 7 fires on; all in one index."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from saevctl.extract import Config as ExtractConfig
    from saevctl.extract import run as extract

    from conftest import make_tiny_vit

    root = tmp_path_factory.mktemp("features")
    ix = root / "ix.duckdb"
    a = make_sae(tiny_store, root / "a")
    b = make_sae(tiny_store, root / "b", seed=1)
    with torch.no_grad():
        b.W_dec[11] = a.W_dec[7] * 3  # same direction, other length: cosine 1
    b.save(root / "b")
    other_vit = "local-dir:" + str(make_tiny_vit(root / "vit2", seed=1))
    store2 = root / "store2"
    extract(ExtractConfig(model=other_vit, images=str(image_dir), layers=(3,), out=store2, dtype="float32",
                          batch_size=4, device="cpu"))
    c = make_sae(store2, root / "c", seed=2)
    # Plant A's 7 and C's 5 on the same image (both stores hold the same images in the same rows).
    for r in range(open_store(tiny_store).n_images):
        try:
            row_c, _ = plant(c, store2, 5, rows=(r,))
            row, patch = plant(a, tiny_store, 7, rows=(r,))
            break
        except AssertionError:
            continue
    with torch.no_grad():
        a.b_enc[0] = -1e6  # feature 0 never fires
    a.save(root / "a")
    c.save(root / "c")
    for name, store in (("a", tiny_store), ("b", tiny_store), ("c", store2)):
        run(Config(sae=root / name, store=store, index=ix, top_k=5, device="cpu", set_defaults=False))
    with Index.open(ix) as idx:
        ids = idx.sae_ids()
    image_id = int(open_store(tiny_store).row_image_ids()[row])
    path = next(im["path"] for im in open_store(tiny_store).images if im["id"] == image_id)
    return {"root": root, "ix": ix, "ids": ids, "a": a, "row": row, "patch": patch, "row_c": row_c, "path": path}


def test_top_with_no_flags_uses_the_workspace_index(env: dict) -> None:
    workspace.set_defaults(index=env["ix"], sae=env["root"] / "a")
    out = _ok(["features", "top", "--id", "7"])
    assert f"index {env['ix']}" in out.replace("\n", "") or str(env["ix"]) in out
    assert env["ids"][0] in out and Path(env["path"]).name in out and "1/16" in out
    png = Path(re.search(r"grid: (\S+\.png)", out.replace("\n", "")).group(1))
    img = Image.open(png)
    assert img.size[0] >= 160 and img.size[1] > 160
    _fails(["features", "top", "--id", "48"], "features 0..47")
    _fails(["features", "top", "--id", "-1"], "out of range")


def test_top_grid_highlights_the_firing_patch(env: dict, tmp_path: Path) -> None:
    out_png = tmp_path / "g.png"
    _ok(["features", "top", "--id", "7", "--index", str(env["ix"]), "--sae", env["ids"][0], "--out", str(out_png)])
    tile = np.asarray(Image.open(out_png).convert("RGB"), dtype=np.float32)[24 : 24 + 160, 3 : 3 + 160]
    r, c = divmod(env["patch"], 4)
    fired = tile[r * 40 + 5 : r * 40 + 35, c * 40 + 5 : c * 40 + 35]
    # The one firing patch at full scale is tinted bright; the rest is dimmed.
    assert fired.mean() > tile.mean() + 20


def test_show_list_and_similar(env: dict) -> None:
    workspace.set_defaults(index=env["ix"])
    a = env["ids"][0]
    out = _ok(["features", "show", "--id", "7", "--sae", a])
    assert "mean when firing" in out and "histogram:" in out and "similar to 7" in out
    assert Path(re.search(r"histogram: (\S+\.png)", out.replace("\n", "")).group(1)).is_file()
    out = _ok(["features", "list", "--sort", "max", "--limit", "3", "--sae", a, "--where", "n_fired >= 1"])
    assert re.search(r"│\s+7\s+│", _first_row(out))  # the planted feature (max 500) comes first
    assert _ok(["features", "list", "--sort", "max", "--limit", "2", "--sae", a, "--plain"]).splitlines()[0] == "7"
    _fails(["features", "list", "--sae", a, "--where", "nonsense_column > 1"], "bad --where")
    _fails(["features", "list", "--sae", a, "--where", "1=1; DROP TABLE features"], "single condition")
    _fails(["features", "list", "--sae", a, "--sort", "bogus"], "cannot sort by")
    out = _ok(["features", "similar", "--id", "3", "--n", "4", "--sae", a])
    got = [int(m) for m in re.findall(r"│\s+(\d+)\s+│\s+-?[\d.]+\s+│", out)]
    w = env["a"].W_dec.detach().numpy()
    _, want = vectors.brute_force_similar(w, w[3:4], 5)
    assert got == [int(i) for i in want[0] if i != 3][:4]


def test_match_same_model_by_decoder_and_other_model_by_exemplars(env: dict) -> None:
    a, b, c = env["ids"]
    out = _ok(["features", "match", "--id", "7", "--from", a, "--to", b, "--index", str(env["ix"])])
    assert "decoder cosine" in out and re.search(r"│\s+11\s+│\s+1\.000", out)
    out = _ok(["features", "match", "--id", "7", "--from", a, "--to", c, "--index", str(env["ix"])])
    assert "exemplar contrast" in out
    first = re.search(r"│\s+(\d+)\s+│\s+([-\d.]+)", out)
    assert env["row_c"] == env["row"]  # C's feature 5 was planted on the same image as A's 7
    assert first.group(1) == "5" and float(first.group(2)) == pytest.approx(1.0, abs=1e-3)
    assert Path(re.search(r"match: (\S+\.png)", out.replace("\n", "")).group(1)).is_file()
    _fails(["features", "match", "--id", "7", "--from", a, "--to", "nope", "--index", str(env["ix"])], "no SAE 'nope'")


def test_search_finds_the_planted_feature_on_its_patch(env: dict) -> None:
    a, ix = env["ids"][0], str(env["ix"])
    r, c = divmod(env["patch"], 4)
    out = _ok(["features", "search", "--image", env["path"], "--patches", f"{r},{c}", "--index", ix, "--sae", a])
    assert re.search(r"│\s+7\s+│", _first_row(out))  # first row of the table
    assert Path(re.search(r"search: (\S+\.png)", out.replace("\n", "")).group(1)).is_file()
    # The same patch chosen by a box in model-input pixels (32 px input, 8 px patches).
    out = _ok(
        [
            "features",
            "search",
            "--image",
            env["path"],
            "--box",
            f"{c * 8 + 1},{r * 8 + 1},{c * 8 + 7},{r * 8 + 7}",
            "--index",
            ix,
            "--sae",
            a,
        ]
    )
    assert re.search(r"│\s+7\s+│", _first_row(out))
    _fails(["features", "search", "--image", "/no/such.png", "--index", ix], "does not exist")
    _fails(
        ["features", "search", "--image", env["path"], "--patches", "9,9", "--index", ix], "outside the 4x4 patch grid"
    )
    _fails(["features", "search", "--image", env["path"], "--box", "0,0,99,99", "--index", ix], "not inside")


def test_sql_is_read_only(env: dict) -> None:
    ix = str(env["ix"])
    out = _ok(["sql", "SELECT sae_id, n_latents FROM saes ORDER BY seq", "--index", ix])
    assert all(i in out for i in env["ids"]) and "3 rows" in out
    _fails(["sql", "DELETE FROM features", "--index", ix], "refuses DELETE")
    _fails(["sql", "COPY features TO 'x.csv'", "--index", ix], "refuses COPY")
    _fails(["sql", "SELECT 1; SELECT 2", "--index", ix], "exactly one statement")
    _fails(["sql", "SELECT * FROM read_csv('/etc/hostname')", "--index", ix], "the query failed")
    assert not Path("x.csv").exists()


def test_index_api_used_by_other_stages(env: dict) -> None:
    workspace.set_defaults(index=env["ix"], sae=env["root"] / "a")
    with Index.open(workspace.get_default("index")) as idx:
        sae_id = idx.resolve_sae(workspace.get_default("sae"))
        assert sae_id == env["ids"][0]
        assert idx.feature_stats(sae_id, 7)["max"] == pytest.approx(500, rel=1e-3)
        assert idx.resolve_sae(env["ids"][2][:3]) == env["ids"][2]  # a unique prefix
        assert len(idx.histogram(sae_id, 7)) == N_HIST and idx.images(sae_id)[0]["image_id"] == 0


def test_a_dead_feature_is_shown_as_such(env: dict) -> None:
    a, ix = env["ids"][0], str(env["ix"])
    out = _ok(["features", "top", "--id", "0", "--index", ix, "--sae", a])
    assert "top 0 images" in out and Path(re.search(r"grid: (\S+\.png)", out).group(1)).is_file()
    out = _ok(["features", "show", "--id", "0", "--index", ix, "--sae", a])
    assert "(never fires)" in out
    out = _ok(["features", "list", "--sort", "n_fired", "--asc", "--limit", "1", "--index", ix, "--sae", a])
    assert re.search(r"│\s+0\s+│\s+0\s+│", _first_row(out))
