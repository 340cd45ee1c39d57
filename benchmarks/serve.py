"""Explorer latency on the demo model on CPU: patch selection -> feature list, and one clamp -> before/after, as
p50 / p95 over HTTP to a real `saevctl serve` (a subprocess), next to the bare probe call timed in the same run.

Usage: python benchmarks/serve.py [--workspace demo-out] [--image 1] [--repeats 30] [--quick] [--json OUT]
The workspace is a finished `make demo` folder (index.duckdb and sae/), only read. Timed interleaved (A B A B ...):
  select           GET /api/select on an image already open (its codes cached, as after the first click), a random
                   rectangle of patches each time: the Figure-2 sum, labels, frequencies, JSON.
  select+pictures  the same, then the list's pictures the page loads next (a strip and a heat tile per feature,
                   six requests at a time as a browser does), mostly drawn fresh since each selection lists others.
  open             the first selection of an image not seen before: the ViT to the SAE's layer and the SAE.
  clamp            POST /api/clamp, the feature with the largest sum clamped to 0 where it fires: `probe.run` inside
                   the server, plus the before/after/changed panels and JSON.
  bare probe       `saevctl.probe.run(cfg, prober, figure=False)` in this process with its own loaded models, in a
                   worker thread as the server runs it: the numbers the clamp returns, without server, HTTP or
                   panels (the clamp's floor, not a GEMM ceiling).
  probe + PNG      `probe.run` with its matplotlib figure, as `saevctl probe` runs it (full mode only).
Figures are min / median / max with the load average, plus p50 and p95; the clamp's ratio to the bare call is
paired repeat by repeat. Targets (issue 14, 2 cores): selection p95 < 300 ms, clamp p95 < 1.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Report, Series, interleave, section

TARGETS_MS = {"select": 300.0, "clamp": 1500.0}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("demo-out"), help="a finished make demo folder")
    ap.add_argument("--image", default="1", help="store image id to select on and clamp (1: chelsea)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 30, quick 8)")
    ap.add_argument("--quick", action="store_true", help="8 repeats, no probe + PNG (about two minutes)")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def get(url: str, data: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=300) as res:
        body: bytes = res.read()
        return body


def start_server(workspace: Path, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "saevctl", "serve", "--index", str(workspace / "index.duckdb"), "--sae",
            str(workspace / "sae"), "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SAEVCTL_HOME": str(tmp / "home")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"saevctl serve exited:\n{proc.communicate()[0]}")
        try:
            get(url + "/api/info")
            return proc, url
        except OSError:
            if time.time() > deadline:
                raise SystemExit("saevctl serve did not answer within 300 s") from None
            time.sleep(0.5)


def selection_fns(url: str, image: str, grid: tuple[int, int], n_images: int) -> dict[str, Callable[[], None]]:
    rng = np.random.default_rng(0)
    fresh = iter(range(100, n_images))  # ids never opened before, one per repeat
    pool = ThreadPoolExecutor(6)

    def cells() -> str:
        r0, c0 = int(rng.integers(0, grid[0] - 3)), int(rng.integers(0, grid[1] - 3))
        h, w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        return ";".join(f"{r},{c}" for r in range(r0, r0 + h) for c in range(c0, c0 + w))

    def select() -> None:
        get(f"{url}/api/select?image={image}&cells={cells()}")

    def select_pictures() -> None:
        res = json.loads(get(f"{url}/api/select?image={image}&cells={cells()}"))
        urls = [u for r in res["features"] for u in (f"{url}/api/strip/{r['feature']}.png",
                                                       f"{url}/api/heat/{image}/{r['feature']}.png")]
        list(pool.map(get, urls))

    def open_image() -> None:
        get(f"{url}/api/select?image={next(fresh)}&cells=")

    return {"select": select, "select_pictures": select_pictures, "open": open_image}


def probe_fns(url: str, workspace: Path, image: str, tmp: Path, full: bool) -> dict[str, Callable[[], None]]:
    """The app's clamp and the bare probe call on the same arguments (the image's top feature, ablated)."""
    from saevctl.mine import Index
    from saevctl.probe import Config, run
    from saevctl.probe.probe import prepare

    with Index.open(workspace / "index.duckdb") as idx:
        sae_id = idx.resolve_sae(str(workspace / "sae"))
        path = next(str(r["path"]) for r in idx.images(sae_id) if str(r["image_id"]) == image)
    top = json.loads(get(f"{url}/api/select?image={image}&cells="))["features"][0]["feature"]
    body = json.dumps({"image": image, "clamps": [f"{top}=0"], "patches": "fired"}).encode()
    cfg = Config(image=path, clamps=(f"{top}=0",), sae=workspace / "sae", index=workspace / "index.duckdb",
                 head="saliency", device="cpu", out=tmp / "probe.png")
    prober, _ = prepare(cfg)
    worker = ThreadPoolExecutor(1)  # where the server runs it too: torch's threads behave differently off the main one
    fns: dict[str, Callable[[], None]] = {
        "clamp": lambda: get(f"{url}/api/clamp", body) and None,
        "probe": lambda: worker.submit(run, cfg, prober, False).result() and None,
    }
    if full:
        fns["probe_png"] = lambda: worker.submit(run, cfg, prober).result() and None
    return fns


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def add(rep: Report, key: str, label: str, series: Series) -> dict[str, Any]:
    ms = [1000 * s for s in series.seconds]
    p50, p95 = percentile(ms, 50), percentile(ms, 95)
    fig = rep.figure(key, label, ms, "ms", series.loads, ".0f", p50=p50, p95=p95)
    target = TARGETS_MS.get(key)
    met = "" if target is None else f"  (target p95 < {target:.0f} ms: {'met' if p95 < target else 'NOT met'})"
    print(f"  {'':<44} p50 {p50:.0f} ms, p95 {p95:.0f} ms{met}", flush=True)
    return fig


def main() -> None:
    args = parse()
    repeats = args.repeats or (8 if args.quick else 30)
    workspace = args.workspace.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        proc, url = start_server(workspace, tmp)
        try:
            info = json.loads(get(url + "/api/info"))
            fns = selection_fns(url, args.image, tuple(info["grid"]), int(info["n_images"]))
            fns |= probe_fns(url, workspace, args.image, tmp, full=not args.quick)
            times = interleave(fns, repeats, warmup=1)
        finally:
            proc.terminate()
            proc.communicate(timeout=60)
    import torch

    rep = Report("serve", args.quick, workspace=str(workspace), image=args.image, repeats=repeats, device="cpu",
                 model=info["model"], head=info["head"]["name"], sae=info["sae_id"],
                 torch_threads=torch.get_num_threads())
    section(f"saevctl serve on {info['model']} (head {info['head']['name']}), {repeats} repeats, over HTTP")
    add(rep, "select", "selection -> feature list (JSON)", times["select"])
    add(rep, "select_pictures", "selection -> list + its strips and heat tiles", times["select_pictures"])
    add(rep, "open", "first selection of a new image (ViT + SAE)", times["open"])
    add(rep, "clamp", "clamp -> before/after (JSON + panels)", times["clamp"])
    add(rep, "probe", "bare probe call (probe.run, no PNG)", times["probe"])
    if "probe_png" in times:
        add(rep, "probe_png", "probe.run with its PNG (as saevctl probe)", times["probe_png"])
    rep.series_ratio("ratio_clamp", "app clamp vs the bare probe call", times["clamp"], times["probe"],
                     unit="x the bare call's speed")
    overhead = [1000 * (a - b) for a, b in zip(times["clamp"].seconds, times["probe"].seconds, strict=True)]
    rep.note("clamp_overhead_ms_median", statistics.median(overhead))
    print(f"  clamp - bare probe call, paired: median {statistics.median(overhead):+.0f} ms", flush=True)
    rep.headline("clamp -> before/after (ms, median)", "clamp", "probe", "ratio_clamp")
    rep.write(args.json)


if __name__ == "__main__":
    main()
