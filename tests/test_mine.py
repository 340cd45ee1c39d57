"""`saevctl mine` end to end on real stores: planted features found where they were planted, results equal a
brute-force encode, several SAEs in one index, clear errors, and no half index after a kill."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saevctl import layout, workspace
from saevctl.cli import app
from saevctl.mine import Config, Index, run
from saevctl.sae import SAE, SAEConfig
from saevctl.store import StoreWriter, open_store

runner = CliRunner()


# --- helpers shared with test_features_cli.py ---------------------------------------------------------


def make_sae(store_dpath: Path, dpath: Path, layer: int = 3, n_latents: int = 48, seed: int = 0,
             tokens: tuple[str, ...] = ("patches",), model: dict | None = None, **kw: object) -> SAE:
    """A random SAE fitted to the store's normalisation (not trained: plumbing only)."""
    store = open_store(store_dpath)
    torch.manual_seed(seed)
    cfg = SAEConfig(d=store.d, n_latents=n_latents, model=model or store.model, layer=layer, tokens=tokens, **kw)
    sae = SAE(cfg)
    sae.set_normalization(
        store.layer(layer if layer in store.layers else store.layers[0]).patches.torch().reshape(-1, store.d)
    )
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # sparser than a plain random init
    return sae


def plant(sae: SAE, store_dpath: Path, feature: int, layer: int = 3, rows: tuple[int, ...] = (5,)) -> tuple[int, int]:
    """Make `feature` fire on exactly one patch, of the first plantable store row in `rows`; returns (row, patch)."""
    x_npd = open_store(store_dpath).layer(layer).patches.torch().float()
    _n, p, d = x_npd.shape
    with torch.no_grad():
        x_norm = sae.normalize(x_npd.reshape(-1, d)) - sae.b_dec
        for src in (r * p + i for r in rows for i in range(p)):  # a patch that is its own direction's argmax
            u = x_norm[src] / x_norm[src].norm()
            proj = x_norm @ u
            if int(proj.argmax()) == src:
                top2 = proj.topk(2).values
                c = 1000 / (top2[0] - top2[1])  # the planted patch fires at 500, every other one below 0
                sae.W_enc[:, feature] = u * c
                sae.b_enc[feature] = -c * (top2[0] + top2[1]) / 2
                return src // p, src % p
    raise AssertionError(f"no patch of rows {rows} can be planted")


def synthetic_store(dpath: Path, n: int, p: int = 16, d: int = 32, seed: int = 0, images_per_shard: int = 512) -> Path:
    """A complete store of random activations (no model run): for size and kill tests."""
    side = int(np.sqrt(p))
    model = {"spec": "synthetic", "arch": "none", "weights_sha256": "0" * 64, "n_blocks": 4, "d_model": d,
             "patch_size": 8, "layout": {"n_cls": 1, "n_reg": 0, "grid_h": side, "grid_w": side},
             "preprocess": {"size": 8 * side, "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "squash"}}
    config = {"model": model, "images": {"spec": "demo", "kind": "demo", "n": n, "fingerprint": "x"},
              "layers": [3], "tokens": ["patches", "cls"], "dtype": "float16", "images_per_shard": images_per_shard}
    w = StoreWriter(dpath, config, n)
    rng = np.random.default_rng(seed)
    for s, (lo, hi) in enumerate(w.shard_ranges):
        m = hi - lo
        arrays = {(3, "patches"): rng.normal(size=(m, p, d)).astype(np.float16),
                  (3, "cls"): rng.normal(size=(m, d)).astype(np.float16)}
        rows = [{"id": i, "path": f"skimage:astronaut#{i % 200},{i % 150},200,{i % 2}", "label": None,
                 "width": 200, "height": 200, "status": "ok"} for i in range(lo, hi)]
        w.write_shard(s, arrays, rows)
    w.finalize()
    return dpath


# --- one mined index for the read-only checks ------------------------------------------------------


@pytest.fixture(scope="module")
def mined(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mined")
    sae = make_sae(tiny_store, root / "sae", tokens=("patches", "cls"))
    row, patch = plant(sae, tiny_store, feature=7)
    sae.save(root / "sae")
    res = run(
        Config(sae=root / "sae", store=tiny_store, index=root / "ix.duckdb", top_k=4, device="cpu", set_defaults=False)
    )
    return {"root": root, "sae": sae, "res": res, "planted": (7, row, patch)}


def test_planted_feature_fires_only_where_planted(mined: dict, tiny_store: Path) -> None:
    f, row, patch = mined["planted"]
    store = open_store(tiny_store)
    image_id = int(store.row_image_ids()[row])
    with Index.open(mined["res"].index) as ix:
        sae_id = ix.resolve_sae(None)
        ex = ix.top_exemplars(sae_id, f)
        assert [e["image_id"] for e in ex] == [image_id]  # one image fires, so one exemplar
        assert ex[0]["n_fired"] == 1 and int(np.argmax(ex[0]["acts"])) == patch and ex[0]["grid"] == (4, 4)
        assert ex[0]["path"] == next(im["path"] for im in store.images if im["id"] == image_id)
        st = ix.feature_stats(sae_id, f)
        assert st["n_fired"] == 1 and st["img_freq"] == pytest.approx(1 / store.n_images)
        assert (
            st["max"] == pytest.approx(ex[0]["value"])
            and ex[0]["value"] == pytest.approx(500, rel=1e-3)
            and st["freq"] == pytest.approx(1 / (store.n_images * 16))
        )
        assert sum(b["count"] for b in ix.histogram(sae_id, f)) == 1
        assert any(r["feature"] == f for r in ix.image_features(sae_id, image_id))


def test_index_equals_brute_force_encode(mined: dict, tiny_store: Path) -> None:
    sae, store = mined["sae"], open_store(tiny_store)
    x = store.layer(3).patches.torch().float()
    n, p, d = x.shape
    with torch.no_grad():
        codes = sae.encode(x.reshape(-1, d)).reshape(n, p, -1)
    scores = codes.amax(1)
    ids = store.row_image_ids()
    with Index.open(mined["res"].index) as ix:
        sae_id = ix.resolve_sae(str(mined["root"] / "sae"))  # a checkpoint path resolves to its id
        assert ix.n_features(sae_id) == 48
        for f in range(48):
            ex = ix.top_exemplars(sae_id, f)
            want = scores[:, f].topk(4)
            want_vals = [v for v in want.values.tolist() if v > 0]
            assert [e["value"] for e in ex] == pytest.approx(want_vals, rel=1e-5)
            for e in ex:
                r = int(np.nonzero(ids == e["image_id"])[0][0])
                np.testing.assert_allclose(e["acts"], codes[r, :, f].numpy(), rtol=2e-3, atol=1e-3)  # float16
            st = ix.feature_stats(sae_id, f)
            assert st["n_fired"] == int((codes[:, :, f] > 0).sum())
            assert st["max"] == pytest.approx(float(codes[:, :, f].max()), rel=1e-5)
        # CLS tokens were mined too (the SAE lists them): one value per image.
        cls = sae.encode(store.layer(3).cls.torch().float())
        ex = ix.top_exemplars(sae_id, 0, token="cls")
        assert [e["value"] for e in ex] == pytest.approx(
            [v for v in cls[:, 0].topk(4).values.tolist() if v > 0], rel=1e-5
        )
        assert len(ex[0]["acts"]) == 0


def test_second_sae_joins_the_index_and_remining_replaces(mined: dict, tiny_store: Path, tmp_path: Path) -> None:
    import shutil

    ix_fpath = tmp_path / "ix.duckdb"
    shutil.copyfile(mined["res"].index, ix_fpath)
    other = make_sae(tiny_store, tmp_path / "other", layer=1, n_latents=24, seed=3, activation="topk", k=4)
    other.save(tmp_path / "other")
    r2 = run(Config(sae=tmp_path / "other", store=tiny_store, index=ix_fpath, by="mean", device="cpu"))
    with Index.open(ix_fpath) as ix:
        assert ix.sae_ids() == [mined["res"].sae_id, r2.sae_id]
        assert ix.resolve_sae(None) == r2.sae_id and ix.n_features(r2.sae_id) == 24
        assert ix.sae_info(r2.sae_id)["rank_by"] == "mean" and ix.sae_info(r2.sae_id)["layer"] == 1
        n_ex = ix.con.execute("SELECT count(*) FROM exemplars WHERE sae_id = ?", [mined["res"].sae_id]).fetchone()[0]
    assert workspace.get_default("index") == str(ix_fpath.resolve())
    run(Config(sae=mined["root"] / "sae", store=tiny_store, index=ix_fpath, top_k=4, device="cpu"))
    with Index.open(ix_fpath) as ix:
        assert ix.sae_ids() == [r2.sae_id, mined["res"].sae_id]  # replaced, now the latest
        again = ix.con.execute("SELECT count(*) FROM exemplars WHERE sae_id = ?", [mined["res"].sae_id]).fetchone()[0]
    assert again == n_ex
    assert layout.faiss_fpath(ix_fpath, r2.sae_id).is_file()


def test_sae_of_another_model_or_layer_is_refused(tiny_store: Path, tmp_path: Path) -> None:
    other_model = {**open_store(tiny_store).model, "spec": "timm:other", "weights_sha256": "f" * 64}
    make_sae(tiny_store, tmp_path / "m", model=other_model).save(tmp_path / "m")
    r = runner.invoke(app, ["mine", "--sae", str(tmp_path / "m"), "--store", str(tiny_store)])
    assert r.exit_code == 2
    assert "was trained on timm:other" in r.stderr and r.stderr.count("\n") == 1
    make_sae(tiny_store, tmp_path / "l", layer=2).save(tmp_path / "l")
    r = runner.invoke(app, ["mine", "--sae", str(tmp_path / "l"), "--store", str(tiny_store)])
    assert r.exit_code == 2 and "reads layer 2" in r.output and "[1, 3]" in r.output
    assert not Path("index.duckdb").exists()
    r = runner.invoke(app, ["mine", "--sae", str(tmp_path / "nothing"), "--store", str(tiny_store)])
    assert r.exit_code == 2 and "is not an SAE checkpoint" in r.output


def test_cli_mine_records_workspace_defaults(mined: dict, tiny_store: Path) -> None:
    r = runner.invoke(app, ["mine", "--sae", str(mined["root"] / "sae"), "--store", str(tiny_store), "--top-k", "3"])
    assert r.exit_code == 0, r.output
    assert Path("index.duckdb").is_file() and "index:" in r.output
    assert workspace.get_default("index") == str(Path("index.duckdb").resolve())
    assert workspace.get_default("sae") == str((mined["root"] / "sae").resolve())
    # A second mine needs no flags at all: the workspace remembers SAE, store and index.
    r = runner.invoke(app, ["mine"])
    assert r.exit_code == 0, r.output
    with Index.open("index.duckdb") as ix:
        assert len(ix.sae_ids()) == 1 and ix.sae_info(ix.sae_ids()[0])["top_k"] == 25
    # Options from a TOML file, the command line winning.
    Path("mine.toml").write_text('top_k = 2\nby = "mean"\ntop_n = 5\n')
    r = runner.invoke(app, ["mine", "--config", "mine.toml", "--top-n", "6"])
    assert r.exit_code == 0, r.output
    with Index.open("index.duckdb") as ix:
        info = ix.sae_info(ix.sae_ids()[0])
        assert (info["top_k"], info["rank_by"], info["top_n"]) == (2, "mean", 6)
    r = runner.invoke(app, ["mine", "--by", "median"])
    assert r.exit_code == 2 and "unknown --by" in r.stderr


def test_locked_and_corrupt_index_give_one_line(mined: dict, tmp_path: Path) -> None:
    import shutil

    ix_fpath = tmp_path / "locked.duckdb"
    shutil.copyfile(mined["res"].index, ix_fpath)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); time.sleep(60)",
            str(ix_fpath),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = runner.invoke(app, ["features", "list", "--index", str(ix_fpath)])
        assert r.exit_code == 2 and "is locked by another process" in r.output
        r = runner.invoke(
            app,
            ["mine", "--sae", str(mined["root"] / "sae"), "--store", str(mined["res"].index), "--index", str(ix_fpath)],
        )
        assert r.exit_code == 2
    finally:
        holder.kill()
        holder.wait()
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    r = runner.invoke(app, ["features", "list", "--index", str(bad)])
    assert r.exit_code == 2 and "corrupt or not a DuckDB file" in r.output
    r = runner.invoke(app, ["features", "list", "--index", str(tmp_path / "none.duckdb")])
    assert r.exit_code == 2 and "no index at" in r.output
    r = runner.invoke(app, ["features", "list"])
    assert r.exit_code == 2 and "none mined in this workspace" in r.output


def _sha(fpath: Path) -> str:
    return hashlib.sha256(fpath.read_bytes()).hexdigest()


def test_killed_mine_leaves_the_old_index_untouched(mined: dict, tiny_store: Path, tmp_path: Path) -> None:
    """SIGKILL a real `saevctl mine` mid-scan: the index is the previous complete one, and the next run cleans up."""
    import shutil

    big = synthetic_store(tmp_path / "big", n=3000)
    sae = make_sae(big, tmp_path / "bigsae", n_latents=2048, tokens=("patches",))
    with torch.no_grad():
        sae.b_enc.zero_()  # dense codes: a slow scan, so the kill lands mid-way
    sae.save(tmp_path / "bigsae")
    ix_fpath = tmp_path / "ix.duckdb"
    shutil.copyfile(mined["res"].index, ix_fpath)
    before = _sha(ix_fpath)
    proc = subprocess.Popen([sys.executable, "-m", "saevctl", "mine", "--sae", str(tmp_path / "bigsae"),
                             "--store", str(big), "--index", str(ix_fpath), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = layout.index_tmp_fpath(ix_fpath, proc.pid)
    deadline = time.monotonic() + 120
    while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tmp.exists(), proc.stderr.read() if proc.poll() is not None else "no temporary index appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _sha(ix_fpath) == before
    with Index.open(ix_fpath) as ix:
        assert ix.sae_ids() == [mined["res"].sae_id]
    assert tmp.exists()  # left by the killed run; the next mine removes it
    run(Config(sae=mined["root"] / "sae", store=tiny_store, index=ix_fpath, top_k=2, device="cpu", set_defaults=False))
    assert not tmp.exists()


def test_topk_sae_mined_sparse_equals_dense(tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TopK SAE's codes handed to the scanner unscattered (pipeline.SPARSE_TOPK) give the same index, every table
    and every exemplar BLOB, as the dense codes (the reference), for patches and CLS."""
    import duckdb

    from saevctl.mine import pipeline

    make_sae(tiny_store, tmp_path / "sae", n_latents=40, seed=5, activation="topk", k=6,
             tokens=("patches", "cls")).save(tmp_path / "sae")
    tables = {}
    for sparse in (True, False):
        monkeypatch.setattr(pipeline, "SPARSE_TOPK", sparse)
        ix = tmp_path / f"ix-{sparse}.duckdb"
        run(Config(sae=tmp_path / "sae", store=tiny_store, index=ix, top_k=4, device="cpu", set_defaults=False))
        with duckdb.connect(str(ix), read_only=True) as con:
            tables[sparse] = {t: con.execute(f"SELECT * EXCLUDE (sae_id) FROM {t} ORDER BY ALL").fetchall()
                              for t in ("features", "histograms", "image_features", "exemplars")}
    assert tables[True] == tables[False]
    assert {row[0] for row in tables[True]["exemplars"]} == {"patches", "cls"}  # both token kinds were mined
    assert sum(1 for row in tables[True]["features"] if row[2] > 0) > 20  # many features fire: not a vacuous match


def test_bf16_mining_is_measured_recorded_and_followed(tiny_store: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """mine --compute bfloat16 (where the CPU has fast bfloat16; float32 elsewhere) finds the planted feature where
    float32 does, prints and records its agreement with float32, keeps it across an unchanged rerun, and is what
    eval's baselines follow (suite.mined_compute); --compute float32 mines again."""
    from saevctl.eval.suite import mined_compute
    from saevctl.hardware import cpu_has_fast_bf16

    monkeypatch.chdir(tmp_path)
    sae = make_sae(tiny_store, tmp_path / "sae", seed=3)
    feature, row, _ = (7, *plant(sae, tiny_store, feature=7))
    sae.save(tmp_path / "sae")
    want = "bfloat16" if cpu_has_fast_bf16() else "float32"
    args = ["mine", "--sae", str(tmp_path / "sae"), "--store", str(tiny_store), "--index", "ix.duckdb", "--top-k", "4"]
    for again in (False, True):
        r = runner.invoke(app, [*args, "--compute", "bfloat16"])
        assert r.exit_code == 0, r.output
        assert ("unchanged" in r.output) == again
        assert ("bfloat16 encoder" in r.output) == (want == "bfloat16")
    with Index.open("ix.duckdb") as ix:
        sae_id = ix.sae_ids()[0]
        got = ix.sae_info(sae_id)["config"]["compute"]
        assert got["compute"] == want
        planted = int(open_store(tiny_store).row_image_ids()[row])
        assert ix.top_exemplars(sae_id, feature, 1)[0]["image_id"] == planted  # as in float32
    if want == "bfloat16":
        assert got["rows_measured"] > 0 and 0.9 <= got["firing_kept"] <= 1 and got["rel_error_shared"] < 0.02
    assert mined_compute(Path("ix.duckdb"), tmp_path / "sae") == want
    r = runner.invoke(app, [*args, "--compute", "float32"])
    assert r.exit_code == 0 and "unchanged" not in r.output and "bfloat16 encoder" not in r.output, r.output
    assert mined_compute(Path("ix.duckdb"), tmp_path / "sae") == "float32"
