"""`saevctl train` end to end on real stores: checkpoints with provenance, sweeps, metrics and plots, one-line
errors, NaN handling, and resume after a real SIGKILL reaching bit-identical weights."""

from __future__ import annotations

import json
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

from saevctl import layout
from saevctl.cli import app
from saevctl.errors import OutputError, TrainingError
from saevctl.sae import SAE
from saevctl.store import open_store
from saevctl.train import Config, run
from saevctl.train import synthetic as syn


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real store of 4,096 synthetic rows, d=16 (256 fake images of 16 patches + CLS)."""
    dic = syn.make_dictionary(16, 32, mean_active=3)
    return syn.write_store(tmp_path_factory.mktemp("synth") / "store", syn.sample(dic, 4096), images_per_shard=64)


def _small(store: Path, out: Path, **kw: object) -> Config:
    base = {"store": store, "out": out, "width": ("2x",), "batch_size": 64, "n_tokens": 64 * 40, "log_every": 10,
                "lr_warmup": 5, "sparsity_warmup": 10, "device": "cpu", "n_norm_sample": 2048}
    return Config(**(base | kw))


def test_run_writes_a_loadable_checkpoint_with_provenance(tiny_store: Path, tmp_path: Path) -> None:
    res = run(_small(tiny_store, tmp_path / "sae", layer=3, tokens="both", n_tokens=None, batch_size=16))
    assert len(res.runs) == 1
    sae = SAE.load(tmp_path / "sae")  # a one-SAE --out folder loads directly
    assert sae.cfg.n_latents == 64 and sae.cfg.layer == 3 and sae.cfg.tokens == ("patches", "cls")
    assert sae.cfg.model["spec"].startswith("local-dir:") and len(sae.cfg.model["weights_sha256"]) == 64
    assert sae.cfg.model["layout"]["grid_h"] == 4
    tr = sae.cfg.train
    n_rows = open_store(tiny_store).n_images * 17  # 16 patches + CLS per image
    assert tr["complete"] and tr["steps"] == res.n_steps == n_rows // 16 and "fvu" in tr["final"]
    x = torch.randn(5, 32)
    out = sae(x)
    assert out.x_hat.shape == (5, 32) and out.codes.shape == (5, 64)
    assert float(sae.act_scale) != 1.0  # normalisation statistics live in the checkpoint
    recs = [json.loads(ln) for ln in layout.train_metrics_fpath(tmp_path / "sae").read_text().splitlines()]
    assert {"mse", "fvu", "l0", "l1", "dead", "dense", "step"} <= set(recs[0])
    # One SAE: the curves only (an MSE-vs-L0 plot of one point says nothing; test_train_plots.py).
    assert all(p.is_file() and p.stat().st_size > 1000 for p in res.plots) and len(res.plots) == 1
    assert not layout.train_state_dpath(tmp_path / "sae").exists()


def test_cli_sweep_trains_every_combination(synth_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["train", "--store", str(synth_store), "--out", str(out), "--width", "2x,48", "--lr", "1e-3,3e-3",
            "--sparsity", "1e-2", "--batch-size", "64", "--n-tokens", "1280", "--device", "cpu", "--log-every", "5"]
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    summary = json.loads(layout.train_sweep_fpath(out).read_text())
    assert sorted(r["n_latents"] for r in summary["runs"]) == [32, 32, 48, 48]
    for r in summary["runs"]:
        assert SAE.load(r["path"]).cfg.train["lr"] == r["lr"]
    text = res.output.replace("\n", "")  # rich wraps long paths
    assert str(out / "plots" / "mse_vs_l0.png") in text and str(out / "plots" / "curves.png") in text
    assert "SAEs trained" in text
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already holds a training run" in again.output


def test_topk_batchtopk_and_matryoshka_run(synth_store: Path, tmp_path: Path) -> None:
    res = run(_small(synth_store, tmp_path / "o", activation=("topk", "batchtopk"), k=(4,), matryoshka=("on",),
                     prefixes=(0.25,)))
    by = {r["activation"]: r for r in res.runs}
    assert by["topk"]["matryoshka"] == [8, 32]
    sae = SAE.load(by["batchtopk"]["path"])
    assert float(sae.threshold) > 0  # an inference threshold was estimated
    codes = SAE.load(by["topk"]["path"]).encode(torch.randn(10, 16))
    assert int((codes > 0).sum(-1).max()) <= 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layer", "9"], "holds layers [0], not 9"),
        (["--width", "lots"], "bad --width 'lots'"),
        (["--activation", "gelu"], "unknown --activation 'gelu'"),
        (["--tokens", "registers"], "unknown --tokens 'registers'"),
        (["--activation", "topk", "--k", "999"], "--k 999 exceeds the width"),
    ],
)
def test_cli_user_errors_are_one_line(synth_store: Path, tmp_path: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["train", "--store", str(synth_store), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_missing_store_and_wandb(tmp_path: Path, synth_store: Path) -> None:
    res = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    try:
        import wandb  # noqa: F401 - only whether it imports matters
    except ImportError:
        res = CliRunner().invoke(app, ["train", "--store", str(synth_store), "--out", str(tmp_path / "w"), "--wandb",
                                       "--n-tokens", "4096", "--batch-size", "64", "--device", "cpu"])
        assert res.exit_code == 2 and "pip install wandb" in res.output


def test_nan_in_store_stops_with_the_step_and_keeps_last_checkpoint(synth_store: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(synth_store, bad)
    shard = np.load(layout.store_shard_dpath(bad, 3) / layout.shard_array_name(0, "patches"), mmap_mode="r+")
    shard[5, 2, :] = np.nan
    shard.flush()
    out = tmp_path / "o"
    with pytest.raises(TrainingError, match=r"activations became NaN or infinite at step \d+") as e:
        run(_small(bad, out, n_tokens=4096 * 2, ckpt_every=1))
    step = int(str(e.value.message).split("at step ")[1].split(";")[0])
    if step > 1:
        sae = SAE.load(next(p for p in out.iterdir() if p.name.startswith("relu")))
        assert sae.cfg.train["steps"] == step and all(torch.isfinite(v).all() for v in sae.state_dict().values())
    with pytest.raises(OutputError):
        run(_small(bad, out))


def _cli_args(store: Path, out: Path) -> list[str]:
    return ["train", "--store", str(store), "--out", str(out), "--width", "2x", "--activation", "relu,topk",
            "--k", "4", "--batch-size", "32", "--n-tokens", str(32 * 1500), "--ckpt-every", "100",
            "--log-every", "50", "--device", "cpu", "--seed", "3"]


def test_sigkilled_run_resumes_to_identical_weights(synth_store: Path, tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "saevctl", *_cli_args(synth_store, killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    state_dir = layout.train_state_dpath(killed)
    while not (state_dir.is_dir() and any(state_dir.glob("step-*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not layout.train_sweep_fpath(killed).exists(), "the run finished before it could be killed"
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same GEMM summation order as the subprocess, for bitwise equality
    try:
        res = CliRunner().invoke(app, [*_cli_args(synth_store, killed), "--resume"])
        assert res.exit_code == 0, res.output
        assert "resumed at" in res.output.replace("\n", " ")
        assert CliRunner().invoke(app, _cli_args(synth_store, clean)).exit_code == 0
    finally:
        torch.set_num_threads(n_threads)
    for name in ("relu-w32-lr0.0003-l1-0.0008", "topk-w32-lr0.0003-k4"):
        a, b = SAE.load(killed / name), SAE.load(clean / name)
        for key, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[key]), (name, key)
    def metrics_lines(p: Path) -> list[str]:
        return (p / "metrics.jsonl").read_text().splitlines()

    assert metrics_lines(killed) == metrics_lines(clean)
    again = CliRunner().invoke(app, [*_cli_args(synth_store, killed), "--resume"])
    assert again.exit_code == 0  # a finished run resumes to itself


def test_resume_with_other_settings_is_refused(synth_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    run(_small(synth_store, out))
    with pytest.raises(TrainingError, match="other settings"):
        run(_small(synth_store, out, lr=(1e-2,), resume=True))


def test_toml_sweep_file(synth_store: Path, tmp_path: Path) -> None:
    toml = tmp_path / "sweep.toml"
    toml.write_text(f"""store = "{synth_store}"
out = "{tmp_path / 'o'}"
activation = ["topk"]
k = [2, 4]
lr = [1e-3]
width = ["3x"]
batch_size = 64
n_tokens = 640
device = "cpu"
""")
    res = CliRunner().invoke(app, ["train", "--config", str(toml), "--seed", "1"])
    assert res.exit_code == 0, res.output
    runs = json.loads(layout.train_sweep_fpath(tmp_path / "o").read_text())["runs"]
    assert sorted(r["k"] for r in runs) == [2, 4] and {r["n_latents"] for r in runs} == {48}
    assert runs[0]["final"]["l0"] <= 4
    bad = tmp_path / "bad.toml"
    bad.write_text('learning_rate = 3\n')
    res = CliRunner().invoke(app, ["train", "--config", str(bad)])
    assert res.exit_code == 2 and "unknown config keys ['learning_rate']" in res.output
