"""`saevctl serve` for real: the CLI starts a server on a free local port (a subprocess) over a tiny real index (a tiny
ViT's store, an SAE mined into DuckDB + faiss, a second SAE beside it), and headless Chromium drives the page: drag to
select patches, read the feature list (checked against the Figure-2 sum computed by `features search`'s own code),
open a feature, clamp, see before/after change, run the controls, reopen the permalink; no console error. Names with
HTML in them stay text; oversized and corrupt uploads get a clear message; the app's edit numbers equal
`saevctl probe`'s for the same arguments (its "copy as CLI" command, run). Skipped without Debian's `chromium`."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from saevctl.mine import Index

from test_report import EVIL_LABEL, EVIL_NAME
from test_report_browser import CHROMIUM, Chromium

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (run `make system-deps`)")
MAX_MB = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    """(status, headers, JSON or bytes) of one request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            status, hdrs, body = res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as e:
        status, hdrs, body = e.code, dict(e.headers), e.read()
    is_json = hdrs.get("content-type", "").startswith("application/json")
    return status, {k.lower(): v for k, v in hdrs.items()}, json.loads(body) if is_json else body


def post_json(url: str, obj: dict, **headers: str) -> tuple[int, dict, Any]:
    return http(url, json.dumps(obj).encode(), {"Content-Type": "application/json", **headers})


LAYER = 1
"""The SAEs read block 1 of the tiny ViT's 4, so an edit reaches its CLS-pooled classifier through blocks 2-3."""


@pytest.fixture(scope="module")
def serve_inputs(tiny_vit: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Images with HTML in a name and a class, and segmentation masks -> real store -> two SAEs at LAYER (feature 1
    fires on every patch) mined into one index by the real pipeline; the first labelled by `features label`."""
    import torch

    from saevctl.extract import Config as ExtractConfig
    from saevctl.extract import run as extract
    from saevctl.mine import Config as MineConfig
    from saevctl.mine import run as mine
    from saevctl.mine.label import Config as LabelConfig
    from saevctl.mine.label import run as label
    from saevctl.sae import SAE, SAEConfig
    from saevctl.store import open_store

    from conftest import draw_image
    from test_masks import write_masks

    root = tmp_path_factory.mktemp("serve-inputs")
    rng = np.random.default_rng(2)
    for i in range(10):
        cls = "cats" if i % 2 else EVIL_LABEL
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        draw_image(rng).save(root / "images" / cls / (EVIL_NAME if i == 4 else f"im{i:02d}.png"))
    masks = write_masks(root / "images", root / "masks")
    store = extract(ExtractConfig(model=tiny_vit, images=str(root / "images"), layers=(LAYER,), out=root / "store",
                                  masks=masks, dtype="float32", batch_size=5, images_per_shard=5, device="cpu")).out
    st = open_store(store)
    acts = st.layer(LAYER).patches.torch().reshape(-1, st.d)
    for seed, name, n in ((0, "sae", 24), (1, "other-sae", 16)):
        torch.manual_seed(seed)
        sae = SAE(SAEConfig(d=st.d, n_latents=n, model=st.model, layer=LAYER, tokens=("patches",)))
        sae.set_normalization(acts)
        with torch.no_grad():
            sae.b_enc.fill_(-0.3)
            sae.W_enc[:, 1] = 0.0
            sae.b_enc[1] = 1.0
        sae.save(root / name)
        mine(MineConfig(sae=root / name, store=store, index=root / "ix.duckdb", top_k=10, device="cpu",
                        set_defaults=False))
    label(LabelConfig(sae=str(root / "sae"), index=root / "ix.duckdb", device="cpu"))
    return {"index": root / "ix.duckdb", "sae": root / "sae", "store": store}


@pytest.fixture(scope="module")
def server(serve_inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`python -m saevctl serve` on a free port, over the tiny index; its output is checked when it stops."""
    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    args = [sys.executable, "-m", "saevctl", "serve", "--index", str(serve_inputs["index"]), "--sae",
            str(serve_inputs["sae"]), "--head", "timm", "--device", "cpu", "--port", str(port),
            "--max-upload-mb", str(MAX_MB), "--control-images", "6", "--n-boot", "50"]
    env = {**os.environ, "SAEVCTL_HOME": str(work / "home"), "COLUMNS": "200"}
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if http(url + "/api/info")[0] == 200:
                break
        except OSError:
            pass
        assert time.time() < deadline, "the server did not answer within 180 s"
        time.sleep(0.3)
    yield {**serve_inputs, "url": url, "port": port, "work": work}
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert f"serving http://127.0.0.1:{port}/" in out, out
    assert "bound to 127.0.0.1: only this machine can connect" in out, out
    assert "Traceback" not in out, out
    assert [p.name for p in work.iterdir() if p.name != "home"] == []  # nothing written where it ran


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def wait(b: Chromium, s: str, expr: str, timeout: float = 60, errors: bool = False) -> Any:
    """Poll a JavaScript expression until it is truthy; its value. The page showing an error fails, unless
    `errors` (an error is what is waited for)."""
    deadline = time.time() + timeout
    while True:
        value = b.eval(s, expr)
        if value:
            return value
        error = b.eval(s, "document.getElementById('error').hidden ? '' : document.getElementById('error').textContent")
        assert errors or not error, f"the page shows an error while waiting for {expr}: {error}"
        assert time.time() < deadline, f"timed out waiting for {expr}"
        time.sleep(0.1)


def store_images(server: dict) -> list[dict]:
    return http(server["url"] + "/api/images?limit=500")[2]["images"]


def plain_image(server: dict) -> dict:
    return next(i for i in store_images(server) if i["name"] != EVIL_NAME)


IDLE = "document.getElementById('status').textContent === ''"
ROWS = "[...document.querySelectorAll('#feature-list tbody tr')].map(r => +r.dataset.feature)"


def drag(b: Chromium, s: str, start: tuple[int, int], end: tuple[int, int]) -> None:
    """Press on one patch, move to another, release: real pointer events."""
    rect = b.eval(s, "(() => { const r = document.getElementById('grid').getBoundingClientRect();"
                     " return [r.x, r.y, r.width, r.height]; })()")
    grid = b.eval(s, "[...document.querySelectorAll('#grid .cell')].length")
    n = round(grid ** 0.5)

    def at(rc: tuple[int, int]) -> dict:
        return {"x": rect[0] + (rc[1] + 0.5) * rect[2] / n, "y": rect[1] + (rc[0] + 0.5) * rect[3] / n}

    b.call("Input.dispatchMouseEvent", {"type": "mousePressed", **at(start), "button": "left", "clickCount": 1}, s)
    b.call("Input.dispatchMouseEvent", {"type": "mouseMoved", **at(end), "button": "left", "buttons": 1}, s)
    b.call("Input.dispatchMouseEvent", {"type": "mouseReleased", **at(end), "button": "left", "clickCount": 1}, s)


def figure2_reference(server: dict, image: dict, cells: list[int], n: int) -> list[int]:
    """The Figure-2 list computed apart from the server: `features search`'s encoder, then the sum over the cells."""
    from saevctl.mine.query import encode_image

    with Index.open(server["index"]) as idx:
        sae_id = idx.resolve_sae(str(server["sae"]))
        path = next(r["path"] for r in idx.images(sae_id) if str(r["image_id"]) == image["id"])
        _, codes_ps = encode_image(idx, sae_id, path)
    summed = codes_ps[cells].sum(0)
    return [int(f) for f in np.argsort(-summed, kind="stable")[:n] if summed[f] > 0]


def test_select_feature_clamp_controls_and_permalink(server: dict, browser: Chromium) -> None:
    b, image = browser, plain_image(server)
    s = b.open(server["url"] + "/")
    wait(b, s, "document.querySelectorAll('#images li').length > 0")
    b.eval(s, f"document.querySelector('#images button[data-id=\"{image['id']}\"]').click()")
    wait(b, s, f"{IDLE} && document.querySelectorAll('#feature-list tbody tr').length > 0")
    drag(b, s, (0, 0), (1, 1))  # a 2x2 rectangle of patches
    wait(b, s, f"{IDLE} && document.getElementById('sel-count').textContent === '4 patches selected'")
    shown = b.eval(s, ROWS)
    assert shown == figure2_reference(server, image, [0, 1, 4, 5], 10), shown
    with Index.open(server["index"]) as idx:  # each listed feature's label from `features label`
        sae_id = idx.resolve_sae(str(server["sae"]))
        concept = {r["feature"]: r["class_name"] for r in idx.feature_labels(sae_id, "patch")}
    cells = b.eval(s, "[...document.querySelectorAll('#feature-list tbody tr')].map(r => r.cells[1].textContent)")
    assert [c.split(" (AUROC ")[0] for c in cells] == [concept.get(f) or "" for f in shown] and any(cells), cells
    assert b.eval(s, "document.getElementById('cli').textContent").startswith("saevctl features search ")
    strips = "[...document.querySelectorAll('#feature-list img')]"
    wait(b, s, f"{strips}.every(i => i.complete && i.naturalWidth > 0)")

    # The first listed feature's page: statistics, histogram, top images, faiss neighbours, the other SAE's matches.
    first = shown[0]
    b.eval(s, "document.querySelector('#feature-list .feature-link').click()")
    wait(b, s, "!document.getElementById('feature-page').hidden && [...document.querySelectorAll('.tops img')]"
               ".every(i => i.complete && i.naturalWidth > 0)")
    assert b.eval(s, "document.querySelector('#feature-page h2').textContent").startswith(f"Feature {first}")
    assert b.eval(s, "document.querySelectorAll('.tops figure').length") >= 1
    assert b.eval(s, "document.querySelectorAll('.hist div').length") >= 1
    assert b.eval(s, "document.querySelectorAll('ol.similar li').length") == 10
    matches = b.eval(s, "document.querySelector('.matches').textContent")
    assert "decoder cosine" in matches and b.eval(s, "document.querySelectorAll('.matches li').length") >= 1
    assert b.eval(s, "document.getElementById('cli').textContent").startswith("saevctl features show ")

    # Clamp it to a large value on every patch: the classifier's probabilities move.
    b.eval(s, f"(() => {{ const c = document.querySelector('.clamp[data-feature=\"{first}\"]');"
              " const sel = c.querySelector('select'), inp = c.querySelector('input');"
              " sel.value = 'value'; sel.dispatchEvent(new Event('change'));"
              " inp.value = '50'; inp.dispatchEvent(new Event('input')); })()")
    b.eval(s, "document.getElementById('patches').value = 'all';"
              " document.getElementById('patches').dispatchEvent(new Event('change'))")
    b.eval(s, "document.getElementById('apply').click()")
    wait(b, s, f"{IDLE} && !document.getElementById('edit').hidden")
    table = b.eval(s, "[...document.querySelectorAll('#edit table.before-after tbody tr')]"
                      ".map(r => [...r.cells].map(c => c.textContent))")
    assert table and any(abs(float(before) - float(after)) > 1e-3 for _, before, after, *_ in table), table
    assert b.eval(s, "document.querySelectorAll('#grid .cell.edited').length") == 16
    cli = b.eval(s, "document.getElementById('cli').textContent")
    assert cli.startswith("saevctl probe --image ") and f"--clamp {first}=50" in cli and "--patches all" in cli

    # The controls button: the same edit on images of this class next to the two controls, with CIs.
    b.eval(s, "document.getElementById('controls').click()")
    wait(b, s, f"{IDLE} && !document.getElementById('controls-out').hidden", timeout=180)
    conditions = b.eval(s, "[...document.querySelectorAll('.controls-table tbody tr')]"
                           ".map(r => r.cells[1].textContent)")
    assert {"feature", "random feature", "random direction"} <= set(conditions), conditions
    assert b.eval(s, "document.querySelectorAll('.controls-table .ci .span').length") >= 3
    assert "probe --images " in b.eval(s, "document.getElementById('cli').textContent")
    assert b.problems(s) == []

    # The permalink reopens the same view: image, selection, clamp, the controls, the feature page.
    link = b.eval(s, "document.getElementById('permalink').href")
    for part in (f"image={image['id']}", "sel=0%2C0%3B0%2C1%3B1%2C0%3B1%2C1", f"feature={first}", f"clamp={first}%3D50",
                 "patches=all", "run=controls"):
        assert part in link, (part, link)
    s2 = b.open(link)
    wait(b, s2, f"{IDLE} && !document.getElementById('controls-out').hidden && "
                "!document.getElementById('feature-page').hidden", timeout=180)
    assert b.eval(s2, "document.getElementById('sel-count').textContent") == "4 patches selected"
    assert b.eval(s2, ROWS) == shown
    assert b.eval(s2, "document.querySelector('.chip').firstChild.textContent") == f"{first}=50"
    assert b.problems(s2) == []


def test_hostile_names_stay_text(server: dict, browser: Chromium, tmp_path: Path) -> None:
    b = browser
    evil = next(i for i in store_images(server) if i["name"] == EVIL_NAME)
    s = b.open(server["url"] + "/")
    wait(b, s, "document.querySelectorAll('#images li').length > 0")
    texts = b.eval(s, "[...document.querySelectorAll('#images button')].map(x => x.textContent)")
    assert f"{evil['id']} · {EVIL_NAME} · {EVIL_LABEL}" in texts
    b.eval(s, f"document.querySelector('#images button[data-id=\"{evil['id']}\"]').click()")
    wait(b, s, f"{IDLE} && document.querySelectorAll('#feature-list tbody tr').length > 0")
    assert b.eval(s, "document.getElementById('image-title').textContent").startswith(f"{EVIL_NAME} · {EVIL_LABEL}")
    s = b.open(f"{server['url']}/#image={evil['id']}&feature=1")  # feature 1 fires on every image
    wait(b, s, "!document.getElementById('feature-page').hidden && document.querySelectorAll('.image-name').length")
    assert EVIL_NAME in b.eval(s, "[...document.querySelectorAll('.image-name')].map(e => e.textContent)")

    # An upload whose file name is markup: shown as text too.
    from PIL import Image

    name = "<svg onload=alert(2)>.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / name)
    set_file(b, s, tmp_path / name)
    wait(b, s, f"{IDLE} && document.querySelectorAll('#uploads li').length === 1 && "
               "document.getElementById('image-title').textContent.includes('(upload)')")
    assert b.eval(s, "document.querySelector('#uploads button').textContent").endswith(name)
    injected = "document.querySelectorAll('img[src=x], [onerror], [onload], svg, #images i, .tops i').length"
    assert b.eval(s, injected) == 0
    assert b.problems(s) == []  # an alert() would show here as a dialog


def set_file(b: Chromium, s: str, fpath: Path) -> None:
    root = b.call("DOM.getDocument", {}, s)["root"]["nodeId"]
    node = b.call("DOM.querySelector", {"nodeId": root, "selector": "#upload"}, s)["nodeId"]
    b.call("DOM.setFileInputFiles", {"files": [str(fpath)], "nodeId": node}, s)


def test_bad_uploads_get_a_clear_message(server: dict, browser: Chromium, tmp_path: Path) -> None:
    b = browser
    big, corrupt = tmp_path / "big.png", tmp_path / "broken.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(int(MAX_MB * 1e6) + 5000))
    from test_serve import png_bytes

    corrupt.write_bytes(png_bytes(64, 64)[:300])  # a real PNG header, the pixel data cut off
    s = b.open(server["url"] + "/")
    wait(b, s, "document.querySelectorAll('#images li').length > 0")
    error = "(document.getElementById('error').hidden ? '' : document.getElementById('error').textContent)"
    set_file(b, s, big)
    assert "the upload is over the limit of 0.05 MB" in wait(b, s, error, errors=True)
    set_file(b, s, corrupt)
    assert "cannot decode the upload 'broken.png': the PNG file is truncated or corrupt" in wait(
        b, s, f"{error}.includes('broken') && {error}", errors=True)
    # The only complaints are the two refused requests themselves.
    problems = b.problems(s)
    assert len(problems) == 2 and all("status of 413" in p or "status of 400" in p for p in problems), problems
    octets = {"Content-Type": "application/octet-stream"}
    status, _, body = http(server["url"] + "/api/upload", big.read_bytes(), octets)
    assert status == 413 and body["error"].startswith("the upload is over the limit of 0.05 MB (0.055 MB or more).")
    status, _, body = http(server["url"] + "/api/upload", b"GIF89a....", octets)
    assert status == 400 and "not an image saevctl reads" in body["error"]


def test_edit_numbers_equal_saevctl_probe(server: dict, tmp_path: Path) -> None:
    """The app's before/after for an edit equal `saevctl probe`'s: its copied command, run in a shell-like
    subprocess, prints the same numbers, and `probe.run` with those arguments returns the same arrays."""
    from saevctl.probe import Config, run

    image = plain_image(server)
    status, _, res = post_json(server["url"] + "/api/clamp", {"image": image["id"], "clamps": ["1=50", "3=2x"],
                                                              "patches": "selected", "cells": "0,0;1,1;2,3"})
    assert status == 200, res
    args = shlex.split(res["cli"])
    assert args[:3] == ["saevctl", "probe", "--image"] and "--patches" in args and "0,0;1,1;2,3" in args
    proc = subprocess.run([sys.executable, "-m", "saevctl", *args[1:], "--device", "cpu", "--out",
                           str(tmp_path / "cli.png")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout
    s = res["summary"]
    assert f"total variation {s['tv']:.3f}" in printed, printed
    lines = printed.splitlines()
    for row in s["top_before"] + s["top_after"]:
        assert any(row["class"] in ln and f"{row['before']:.3f}" in ln and f"{row['after']:.3f}" in ln
                   for ln in lines), (row, printed)
    assert re.search(rf"clamp 1=50, 3={res['values'][1]:.4g} on 3 patches", printed), printed

    cfg_args = {"image": args[args.index("--image") + 1], "clamps": ("1=50", "3=2x"), "patches": "0,0;1,1;2,3",
                "sae": Path(args[args.index("--sae") + 1]), "index": Path(args[args.index("--index") + 1]),
                "head": "timm", "device": "cpu", "out": tmp_path / "run.png"}
    ref = run(Config(**cfg_args))
    assert res["features"] == ref.features and res["values"] == pytest.approx(ref.values, rel=1e-12)
    np.testing.assert_allclose(res["before"], ref.before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res["after"], ref.after, rtol=0, atol=1e-6)
    assert np.abs(ref.after - ref.before).max() > 1e-3  # the edit did something to compare
    assert res["edited"] == [[int(r), int(c)] for r, c in zip(*ref.edited_hw.nonzero(), strict=True)]


def test_the_server_refuses_what_it_should(server: dict) -> None:
    url = server["url"]
    status, headers, _ = http(url + "/")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    assert http(url + "/api/info", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding
    status, _, body = post_json(url + "/api/clamp", {"image": "0", "clamps": ["1=0"]}, Origin="http://evil.example")
    assert status == 403 and "was refused" in body["error"]
    for bad, message in (("..%2F..%2Fetc%2Fpasswd", "bad image id"), ("999", "no image 999 on this server")):
        status, _, body = http(f"{url}/api/select?image={bad}")
        assert status == 400 and message in body["error"], body
    status, _, body = http(url + "/api/feature/99999")
    assert status == 400 and body["error"] == ("feature 99999 is out of range: this SAE has features 0..23. "
                                               "Pick an id from 0 to 23.")
    assert http(url + "/static/..%2Fconfig.py")[0] == 404 and http(url + "/static/index.html")[0] == 404
    status, _, body = post_json(url + "/api/clamp", {"image": "0", "clamps": ["zz"]})
    assert status == 400 and body["error"].startswith("bad --clamp 'zz'")
    status, _, body = post_json(url + "/api/clamp", {"image": "0", "clamps": []})
    assert status == 400 and body["error"].startswith("no clamp is set")
