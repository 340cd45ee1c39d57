"""`saevctl serve` without a browser: the Config's range checks, uploads refused from their header (size, format,
pixel count) or by the real decoder (truncated files), "copy as CLI" strings that survive the shell, list files that
carry a store's own demo paths (what the controls button writes), and a taken port as one line, before any loading.
The real server in real Chromium is tests/test_serve_browser.py."""

from __future__ import annotations

import asyncio
import io
import shlex
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.data import resolve_images
from saevctl.errors import InputError
from saevctl.serve import commands
from saevctl.serve.app import jsonable
from saevctl.serve.config import Config
from saevctl.serve.images import Uploads, UploadTooLarge, check_id, sniff
from saevctl.serve.work import Busy, ViTQueue


def png_bytes(w: int = 20, h: int = 16, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def claimed_size_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (valid CRC) but holds almost no data: a decompression-bomb shape."""
    data = bytearray(png_bytes(2, 2))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"port": 0}, "--port 0 is out of range"),
    ({"port": 70000}, "--port 70000 is out of range"),
    ({"n_boot": 5}, "--n-boot 5 is too few resamples"),
    ({"host": " "}, "--host is empty"),
    ({"max_upload_mb": 0.0}, "--max-upload-mb 0 is out of range"),
    ({"control_images": 1}, "--control-images 1 is out of range"),
    ({"strip": 0}, "--strip 0 is out of range"),
])
def test_config_refuses_out_of_range(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Config(**kwargs)
    cfg = Config()
    assert cfg.host == "127.0.0.1" and cfg.local_only and cfg.port == 8000
    assert not Config(host="0.0.0.0").local_only


def test_sniff_refuses_from_the_header_alone() -> None:
    assert sniff(png_bytes(), 10_000) == "PNG"
    with pytest.raises(InputError, match=r"5,000 x 4,000 = 20,000,000 pixels, over the limit of 1,000,000"):
        sniff(claimed_size_png(5_000, 4_000), 1_000_000)
    with pytest.raises(InputError, match=r"over the limit of 1,000,000 pixels \(Image size \(10000000000 pixels\)"):
        sniff(claimed_size_png(100_000, 100_000), 1_000_000)  # past PIL's own bomb limit: refused by PIL's check
    with pytest.raises(InputError, match="the upload is empty"):
        sniff(b"", 100)
    with pytest.raises(InputError, match="not an image saevctl reads"):
        sniff(b"%PDF-1.4 not an image at all", 100)
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(InputError, match="not an image saevctl reads"):  # GIF: a decoder outside the allowed few
        sniff(gif.getvalue(), 100)


def test_uploads_keep_decode_and_forget(tmp_path: Path) -> None:
    folder = tmp_path / "uploads"
    up = Uploads(folder, max_bytes=50_000, max_pixels=10_000, keep=2)
    data = png_bytes()
    ref = up.add(data, "../../etc/C:\\Users\\<b>cat\x07.png")
    assert ref.id == up.add(data, "again.png").id and check_id(ref.id) == ref.id  # the id is the content's hash
    assert ref.name == "<b>cat.png" and Path(ref.path).parent == folder  # the client's path is dropped
    assert up.get(ref.id) is not None and Image.open(ref.path).size == (20, 16)
    with pytest.raises(InputError, match="the PNG file is truncated or corrupt"):
        up.add(data[: len(data) // 2], "half.png")
    assert sorted(p.name for p in folder.iterdir()) == [Path(ref.path).name]  # the bad one is not kept
    with pytest.raises(UploadTooLarge, match=r"the upload is over the limit of 0.05 MB \(0.1\d* MB or more\)"):
        up.add(png_bytes(200, 200), "big.png")
    refs = [up.add(png_bytes(seed=i), f"{i}.png") for i in (1, 2)]
    assert up.get(ref.id) is None and not Path(ref.path).exists()  # the oldest is dropped past `keep`
    assert all(up.get(r.id) for r in refs)
    for bad in ("../x", "12a", "u123", "U0123456789abcdef", ""):
        with pytest.raises(InputError, match="bad image id"):
            check_id(bad)


def test_copy_as_cli_survives_the_shell() -> None:
    t = commands.Target("/w/my index.duckdb", "sae-1", "/w/sae dir", "timm", "a cat,a 'dog'")
    image = "/imgs/<img src=x onerror=alert(1)>; rm -rf ~.png"
    args = shlex.split(commands.probe(t, image, ["3=0", "5=2x"], "0,0;1,1"))
    assert args == ["saevctl", "probe", "--image", image, "--clamp", "3=0", "--clamp", "5=2x", "--patches", "0,0;1,1",
                    "--sae", "/w/sae dir", "--index", "/w/my index.duckdb", "--head", "timm",
                    "--classes", "a cat,a 'dog'"]
    assert shlex.split(commands.search(t, image, "", 8))[-4:] == ["--image", image, "--n", "8"]
    lines = commands.feature(t, 7, 5, "sae-2").splitlines()
    assert [shlex.split(x)[:3] for x in lines] == [["saevctl", "features", c] for c in ("show", "top", "match")]


def test_list_files_keep_a_stores_dataset_paths(tmp_path: Path, image_dir: Path) -> None:
    img = sorted(image_dir.rglob("*.png"))[0]
    (tmp_path / "l.txt").write_text(f"skimage:chelsea#10,20,100,1\tchelsea\n{img}\tcats\n")
    records = resolve_images(str(tmp_path / "l.txt")).records
    assert [(r.path, r.label) for r in records] == [("skimage:chelsea#10,20,100,1", "chelsea"), (str(img), "cats")]


def test_jsonable_numbers() -> None:
    out = jsonable({"a": np.float32(1.5), "b": [float("nan"), np.int64(3)], 4: np.arange(2), "c": (float("inf"),)})
    assert out == {"a": 1.5, "b": [None, 3], "4": [0, 1], "c": [None]}


def test_taken_port_is_one_line_before_any_loading(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--port", str(port), "--index", str(tmp_path / "none.duckdb")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}"), r.output
    r = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert r.exit_code == 2 and "--port 0 is out of range" in r.output
    r = CliRunner().invoke(app, ["serve", "--port", str(port), "--index", str(tmp_path / "none.duckdb")])
    assert r.exit_code == 2 and r.output.startswith(f"error: no index at {tmp_path / 'none.duckdb'}"), r.output


def test_vit_queue_runs_one_job_at_a_time_and_refuses_past_its_depth() -> None:
    queue, lock = ViTQueue(depth=1), threading.Lock()
    running, peak = [0], [0]

    def job() -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return 7

    async def three() -> list:
        return await asyncio.gather(*(queue.run(job) for _ in range(3)), return_exceptions=True)

    first, second, third = asyncio.run(three())
    assert (first, second, peak[0], queue.pending) == (7, 7, 1, 0)  # one ran, one waited, both done
    assert isinstance(third, Busy) and "2 model runs are queued" in str(third)


def test_the_page_ships_in_the_wheel() -> None:
    """Every static file of the page matches pyproject's package-data patterns (so the wheel carries it)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    static = root / "saevctl" / "serve" / "static"
    files = [p.relative_to(static.parent).as_posix() for p in static.iterdir()]
    assert {"static/index.html", "static/app.js", "static/app.css"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns["saevctl.serve"]) for f in files), files
