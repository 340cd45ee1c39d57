"""The report in real headless Chromium, driven over the DevTools protocol (--remote-debugging-pipe, stdlib
only): pages load with no console error, the feature table sorts and filters, escaped names show as text
with no injected element, and a screenshot of a feature page shows its exemplar grid.
Skipped when Debian's `chromium` is not installed (`make system-deps` installs it)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from saevctl import layout
from saevctl.mine import Index

from test_report import DEAD, EVIL_LABEL, EVIL_NAME, built_site, report_inputs  # noqa: F401  (shared fixtures)

# SAEVCTL_CHROMIUM, when set, is the only browser tried (set it to "none" to check the skip).
_CANDIDATES = (
    [os.environ["SAEVCTL_CHROMIUM"]]
    if "SAEVCTL_CHROMIUM" in os.environ
    else [shutil.which("chromium"), "/usr/bin/chromium"]
)
CHROMIUM = next((p for p in _CANDIDATES if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian package `chromium`; run `make system-deps`)"
)


class Chromium:
    """A headless Chromium spoken to over fds 3/4 (NUL-separated JSON), collecting every event."""

    def __init__(self, profile: Path) -> None:
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        # Move the child's ends to 3 and 4, as --remote-debugging-pipe expects (via high fds to avoid clashes).
        hi_in, hi_out = os.dup(to_child), os.dup(from_child)

        def child_fds() -> None:
            os.dup2(hi_in, 3)
            os.dup2(hi_out, 4)

        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio", "about:blank"]
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=child_fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_child, from_child, hi_in, hi_out):
            os.close(fd)
        self.events: list[dict] = []
        self._replies: dict[int, dict] = {}
        self._cv = threading.Condition()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._r, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                buf += chunk
                *msgs, buf = buf.split(b"\0")
                with self._cv:
                    for raw in msgs:
                        msg = json.loads(raw)
                        (self._replies.__setitem__(msg["id"], msg) if "id" in msg else self.events.append(msg))
                    self._cv.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        with self._cv:
            assert self._cv.wait_for(lambda: self._next in self._replies, timeout), f"no reply to {method}"
            reply = self._replies.pop(self._next)
        assert "error" not in reply, (method, reply["error"])
        return reply.get("result", {})

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        with self._cv:
            ok = self._cv.wait_for(
                lambda: any(e["method"] == method and e.get("sessionId") == session for e in self.events), timeout
            )
        assert ok, f"no {method} within {timeout} s"
        return next(e for e in self.events if e["method"] == method and e.get("sessionId") == session)

    def open(self, url: str, width: int = 1200, height: int = 900) -> str:
        """A new tab showing `url`, loaded; returns its session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=s)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            s,
        )
        self.call("Page.navigate", {"url": url}, s)
        self.wait_event("Page.loadEventFired", s)
        return s

    def eval(self, session: str, expression: str) -> Any:
        res = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, session
        )
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def problems(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions, failed loads, CSP reports and dialogs (an alert() would be XSS)."""
        out = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p["exceptionDetails"])[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: " + json.dumps(p.get("args"))[:300])
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Page.javascriptDialogOpening":
                out.append("dialog: " + p.get("message", ""))
        return out

    def screenshot(self, session: str, clip: dict | None = None) -> Image.Image:
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.call("Page.captureScreenshot", params, session)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _sae_dpath(site: dict) -> Path:
    return layout.report_sae_dpath(site["out"], site["result"].saes[0]["dname"])


def test_index_page_loads_sorts_and_filters(browser: Chromium, built_site: dict) -> None:
    s = browser.open(layout.report_index_fpath(built_site["out"]).as_uri())
    with Index.open(built_site["index"]) as idx:
        sae_id = idx.sae_ids()[0]
        rows = idx.list_features(sae_id, sort="feature", where="n_fired > 0", limit=1000, descending=False)
    rows_js = ("[...document.querySelector('section.sae').querySelectorAll('table.features tbody tr')]"
               ".map(r => +r.dataset.feature)")
    assert browser.eval(s, "document.querySelectorAll('section.sae').length") == 2
    # Default order: freq descending (ties by id).
    want = [r["feature"] for r in sorted(rows, key=lambda r: (-r["freq"], r["feature"]))]
    assert browser.eval(s, rows_js) == want
    browser.eval(s, "document.querySelector('th[data-key=max]').click()")
    assert browser.eval(s, rows_js) == [r["feature"] for r in sorted(rows, key=lambda r: (-r["max"], r["feature"]))]
    browser.eval(s, "document.querySelector('th[data-key=max]').click()")  # again: ascending
    assert browser.eval(s, rows_js) == [r["feature"] for r in sorted(rows, key=lambda r: (r["max"], r["feature"]))]
    assert browser.eval(s, "document.querySelector('th[data-key=max]').getAttribute('aria-sort')") == "ascending"

    def filter_to(text: str) -> list[int]:
        browser.eval(s, f"(() => {{ const i = document.querySelector('input.filter'); i.value = {json.dumps(text)};"
                        " i.dispatchEvent(new Event('input')); })()")
        return sorted(browser.eval(s, rows_js))

    cut = sorted(r["max"] for r in rows)[len(rows) // 2]
    assert filter_to(f"max>{cut!r}") == sorted(r["feature"] for r in rows if r["max"] > cut)
    assert filter_to("1") == [1]
    assert filter_to("no-such-label") == []
    assert browser.eval(s, "document.querySelector('.count').textContent").startswith("0 shown of 0 matching")
    # A label with HTML in it is shown as text, never parsed into elements.
    labelled = filter_to("pups")
    assert labelled and set(labelled) <= {r["feature"] for r in rows}
    cells = browser.eval(s, "[...document.querySelectorAll('table.features td.text')].map(td => td.textContent)")
    assert any(c.startswith(EVIL_LABEL) for c in cells), cells[:5]
    assert browser.eval(s, "document.querySelectorAll('table.features i').length") == 0
    assert not set(DEAD) & set(filter_to(""))
    assert browser.problems(s) == []


def test_feature_page_shows_grid_and_escaped_names(browser: Chromium, built_site: dict) -> None:
    fpath = _sae_dpath(built_site) / layout.report_feature_name(1)
    s = browser.open(fpath.as_uri())
    names = browser.eval(s, "[...document.querySelectorAll('.image-name')].map(e => e.textContent)")
    assert EVIL_NAME in names
    assert browser.eval(s, "document.querySelectorAll('img[src=x], [onerror]').length") == 0
    grid = browser.eval(
        s,
        "(() => { const i = document.querySelector('img.grid'); const r = i.getBoundingClientRect();"
        " return {w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,"
        " x: r.x, y: r.y, width: r.width, height: r.height}; })()",
    )
    assert grid["complete"] and grid["w"] > 300 and grid["h"] > 150, grid
    assert browser.eval(s, "document.querySelectorAll('svg.hist rect.bar').length") >= 1
    assert browser.eval(s, "document.querySelectorAll('ol.neighbours li').length") == 5
    assert browser.problems(s) == []

    page = np.asarray(browser.screenshot(s), dtype=np.float32)
    x, y, w, h = (round(grid[k]) for k in ("x", "y", "width", "height"))
    region = page[y : y + h, x : x + w]
    assert region.size and region.std() > 25, f"the grid region looks blank (std {region.std():.1f})"
    # Many distinct colours (photos under a heat overlay), not a flat or missing picture.
    assert len(np.unique(region.reshape(-1, 3).astype(np.uint8), axis=0)) > 500


def test_every_feature_page_loads_clean(browser: Chromium, built_site: dict) -> None:
    """All pages in one tab: navigation links between them work and none logs an error."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    s = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Page"):
        browser.call(f"{domain}.enable", session=s)
    t0 = time.time()
    fpaths = sorted(built_site["out"].glob("saes/*/feature-*.html"))
    assert len(fpaths) == sum(x["n_pages"] for x in built_site["result"].saes)
    for fpath in fpaths:
        browser.call("Page.navigate", {"url": fpath.as_uri()}, s)
        browser.eval(
            s, "new Promise(r => document.readyState === 'complete' ? r(1) : addEventListener('load', () => r(1)))"
        )
        ok = browser.eval(s, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert ok, f"{fpath.name}: a picture failed to load"
    assert browser.problems(s) == []
    assert time.time() - t0 < 30
