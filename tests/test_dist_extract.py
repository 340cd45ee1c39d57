"""Extraction under torchrun (gloo, CPU, real subprocesses): the store equals a 1-process run byte for byte,
a run killed mid-way resumes (with any number of ranks), and one rank's error reaches every rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saevctl import dist
from saevctl.extract import Config, ranks, run

BATCH, PER_SHARD = 2, 2  # 13 images -> 7 shards: rank 0 takes 0,2,4,6 and rank 1 takes 1,3,5


def _torchrun(n: int, args: list[str], **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAEVCTL_DIST_TIMEOUT_S": "60"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "saevctl", "extract", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _extract_args(model: str, images: Path | str, out: Path, layers: str = "1,3") -> list[str]:
    return ["--model", model, "--images", str(images), "--layers", layers, "--out", str(out), "--device", "cpu",
            "--batch-size", str(BATCH), "--images-per-shard", str(PER_SHARD), "--dtype", "float32"]


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _reference(model: str, images: Path | str, out: Path) -> Path:
    run(Config(model=model, images=str(images), layers=(1, 3), out=out, dtype="float32", batch_size=BATCH,
               images_per_shard=PER_SHARD, device="cpu"))
    return out


def _snapshot(store: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest without its write time (the only field that differs by design)."""
    files = {}
    for p in sorted(store.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                m.pop("written_at")
                data = json.dumps(m, sort_keys=True).encode()
            files[p.relative_to(store).as_posix()] = data
    return files


def test_two_ranks_equal_one_process(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    ref = _reference(tiny_vit, image_dir, tmp_path / "one")
    code, out, err = _finish(_torchrun(2, _extract_args(tiny_vit, image_dir, tmp_path / "two")))
    assert code == 0, err
    assert "activation store" in out and "7 shards" in out
    assert out.count("activation store") == 1, "only rank 0 prints the summary"
    one, two = _snapshot(ref), _snapshot(tmp_path / "two")
    assert len([k for k in one if k.startswith("shards/")]) == 7 * 5  # 2 layers x 2 kinds + images.jsonl
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []


@pytest.mark.gpu
def test_two_gpu_ranks_equal_one_gpu_process(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    """NCCL path: each rank on its own GPU (float32, so no autocast differences between devices)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    args = _extract_args(tiny_vit, image_dir, tmp_path / "two")
    args[args.index("cpu")] = "cuda"
    code, _, err = _finish(_torchrun(2, args))
    assert code == 0, err
    run(Config(model=tiny_vit, images=str(image_dir), layers=(1, 3), out=tmp_path / "one", dtype="float32",
               batch_size=BATCH, images_per_shard=PER_SHARD, device="cuda"))
    one, two = _snapshot(tmp_path / "one"), _snapshot(tmp_path / "two")
    assert one.keys() == two.keys() and [k for k in one if one[k] != two[k]] == []


def _image_list(image_dir: Path, dpath: Path, fifo_at: int) -> tuple[Path, Path]:
    """A list of the 13 images where one entry is a named pipe: reading it blocks until the test kills."""
    dpath.mkdir()
    paths = sorted(p for p in image_dir.rglob("*") if p.is_file())
    blocker = dpath / "blocker.png"
    os.mkfifo(blocker)
    lines = [str(blocker if i == fifo_at else p) for i, p in enumerate(paths)]
    lst = dpath / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst, blocker


def _rank_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (read from /proc, Linux only)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                found[int(kv[5:])] = int(proc.name)
    return found


@pytest.mark.slow  # two torchrun launches, about 20 s
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_killed_rank_resumes_to_identical_store(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    lst, blocker = _image_list(image_dir, tmp_path / "list", fifo_at=9)  # image 9 -> shard 4 -> rank 0
    store = tmp_path / "store"
    proc = _torchrun(2, _extract_args(tiny_vit, lst, store))
    shards = store / "shards"
    deadline = time.monotonic() + 90
    want = {"000000", "000001", "000002", "000003", "000005"}
    while not want <= {p.name for p in shards.glob("0*")} and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    assert want <= {p.name for p in shards.iterdir()}
    pids = _rank_pids(proc.pid)
    os.kill(pids[0], signal.SIGKILL)  # rank 0 is stuck on the pipe; torchrun then stops rank 1
    code, _, _ = _finish(proc)
    assert code != 0
    assert not json.loads((store / "manifest.json").read_text())["complete"]
    assert {p.name for p in shards.iterdir() if not p.name.startswith(".")} == want
    before = (shards / "000001" / "images.jsonl").stat().st_mtime_ns

    blocker.unlink()
    blocker.write_bytes(sorted(p for p in image_dir.rglob("*") if p.is_file())[9].read_bytes())
    # Three ranks for the two missing shards: one rank has nothing to do and only waits.
    code, out, err = _finish(_torchrun(3, _extract_args(tiny_vit, lst, store)))
    assert code == 0, err
    assert "5 resumed" in out
    assert (shards / "000001" / "images.jsonl").stat().st_mtime_ns == before, "a finished shard was rewritten"
    ref = _reference(tiny_vit, lst, tmp_path / "one")
    one, resumed = _snapshot(ref), _snapshot(store)
    assert one.keys() == resumed.keys()
    assert [k for k in one if one[k] != resumed[k]] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun_like(n: int, args: list[str]) -> list[tuple[int, str, str]]:
    """n plain `python -m saevctl` processes with the variables srun sets (no torchrun), run together."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(n),
               "SLURM_STEP_ID": "0",
               "SLURM_LOCALID": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "SAEVCTL_DIST_TIMEOUT_S": "60"}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(name, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "saevctl", "extract", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [_finish(p) for p in procs]


@pytest.mark.slow  # two launches of two processes, about 20 s
def test_srun_ranks_equal_one_process_and_share_errors(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    ref = _reference(tiny_vit, image_dir, tmp_path / "one")
    store = tmp_path / "srun"
    (code0, out0, err0), (code1, out1, err1) = _srun_like(2, _extract_args(tiny_vit, image_dir, store))
    assert code0 == code1 == 0, err0 + err1
    assert "activation store" in out0 and out1 == ""
    one, two = _snapshot(ref), _snapshot(store)
    assert one.keys() == two.keys() and [k for k in one if one[k] != two[k]] == []

    # Settings that do not match the store: rank 0 finds out, and every rank stops with one line.
    (code0, _, err0), (code1, _, err1) = _srun_like(2, _extract_args(tiny_vit, image_dir, store, layers="2"))
    assert code0 == code1 == 2
    assert err0.strip().splitlines() == [next(x for x in err0.splitlines() if x.startswith("error:"))]
    assert "was made with other settings (layers [1, 3] vs [2])" in err0
    assert err1.strip().startswith("error: rank 0 failed: the store at") and len(err1.strip().splitlines()) == 1


def test_missing_rank_fails_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0"), ("SLURM_STEP_ID", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())),
                        ("SAEVCTL_DIST_TIMEOUT_S", "1")):
        monkeypatch.setenv(name, value)
    t0 = time.monotonic()
    with pytest.raises(dist.DistError, match=r"rank 0 of 2 could not meet the other ranks at 127.0.0.1") as e:
        dist.init_process_group("cpu")
    assert time.monotonic() - t0 < 30
    assert "SAEVCTL_DIST_TIMEOUT_S" in e.value.one_line()
    assert not dist._is_initialized()


def test_dist_info_reads_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                 "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(name, raising=False)
    assert dist.dist_info() == dist.DistInfo(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert dist.dist_info() == dist.DistInfo(0, 1, 0), "a batch script itself (no srun step) is one process"
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist.dist_info() == dist.DistInfo(5, 8, 1)
    assert not dist.is_main()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist.dist_info() == dist.DistInfo(2, 4, 0)  # torchrun's variables win over srun's


def test_srun_without_master_addr_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(dist.DistError, match="MASTER_ADDR") as e:
        dist.init_process_group("cpu")
    assert "scontrol show hostnames" in e.value.one_line()
    monkeypatch.setenv("SLURM_NTASKS", "x")
    with pytest.raises(dist.DistError, match="SLURM_NTASKS"):
        dist.dist_info()


def test_single_process_calls_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert dist.init_process_group("cpu") == dist.DistInfo(0, 1, 0)
    dist.barrier()
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.raise_if_any_failed(None)
    with pytest.raises(KeyError):
        dist.raise_if_any_failed(KeyError("x"))
    dist.shutdown()
    assert dist.rank_device("cuda") == "cuda"
    assert dist.rank_device("cuda:1") == "cuda:1"


def test_one_fixed_gpu_for_several_ranks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(dist.DistError, match="--device cuda:0 names one GPU for all 2 processes"):
        dist.rank_device("cuda:0")
    assert dist.rank_device("cpu") == "cpu"


@given(n_shards=st.integers(0, 60), world=st.integers(1, 9), done=st.sets(st.integers(0, 59)))
def test_assignment_covers_every_unfinished_shard_once(n_shards: int, world: int, done: set[int]) -> None:
    todo = [s for s in range(n_shards) if s not in done]
    shares = [ranks.assign(todo, r, world) for r in range(world)]
    assert sorted(s for share in shares for s in share) == todo
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if not done:
        assert all(s % world == r for r, share in enumerate(shares) for s in share)
