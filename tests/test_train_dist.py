"""Training under `torchrun --nproc-per-node 2` (gloo, CPU): data-parallel runs match a 1-process run with the
same global batch (relu, topk, and batchtopk with AuxK active), checkpoints are written once, a SIGKILLed 2-process
run resumes, and a sweep spread over ranks gives the SAEs a 1-process sweep gives.

Tolerance: weights after 40 to 600 Adam steps agree to atol 1e-5 (observed ~2e-7 after 40): the 2-process gradient is
the float32 average of two half-batch means, the 1-process one the mean of the whole batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.errors import InputError
from saevctl.sae import SAE
from saevctl.store.reader import ShardedArray
from saevctl.train import Config, run
from saevctl.train import synthetic as syn
from saevctl.train.distributed import mine
from saevctl.train.loader import ActivationLoader

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real store of 4,096 synthetic rows, d=16 (256 fake images of 16 patches + CLS), 8 shards."""
    dic = syn.make_dictionary(16, 32, mean_active=3)
    return syn.write_store(tmp_path_factory.mktemp("dist") / "store", syn.sample(dic, 4096), images_per_shard=32)


def _args(store: Path, out: Path, **kw: object) -> list[str]:
    opts = {"store": store, "out": out, "width": "4x", "batch-size": 64, "n-tokens": 64 * 40, "device": "cpu",
            "log-every": 10, "lr": 3e-3, "k": 2, "seed": 1} | kw
    return ["train", *(x for k, v in opts.items() for x in (f"--{k}", str(v)))]


def _config(args: list[str]) -> Config:
    """The Config the CLI builds from `_args` output (for the in-process 1-process reference)."""
    it = iter(args[1:])
    kw = {k[2:].replace("-", "_"): v for k, v in zip(it, it, strict=True)}
    ints = {"batch_size", "n_tokens", "log_every", "ckpt_every", "seed", "dead_after"}
    kw = {k: int(v) if k in ints else v for k, v in kw.items()}
    if "resume" in kw:
        kw["resume"] = kw["resume"] == "True"
    for key in ("lr",):
        kw[key] = tuple(float(x) for x in str(kw[key]).split(","))
    kw["k"] = tuple(int(x) for x in str(kw["k"]).split(","))
    return Config(**kw)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SAEVCTL_DIST_TIMEOUT_S": "60"}


def _torchrun(args: list[str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORCHRUN, "-m", "saevctl", *flags, *args], env=_env(), capture_output=True, text=True,
                          timeout=120)


def _one_process(args: list[str]) -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        run(_config(args))
    finally:
        torch.set_num_threads(n)


def _assert_same_saes(a_dpath: Path, b_dpath: Path, names: list[str]) -> None:
    for name in names:
        a, b = SAE.load(a_dpath / name), SAE.load(b_dpath / name)
        for key, t in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], t, atol=ATOL, rtol=0, msg=f"{name} {key}")


def _names(out: Path) -> list[str]:
    return [r["name"] for r in json.loads(layout.train_sweep_fpath(out).read_text())["runs"]]


def test_two_processes_match_one_and_write_once(store: Path, tmp_path: Path) -> None:
    # dead-after 200 tokens: latents die within the run, so AuxK (with its global normaliser) is exercised
    args = _args(store, tmp_path / "two", activation="relu,topk,batchtopk", **{"dead-after": 200, "ckpt-every": 20})
    res = _torchrun(args, "--verbose")
    assert res.returncode == 0, res.stderr[-3000:]
    _one_process(_args(store, tmp_path / "one", activation="relu,topk,batchtopk",
                       **{"dead-after": 200, "ckpt-every": 20}))
    names = _names(tmp_path / "one")
    assert _names(tmp_path / "two") == names and len(names) == 3
    _assert_same_saes(tmp_path / "one", tmp_path / "two", names)
    # one writer: the checkpoint at step 20 is logged by the rank that wrote it, once; one metric record each
    assert res.stderr.count("checkpoint at step 20 ") == 1, res.stderr[-2000:]
    recs = [json.loads(ln) for ln in layout.train_metrics_fpath(tmp_path / "two").read_text().splitlines()]
    assert len(recs) == len({(r["step"], r["run"]) for r in recs}) == 3 * 4
    aux = [r["aux"] for r in recs if r["run"].startswith("topk")]
    assert max(aux) > 0  # AuxK was active
    assert res.stdout.count("SAEs trained") == 1  # only rank 0 prints the summary
    assert not layout.train_state_dpath(tmp_path / "two").exists()


def _kill_when(proc: subprocess.Popen[bytes], ready: object, deadline_s: float = 90) -> None:
    deadline = time.time() + deadline_s
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    # torchrun and both workers, as a crashed node would. torchrun starts each worker in its own session, so a
    # killpg of torchrun's group alone would leave the workers training on (still holding the run's write lock).
    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(_alive(pid) for pid in victims[1:]):
        time.sleep(0.01)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (whose files, and locks, the kernel has already released)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _killed_then_resumed(args: list[str], ready: object, out: Path,
                         copy_to: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([*TORCHRUN, "-m", "saevctl", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    _kill_when(proc, ready)
    assert not layout.train_sweep_fpath(out).exists(), "the run finished before it could be killed"
    if copy_to is not None:
        shutil.copytree(out, copy_to)
    return _torchrun([*args, "--resume"])


def test_sigkilled_two_process_run_resumes(store: Path, tmp_path: Path) -> None:
    out, alone = tmp_path / "killed", tmp_path / "resumed-alone"
    kw = {"activation": "relu,topk", "batch-size": 32, "n-tokens": 32 * 600, "ckpt-every": 50}
    args = _args(store, out, **kw)
    state_dpath = layout.train_state_dpath(out)
    res = _killed_then_resumed(args, lambda: state_dpath.is_dir() and any(state_dpath.glob("step-*.json")), out,
                               copy_to=alone)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed at" in res.stdout.replace("\n", " ")
    _one_process(_args(store, tmp_path / "clean", **kw))
    _assert_same_saes(tmp_path / "clean", out, _names(tmp_path / "clean"))
    # the same killed run resumed by one process: data-parallel state does not depend on the world size
    _one_process([*_args(store, alone, **kw), "--resume", "True"])
    _assert_same_saes(tmp_path / "clean", alone, _names(tmp_path / "clean"))


def test_sweep_over_ranks_matches_one_process_and_resumes(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    kw = {"activation": "relu,topk", "lr": "1e-3,3e-3", "batch-size": 32, "n-tokens": 32 * 600, "ckpt-every": 50}
    args = [*_args(store, out, **kw), "--place-sweep", "ranks"]
    parts = [layout.train_rank_state_dpath(out, r) for r in (0, 1)]
    res = _killed_then_resumed(args, lambda: all(p.is_dir() and any(p.glob("step-*.json")) for p in parts), out)
    assert res.returncode == 0, res.stderr[-3000:]
    _one_process(_args(store, tmp_path / "one", **kw))
    names = _names(tmp_path / "one")
    assert _names(out) == names and len(names) == 4
    _assert_same_saes(tmp_path / "one", out, names)
    summary = json.loads(layout.train_sweep_fpath(out).read_text())
    assert summary["place_sweep"] == "ranks" and summary["world_size"] == 2
    assert all(r["final"] for r in summary["runs"])  # every rank's metrics reached rank 0's file


def test_batch_that_does_not_split_is_one_line(store: Path, tmp_path: Path) -> None:
    # checked from the launcher's environment before any rank joins the group, so one process shows it
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    res = CliRunner().invoke(app, _args(store, tmp_path / "o", **{"batch-size": 63}), env=env)
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (
        "error: --batch-size 63 does not split over 2 processes. Use a multiple of 2 (each rank takes batch/2 "
        "rows of every step).")
    assert not (tmp_path / "o").exists()


def test_sweep_placement_needs_an_sae_per_rank() -> None:
    assert mine(list("abcde"), 1, 2) == ["b", "d"]
    with pytest.raises(InputError, match="leaving some idle"):
        mine(["a"], 0, 2)


@settings(max_examples=25, deadline=None)
@given(world=st.sampled_from([2, 3, 4]), per=st.integers(1, 5), start=st.integers(0, 30), seed=st.integers(0, 3),
       buffer=st.integers(1, 60))
def test_rank_slices_concatenate_to_the_one_process_batch(world: int, per: int, start: int, seed: int,
                                                          buffer: int) -> None:
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((n, 3, 2)).astype(np.float32) for n in (7, 5, 6)]
    arrays = {"patches": ShardedArray(parts, "float32"), "cls": ShardedArray([p[:, 0] for p in parts], "float32")}
    def make(rank: int, n: int) -> ActivationLoader:
        return ActivationLoader(arrays, world * per, buffer, seed, block_rows=4, rank=rank, world_size=n)

    whole = make(0, 1).batches(start)
    slices = [make(r, world).batches(start) for r in range(world)]
    for _ in range(12):
        assert torch.equal(next(whole), torch.cat([next(s) for s in slices]))


def test_releasing_pages_changes_no_batch(store: Path) -> None:
    """Unmapping and evicting what was read (the larger-than-RAM path) reads back the same rows, across epochs."""
    from saevctl.store import open_store

    arrays = {"patches": open_store(store).layer(0).patches}
    assert hasattr(arrays["patches"].parts[0], "_mmap")  # a real memory map, so the release path runs
    plain = ActivationLoader(arrays, 96, buffer_rows=512, seed=2).batches()
    dropping = ActivationLoader(arrays, 96, buffer_rows=512, seed=2, drop_cache=True).batches()
    for _ in range(2 * 4096 // 96 + 3):  # past the end of the first epoch
        assert torch.equal(next(plain), next(dropping))
