"""`saevctl report` on an index mined by the real pipeline from images whose names and labels carry HTML:
pages for exactly the features that fired, every string escaped, links that resolve, a whole-folder swap
(an interrupted or killed report leaves no half site), and the CLI's defaults and one-line errors.
(The same site is opened in headless Chromium by test_report_browser.py.)"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saevctl import layout, workspace
from saevctl.cli import app
from saevctl.mine import Config as MineConfig
from saevctl.mine import Index
from saevctl.mine import run as mine
from saevctl.report import Config, run
from saevctl.report import site as report_site

runner = CliRunner()
EVIL_NAME = "<img src=x onerror=alert(1)>.png"
EVIL_LABEL = "dogs & \"pups\" <i>'x'"  # a class folder name (no '/', so it stays one folder)
DEAD = (0, 5, 9)  # features made never to fire


def build_site_inputs(root: Path, tiny_vit: str) -> dict:
    """Images with HTML in their names and labels -> real store -> SAE (some features dead) -> real mine."""
    from saevctl.extract import Config as ExtractConfig
    from saevctl.extract import run as extract
    from saevctl.sae import SAE, SAEConfig
    from saevctl.store import open_store

    from conftest import draw_image

    images = root / "images"
    rng = np.random.default_rng(1)
    for i in range(10):
        cls = "cats" if i % 2 else EVIL_LABEL
        (images / cls).mkdir(parents=True, exist_ok=True)
        draw_image(rng).save(images / cls / (EVIL_NAME if i == 4 else f"im{i:02d}.png"))
    store = extract(ExtractConfig(model=tiny_vit, images=str(images), layers=(3,), out=root / "store", dtype="float32",
                                  batch_size=5, images_per_shard=5, device="cpu")).out
    st = open_store(store)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=st.d, n_latents=24, model=st.model, layer=3, tokens=("patches",)))
    sae.set_normalization(st.layer(3).patches.torch().reshape(-1, st.d))
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
        sae.b_enc[list(DEAD)] = -1e4
        # Every image fires feature 1 on some patch, so the evil-named image is surely an exemplar of it.
        sae.W_enc[:, 1] = 0.0
        sae.b_enc[1] = 1.0
    sae.save(root / "sae")
    index = root / "ix.duckdb"
    mine(MineConfig(sae=root / "sae", store=store, index=index, top_k=10, device="cpu", set_defaults=False))
    # A second SAE in the same index, on CLS tokens only: its exemplars carry no per-patch activations.
    torch.manual_seed(1)
    cls_sae = SAE(SAEConfig(d=st.d, n_latents=8, model=st.model, layer=3, tokens=("cls",)))
    cls_sae.set_normalization(st.layer(3).cls.torch().reshape(-1, st.d))
    cls_sae.save(root / "cls-sae")
    mine(MineConfig(sae=root / "cls-sae", store=store, index=index, top_k=4, device="cpu", set_defaults=False))
    return {"index": index, "store": store, "sae": root / "sae", "images": images}


_BUILT: dict[str, dict] = {}


@pytest.fixture(scope="session")
def report_inputs(tiny_vit: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One mined index shared by this file and test_report_browser.py (built once per session)."""
    if "inputs" not in _BUILT:
        _BUILT["inputs"] = build_site_inputs(tmp_path_factory.mktemp("report"), tiny_vit)
    return _BUILT["inputs"]


@pytest.fixture(scope="session")
def built_site(report_inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if "site" not in _BUILT:
        out = tmp_path_factory.mktemp("site") / "report"
        res = run(Config(index=report_inputs["index"], out=out, neighbours=5, workers=0))
        _BUILT["site"] = {**report_inputs, "out": out, "result": res}
    return _BUILT["site"]


class _Refs(HTMLParser):
    """Collects href/src targets and every start tag of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        for k in ("href", "src"):
            if a.get(k):
                self.refs.append(a[k])


def _parse(fpath: Path) -> _Refs:
    p = _Refs()
    p.feed(fpath.read_text(encoding="utf-8"))
    return p


def test_pages_for_fired_features_only(built_site: dict) -> None:
    res, out = built_site["result"], built_site["out"]
    with Index.open(built_site["index"]) as idx:
        sae_id = idx.sae_ids()[0]
        fired = [r["feature"] for r in idx.list_features(sae_id, sort="feature", where="n_fired > 0", limit=1000)]
    assert set(DEAD).isdisjoint(fired) and len(fired) == 24 - len(DEAD)
    s, s_cls = res.saes
    assert s["sae_id"] == sae_id and (s["n_pages"], s["n_skipped"]) == (len(fired), len(DEAD))
    sae_dpath = layout.report_sae_dpath(out, s["dname"])
    pages = sorted(int(p.stem.split("-")[1]) for p in sae_dpath.glob("feature-*.html"))
    assert pages == sorted(fired)
    assert len(list(sae_dpath.glob("grid-*.png"))) == len(fired)
    meta = json.loads(layout.report_meta_fpath(out).read_text())
    assert meta["schema_version"] == layout.REPORT_SCHEMA and meta["saes"][0]["n_skipped"] == len(DEAD)
    assert f"{len(DEAD)} never fired and were skipped" in layout.report_index_fpath(out).read_text()
    assert not list(out.parent.glob(".report.*")), "no build folder left beside the site"
    # The CLS-only SAE: its own folder, CLS grids and thumbnails, no patch overlay counts.
    cls_dpath = layout.report_sae_dpath(out, s_cls["dname"])
    assert s_cls["n_pages"] == len(list(cls_dpath.glob("feature-*.html"))) > 0
    assert len(list(cls_dpath.glob("thumb-*-cls.png"))) == s_cls["n_pages"]
    page = next(cls_dpath.glob("feature-*.html")).read_text()
    assert "<h2>cls tokens</h2>" in page and "patches tokens" not in page and " / 16</td>" not in page


def test_every_link_and_picture_resolves_locally(built_site: dict) -> None:
    out = built_site["out"]
    files = [layout.report_index_fpath(out), *out.glob("saes/*/feature-*.html")]
    for fpath in files:
        for ref in _parse(fpath).refs:
            assert not re.match(r"^[a-z]+://", ref) and not ref.startswith("//"), f"external reference {ref} in {fpath}"
            target = ref.split("#")[0]
            if target:
                assert (fpath.parent / target).is_file(), f"{fpath.name} links to missing {ref}"
    # Rows of the index table (JSON) point at real pages and thumbnails too.
    tables = _table_data(out)
    assert len(tables) == 2
    for data in tables:
        for row in data["rows"]:
            page, thumb = row[data["cols"].index("page")], row[data["cols"].index("thumb")]
            assert (out / page).is_file() and (thumb is None or (out / thumb).is_file())


def _table_data(out: Path) -> list[dict]:
    """Each SAE section's table data, parsed from the index page."""
    text = layout.report_index_fpath(out).read_text()
    blobs = re.findall(r'<script type="application/json" class="feature-data">(.*?)</script>', text, re.S)
    assert blobs
    return [json.loads(b) for b in blobs]


def test_names_and_labels_are_escaped(built_site: dict) -> None:
    out = built_site["out"]
    pages = list(out.glob("saes/*/feature-*.html"))
    texts = {p: p.read_text(encoding="utf-8") for p in pages}
    for p, text in texts.items():
        assert "<img src=x" not in text and "<i>'x'" not in text, p
        assert all(
            tag
            in (
                "html",
                "head",
                "meta",
                "title",
                "link",
                "body",
                "nav",
                "a",
                "h1",
                "small",
                "p",
                "section",
                "h2",
                "h3",
                "table",
                "thead",
                "tbody",
                "tr",
                "th",
                "td",
                "span",
                "img",
                "svg",
                "rect",
                "title",
                "text",
                "line",
                "ol",
                "li",
            )
            for tag, _ in _parse(p).tags
        ), p
        for tag, attrs in _parse(p).tags:
            assert not any(k.startswith("on") for k in attrs), (p, tag, attrs)
    with_evil = [p for p, t in texts.items() if html.escape(EVIL_NAME) in t]
    assert with_evil, "the evil-named image is an exemplar of feature 1, so its name must appear escaped"
    assert any(html.escape(EVIL_LABEL) in t for t in texts.values())
    # In the index page the labels travel as JSON inside <script>: no '<' at all, so no '</script>' or '<!--'.
    index_text = layout.report_index_fpath(out).read_text()
    for blob in re.findall(r'<script type="application/json" class="feature-data">(.*?)</script>', index_text, re.S):
        assert "<" not in blob and ">" not in blob
    data = _table_data(out)[0]
    labels = {row[data["cols"].index("label")] for row in data["rows"]}
    assert EVIL_LABEL in labels


def test_histogram_and_neighbours_match_the_index(built_site: dict) -> None:
    out, res = built_site["out"], built_site["result"]
    from saevctl.mine.query import similar

    s = res.saes[0]
    with Index.open(built_site["index"]) as idx:
        sae_id = idx.sae_ids()[0]
        want = [f for f, _ in similar(idx, sae_id, 1, n=5)]
        n_bars = sum(1 for b in idx.histogram(sae_id, 1) if b["count"])
    text = (layout.report_sae_dpath(out, s["dname"]) / layout.report_feature_name(1)).read_text()
    got = [int(a or b) for a, b in re.findall(
        r"feature (\d+)</a> <span class=\"meta\">cosine|<li class=\"dead\">feature (\d+) \(never", text)]
    assert got == want
    svg = re.search(r"<svg class=\"hist\".*?</svg>", text, re.S).group(0)
    assert n_bars >= 1 and svg.count("<rect class=\"bar\"") >= n_bars


def test_pool_draws_the_same_pictures(built_site: dict, tmp_path: Path) -> None:
    """The process pool and the in-process painter write the same files (PNG bytes identical)."""
    out = tmp_path / "pooled"
    res = run(Config(index=built_site["index"], out=out, neighbours=0, workers=2))
    a = layout.report_sae_dpath(built_site["out"], res.saes[0]["dname"])
    b = layout.report_sae_dpath(out, res.saes[0]["dname"])
    names = sorted(p.name for p in a.glob("*.png"))
    assert names == sorted(p.name for p in b.glob("*.png")) and names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_rerun_replaces_report_and_refuses_foreign_folder(built_site: dict, tmp_path: Path) -> None:
    out = tmp_path / "site"
    run(Config(index=built_site["index"], out=out, neighbours=0, k=2))
    (out / "stale.txt").write_text("from the old report")
    run(Config(index=built_site["index"], out=out, neighbours=0, k=2))
    assert not (out / "stale.txt").exists() and report_site.is_report(out)

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = runner.invoke(app, ["report", "--index", str(built_site["index"]), "--out", str(foreign)])
    assert r.exit_code == 2
    assert "already holds files that are not a saevctl report" in r.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    r = runner.invoke(app, ["report", "--index", str(built_site["index"]), "--out", "."])
    assert r.exit_code == 2 and "is the working folder or holds it" in r.stderr


def test_interrupted_report_keeps_previous_site(built_site: dict, tmp_path: Path) -> None:
    out = tmp_path / "site"
    run(Config(index=built_site["index"], out=out, neighbours=0, k=2))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls = []

    def stop_halfway(n: int) -> None:
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(Config(index=built_site["index"], out=out, neighbours=0, k=3), progress=stop_halfway)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the build folder is removed"


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from saevctl.report import Config, run
def slow(n):
    time.sleep(0.3)
run(Config(index=Path(sys.argv[1]), out=Path(sys.argv[2]), neighbours=0, workers=0), progress=slow)
"""


def test_killed_report_leaves_no_site_and_is_cleaned_next_time(built_site: dict, tmp_path: Path) -> None:
    out = tmp_path / "site"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(built_site["index"]), str(out)])
    tmp = layout.report_tmp_dpath(out.absolute(), proc.pid)
    deadline = time.time() + 60
    while not list(tmp.glob("saes/*/grid-*.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the report finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not out.exists(), "a killed report leaves only its hidden build folder"
    run(Config(index=built_site["index"], out=out, neighbours=0, k=1))
    assert report_site.is_report(out) and not tmp.exists()


def test_cli_uses_workspace_index_and_prints_paths(built_site: dict) -> None:
    workspace.set_defaults(index=built_site["index"])
    r = runner.invoke(app, ["report", "--out", "site", "--k", "3", "--neighbours", "2", "--format", "jpeg"])
    assert r.exit_code == 0, r.output
    assert str(built_site["index"]) in r.output
    assert str(Path("site").absolute() / "index.html") in r.output.replace("\n", "")
    assert list(Path("site").glob("saes/*/grid-*.jpg"))


def test_cli_errors_are_one_line(built_site: dict, tmp_path: Path) -> None:
    r = runner.invoke(app, ["report", "--out", "x"])
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: no --index given and none mined in this workspace. "
        "Run saevctl mine --sae CKPT --store DIR, or pass --index."
    )
    r = runner.invoke(app, ["report", "--index", str(tmp_path / "nope.duckdb")])
    assert r.exit_code == 2 and "no index at" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["report", "--index", str(built_site["index"]), "--format", "gif"])
    assert r.exit_code == 2 and "unknown image format 'gif'" in r.stderr
    r = runner.invoke(app, ["report", "--index", str(built_site["index"]), "--sae", "no-such-sae"])
    assert r.exit_code == 2 and "no SAE 'no-such-sae'" in r.stderr
    assert not Path("report").exists()


def test_report_runs_without_torch(report_inputs: dict, tmp_path: Path) -> None:
    """A report reads the index and draws its pictures without importing torch or the ViT package."""
    out = tmp_path / "site"
    code = (f"import sys\nfrom saevctl.report import Config, run\n"
            f"run(Config(index={str(report_inputs['index'])!r}, out={str(out)!r}, workers=0))\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'saevctl.vit')))\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert layout.report_index_fpath(out).is_file()


def test_bulk_reads_equal_the_index_methods(built_site: dict) -> None:
    """The report's one-query-per-chunk readers return what the mine stage's per-feature methods do."""
    from saevctl.report import data

    with Index.open(built_site["index"]) as idx:
        for sae_id in idx.sae_ids():
            info = idx.sae_info(sae_id)
            grid = (int(info["grid_h"]), int(info["grid_w"]))
            for token in info["tokens"]:
                table, hists = data.feature_table(idx, sae_id, token), data.histograms(idx, sae_id, token)
                exs = data.exemplars(idx, sae_id, token, 0, idx.n_features(sae_id) - 1, 100, grid)
                for f in range(idx.n_features(sae_id)):
                    want = idx.feature_stats(sae_id, f, token)
                    assert {c: table[c][f] for c in data.STAT_COLUMNS} == pytest.approx(
                        {c: want[c] for c in data.STAT_COLUMNS}
                    )
                    counts = [b["count"] for b in idx.histogram(sae_id, f, token)]
                    assert list(hists.get(f, np.zeros(len(counts), int))) == counts
                    ref = idx.top_exemplars(sae_id, f, token=token)
                    got = exs.get(f, [])
                    assert [(e.rank, e.image_id, e.path, e.label, e.n_fired) for e in got] == [
                        (r["rank"], r["image_id"], r["path"], r["label"], r["n_fired"] or 0) for r in ref]
                    assert [e.value for e in got] == pytest.approx([r["value"] for r in ref])
                    for e, r in zip(got, ref, strict=True):
                        if len(r["acts"]):
                            np.testing.assert_array_equal(e.acts_hw, r["acts"].reshape(grid))
                        else:
                            assert e.acts_hw is None


def test_missing_decoder_directions_only_drop_neighbours(built_site: dict, tmp_path: Path) -> None:
    """An index copied without its .faiss folder still reports; the pages say why neighbours are missing."""
    import shutil

    index = tmp_path / "copy.duckdb"
    shutil.copyfile(built_site["index"], index)
    res = run(Config(index=index, out=tmp_path / "site", k=1))
    assert not layout.faiss_dpath(index).exists() or not any(layout.faiss_dpath(index).glob("*.safetensors"))
    page = next((tmp_path / "site").glob("saes/00-*/feature-*.html")).read_text()
    assert "neighbours unavailable" in page and res.saes[0]["n_pages"] == built_site["result"].saes[0]["n_pages"]
