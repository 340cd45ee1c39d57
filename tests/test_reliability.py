"""Trust under real conditions: a second writer of the same artifact is refused in one line naming the first (real
processes, real OS locks, a SIGKILLed holder leaves no stale lock); a disk that fills up mid-extraction, a read-only
disk and an impossible --out are one line each, and the extraction resumes once space is back; an input without
usable images is refused before any work, and a store without rows is refused by the stages that read it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from saevctl import layout, lock
from saevctl.cli import app
from saevctl.mine import Config as MineConfig
from saevctl.mine import Index
from saevctl.mine import run as mine

from test_mine import make_sae

# Runs saevctl with its lock acquisition patched to stop the process (SIGSTOP) right after the lock is taken: the
# holder is then parked, deterministically, inside a real write, until the test sends SIGCONT or SIGKILL.
PAUSED_WRITER = """
import os, signal, sys
import saevctl.lock as lock
real = lock._acquire
def acquire_then_stop(*args, **kwargs):
    fd = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGSTOP)
    return fd
lock._acquire = acquire_then_stop
sys.argv[0] = "saevctl"
from saevctl.cli import main
main()
"""
# Holds the write locks of the paths given, like a running writer of each, until its stdin closes.
LOCK_HOLDER = """
import sys
from pathlib import Path
import saevctl.lock as lock
sys.argv[0] = "saevctl"
held = [lock.exclusive(Path(p), "x") for p in sys.argv[1:]]
for h in held:
    h.__enter__()
print("held", flush=True)
sys.stdin.read()
"""
STORE_ARGS = ("--layers", "1,3", "--dtype", "float32", "--batch-size", "4", "--images-per-shard", "4",
              "--device", "cpu")  # the settings of conftest's tiny_store, so stores compare byte for byte


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res: Result) -> str:
    """Exit 2 and exactly one stderr line, no traceback; returns the line."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def refused_by(res: Result, what: str, target: Path, pid: int, command: str, flag: str = "--out") -> None:
    line = one_line_error(res)
    head = f"error: {what} {target} is being written by another saevctl process (pid {pid}: saevctl {command} "
    assert line.startswith(head), (line, head)
    assert line.endswith(f"). Wait for it to finish (or stop it), or pass another {flag}."), line


def start_paused(*args: object) -> subprocess.Popen[str]:
    """A real `saevctl ARGS` process, returned once it holds its lock and is stopped there."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended before taking its lock: {proc.communicate()}")
        assert time.monotonic() < deadline, "the writer never took its lock"
        time.sleep(0.02)
    return proc


def resume(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest without its write time."""
    files = {}
    for p in sorted(store.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "written_at"}).encode()
            files[p.relative_to(store).as_posix()] = data
    return files


@pytest.fixture(scope="module")
def mined(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An index holding one mined SAE, and a second SAE checkpoint not mined yet."""
    root = tmp_path_factory.mktemp("mined")
    for name, seed in (("sae-a", 0), ("sae-b", 1)):
        make_sae(tiny_store, root / name, n_latents=32, seed=seed).save(root / name)
    mine(MineConfig(sae=root / "sae-a", store=tiny_store, index=root / "ix.duckdb", top_k=2, device="cpu",
                    set_defaults=False))
    return {"index": root / "ix.duckdb", "a": root / "sae-a", "b": root / "sae-b"}


# --- one writer per artifact ---------------------------------------------------------------------------------


def test_second_extract_into_a_store_being_written_is_refused(
    tiny_vit: str, image_dir: Path, tiny_store: Path, tmp_path: Path
) -> None:
    """Before: both crashed with FileNotFoundError tracebacks. Now the second is one line naming the first, and the
    first finishes a store equal to an undisturbed run's."""
    out = tmp_path / "store"
    args = ("extract", "--model", tiny_vit, "--images", image_dir, "--out", out, *STORE_ARGS)
    first = start_paused(*args)
    refused_by(cli(*args), "the store", out, first.pid, "extract --model")
    assert lock.lock_fpath(out).is_file()
    rc, _, err = resume(first)
    assert rc == 0, err
    assert snapshot(out) == snapshot(tiny_store)
    assert not lock.lock_fpath(out).exists(), "a finished writer removes its lock file"


def test_second_mine_into_an_index_being_written_is_refused(mined: dict[str, Path], tiny_store: Path,
                                                            tmp_path: Path) -> None:
    """Before: both exited 0 and one SAE silently vanished (the later rename won). Now the second is refused and the
    index ends with every SAE that was mined."""
    index = tmp_path / "ix.duckdb"
    index.write_bytes(mined["index"].read_bytes())
    first = start_paused("mine", "--sae", mined["b"], "--store", tiny_store, "--index", index, "--top-k", "2",
                         "--device", "cpu")
    res = cli("mine", "--sae", mined["a"], "--store", tiny_store, "--index", index, "--device", "cpu")
    refused_by(res, "the index", index, first.pid, "mine --sae", flag="--index")
    rc, _, err = resume(first)
    assert rc == 0, err
    with Index.open(index) as ix:
        assert sorted(s.split("-")[1] for s in ix.sae_ids()) == ["a", "b"]


def test_second_train_is_refused_and_a_killed_writer_leaves_no_stale_lock(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("train", "--store", tiny_store, "--layer", "3", "--out", out, "--width", "2x", "--activation", "topk",
            "--k", "4", "--batch-size", "32", "--device", "cpu")
    first = start_paused(*args)
    refused_by(cli(*args), "the training run", out, first.pid, "train --store")
    first.kill()  # SIGKILL: the kernel drops its lock; the lock file stays behind, unlocked
    first.communicate(timeout=60)
    assert lock.lock_fpath(out).is_file()
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert layout.train_sweep_fpath(out).is_file() and not lock.lock_fpath(out).exists()


def test_every_other_writer_takes_its_lock(mined: dict[str, Path], tiny_vit: str, image_dir: Path,
                                           tiny_store: Path, tmp_path: Path) -> None:
    """features label, heads train, report, eval (one summary, and eval all's folder) each refuse to write what
    another process holds, naming it, before any work."""
    index, head, site, summary, folder = (mined["index"], tmp_path / "head", tmp_path / "report",
                                          tmp_path / "recon.json", tmp_path / "eval")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, *map(str, (index, head, site, summary, folder))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        cases = [
            (("features", "label", "--index", index, "--sae", mined["a"], "--device", "cpu"), index, "--index"),
            (("heads", "train", "--task", "classify", "--images", image_dir, "--model", tiny_vit, "--out", head,
              "--device", "cpu"), head, "--out"),
            (("report", "--index", index, "--out", site), site, "--out"),
            (("eval", "recon", "--sae", mined["a"], "--store", tiny_store, "--out", summary, "--device", "cpu"),
             summary, "--out"),
            (("eval", "all", "--sae", mined["a"], "--store", tiny_store, "--out", folder, "--device", "cpu"),
             folder, "--out"),
        ]
        for args, target, flag in cases:
            line = one_line_error(cli(*args))
            assert f" {target} is being written by another saevctl process (pid {holder.pid}: saevctl " in line, line
            assert line.endswith(f"or pass another {flag}."), line
    finally:
        holder.communicate(timeout=30)
    assert not head.exists() and not site.exists() and not summary.exists()


# --- OS errors: one line, and the run resumes once the cause is gone ------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards (skipped where mounting is not permitted)."""
    dpath = tmp_path / "small-disk"
    dpath.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dpath)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        yield dpath
    finally:
        subprocess.run(["umount", "-l", str(dpath)], check=False)


def test_disk_filling_up_mid_extraction_is_one_line_and_resumes(tiny_vit: str, image_dir: Path, small_disk: Path,
                                                                 tmp_path: Path) -> None:
    """A real full disk: the activations alone (696 KB) fit the free-space check, but their files take ~1.4 MB of
    the 1 MiB tmpfs. The failing run is one line; after a remount with room the rerun resumes the finished shards
    and the store equals a clean run's."""
    good = sorted(p for p in image_dir.rglob("*.*") if "corrupt" not in p.name)
    images = tmp_path / "list.txt"
    images.write_text("".join(f"{good[i % len(good)]}\n" for i in range(80)))
    out = small_disk / "store"
    args = ["extract", "--model", tiny_vit, "--images", str(images), "--out", str(out), *STORE_ARGS]
    args[args.index("--layers") + 1] = "0,1,2,3"
    proc = subprocess.run([sys.executable, "-m", "saevctl", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: no space left on the device while writing {out}"), lines[0]
    assert lines[0].endswith("Free some disk space or choose another --out, then run the same command again to "
                             "resume."), lines[0]
    n_done = len(list(layout.store_shards_dpath(out).iterdir()))
    assert 0 < n_done < 20
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert f"({n_done} resumed)" in res.stdout
    clean = cli(*args[:6], str(tmp_path / "clean"), *args[7:])
    assert clean.exit_code == 0, clean.output
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_read_only_output_is_one_line(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0
    if not mounted:
        ro.chmod(0o555)  # without root: a folder we may not write (root ignores modes, hence the mount)
    try:
        res = cli("extract", "--model", tiny_vit, "--images", image_dir, "--out", ro / "store", *STORE_ARGS)
        want = (f"error: {ro / 'store'} is on a read-only file system. Choose an output on a writable disk."
                if mounted else f"error: permission denied for {ro / 'store'}. Fix its permissions, or choose a path "
                                "you can write.")
        assert one_line_error(res) == want
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        ro.chmod(0o755)


def test_output_under_proc_is_one_line(tiny_vit: str, image_dir: Path) -> None:
    res = cli("extract", "--model", tiny_vit, "--images", image_dir, "--out", "/proc/x", *STORE_ARGS)
    assert one_line_error(res) == ("error: cannot create /proc/x (no such file or directory). Choose a location on "
                                   "a normal writable disk.")


# --- inputs with nothing to work on ---------------------------------------------------------------------------


def test_folder_without_readable_images_is_refused_before_any_work(tiny_vit: str, tmp_path: Path) -> None:
    src = tmp_path / "junk"
    src.mkdir()
    (src / "notes.txt").write_text("no pictures")
    (src / "photo.jpg").write_bytes(b"")
    res = cli("extract", "--model", tiny_vit, "--images", src, "--out", tmp_path / "s", *STORE_ARGS)
    assert one_line_error(res) == (f"error: no readable images in {src}: found 2 files (1 .txt, 1 empty .jpg). Put "
                                   ".jpg/.png/.webp/.bmp files there (searched recursively), or pass --images demo.")
    assert not (tmp_path / "s").exists()


def test_store_without_rows_is_refused_by_its_readers(tiny_vit: str, tmp_path: Path) -> None:
    """A store whose every image was unreadable is a valid, empty store; train and mine refuse it in one line."""
    src = tmp_path / "corrupt"
    src.mkdir()
    for i in range(2):
        (src / f"{i}.png").write_bytes(b"not a png")
    store = tmp_path / "s"
    assert cli("extract", "--model", tiny_vit, "--images", src, "--out", store, *STORE_ARGS).exit_code == 0
    want = (f"error: the store at {store} holds no activations: none of its images could be read (each is listed with "
            "its error in images.jsonl). Extract again from readable images, into a new --out.")
    assert one_line_error(cli("train", "--store", store, "--layer", "3", "--out", tmp_path / "run",
                              "--device", "cpu")) == want
