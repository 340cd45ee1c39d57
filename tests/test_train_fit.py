"""`fit(acts, cfg)` on numpy arrays, memmaps and torch tensors: the same SAEs as `run` on a store of the same rows,
one-line errors for bad arrays, resume; and `--matryoshka off,on`, matryoshka as a sweep axis."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saevctl import layout
from saevctl.cli import app
from saevctl.errors import InputError, TrainingError
from saevctl.sae import SAE
from saevctl.train import Config, fit, run
from saevctl.train import synthetic as syn
from saevctl.train.arrays import as_rows
from saevctl.train.config import expand
from saevctl.train.loop import fingerprint, saved_settings

N_PATCHES = 16


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """4,096 synthetic rows, d=16."""
    return syn.sample(syn.make_dictionary(16, 32, mean_active=3), 4096)


def _cfg(out: Path, **kw: Any) -> Config:
    # buffer_rows 1024: blocks of 128 rows, the store's blocks of 8 images of 16 patches, so both streams match
    base = Config(out=out, width=("2x",), activation=("relu", "topk"), k=(4,), batch_size=64, n_tokens=64 * 40,
                  log_every=10, lr_warmup=5, sparsity_warmup=10, device="cpu", n_norm_sample=2048, buffer_rows=1024)
    return dataclasses.replace(base, **kw)


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return SAE.load(out / name).state_dict()


def _same_saes(a: Path, b: Path) -> None:
    names = [r["name"] for r in json.loads(layout.train_sweep_fpath(a).read_text())["runs"]]
    assert names == [r["name"] for r in json.loads(layout.train_sweep_fpath(b).read_text())["runs"]]
    for name in names:
        wa, wb = _weights(a, name), _weights(b, name)
        for key, t in wa.items():
            assert torch.equal(t, wb[key]), (name, key)


def test_fit_matches_run_on_a_store_of_the_same_rows(rows: np.ndarray, tmp_path: Path) -> None:
    store = syn.write_store(tmp_path / "store", rows, n_patches=N_PATCHES, images_per_shard=64)
    run(dataclasses.replace(_cfg(tmp_path / "store-sae"), store=store))
    np.save(tmp_path / "rows.npy", rows)
    inputs = {"numpy": rows, "torch": torch.from_numpy(rows.copy()),
              "memmap": np.load(tmp_path / "rows.npy", mmap_mode="r"),
              "writable-memmap": np.load(tmp_path / "rows.npy", mmap_mode="r+")}
    for what, acts in inputs.items():
        out = tmp_path / what
        res = fit(acts, _cfg(out, layer=3))
        assert res.n_steps == 40 and len(res.runs) == 2
        _same_saes(tmp_path / "store-sae", out)
    sae = SAE.load(tmp_path / "numpy" / res.runs[0]["name"])
    tr = sae.cfg.train
    assert (tr["source"], tr["array"]) == ("array", {"shape": [4096, 16], "dtype": "float32"}) and "store" not in tr
    assert sae.cfg.layer == 3 and sae.cfg.tokens == ("patches",) and sae.cfg.model == {}
    summary = json.loads(layout.train_sweep_fpath(tmp_path / "numpy").read_text())
    assert summary["store"] is None and summary["source"] == "array" and summary["array"]["shape"] == [4096, 16]
    assert np.array_equal(np.load(tmp_path / "rows.npy"), rows)  # the writable memmap was left as it was


def test_fit_on_bfloat16_tensor_equals_its_float32_values(rows: np.ndarray, tmp_path: Path) -> None:
    acts = torch.from_numpy(rows).to(torch.bfloat16)
    fit(acts, _cfg(tmp_path / "bf16", activation=("topk",), n_tokens=64 * 10))
    fit(acts.float(), _cfg(tmp_path / "f32", activation=("topk",), n_tokens=64 * 10))
    _same_saes(tmp_path / "bf16", tmp_path / "f32")
    tr = SAE.load(tmp_path / "bf16").cfg.train
    assert tr["array"]["dtype"] == "bfloat16" and tr["dtype"] == "float32"  # the latter: matmul precision


@pytest.mark.parametrize(
    "acts,message",
    [
        (np.zeros(16, np.float32), r"have shape \(16,\); fit needs \(n, d\)"),
        (np.zeros((2, 4, 16), np.float32), r"have shape \(2, 4, 16\)"),
        (np.zeros((0, 16), np.float32), r"have shape \(0, 16\)"),
        (np.zeros((64, 16), np.int64), "cannot train on int64 activations"),
        (np.zeros((64, 16), np.float64), "cannot train on float64 activations"),
        (torch.zeros(64, 16, dtype=torch.float64), "cannot train on float64 activations"),
        (np.where(np.arange(64)[:, None] == 37, np.nan, np.zeros((64, 16), np.float32)), "row 37 .* NaN or infinite"),
        (torch.full((64, 16), float("inf")).to(torch.bfloat16), "row 0 .* NaN or infinite"),
    ],
)
def test_bad_arrays_are_one_input_error(acts: object, message: str, tmp_path: Path) -> None:
    assert isinstance(acts, (np.ndarray, torch.Tensor))
    with pytest.raises(InputError, match=message) as e:
        fit(acts, _cfg(tmp_path / "o"))
    assert "\n" not in e.value.one_line()
    assert not (tmp_path / "o").exists()


def test_non_arrays_and_negative_layers_are_refused(rows: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="takes a numpy array, a memmap or a torch tensor, not list"):
        as_rows([[0.0] * 16] * 64)  # fit's runtime type check (in tests) would refuse it before as_rows
    with pytest.raises(InputError, match="an array has no model"):
        fit(rows, _cfg(tmp_path / "o", layer=-1))


class _Stop(Exception):
    pass


def _stop_at(step: int) -> Callable[[int, object], None]:
    """A progress callback that interrupts a fit once `step` steps have run (a crash mid-run)."""
    steps = 0

    def stop(n: int, records: object) -> None:
        nonlocal steps
        steps += n
        if steps == step:
            raise _Stop

    return stop


def test_interrupted_fit_resumes_to_identical_weights(rows: np.ndarray, tmp_path: Path) -> None:
    stop_at_25 = _stop_at(25)
    cut, clean = tmp_path / "cut", tmp_path / "clean"
    with pytest.raises(_Stop):
        fit(rows, _cfg(cut, ckpt_every=10), progress=stop_at_25)
    assert not layout.train_sweep_fpath(cut).exists()
    res = fit(rows, _cfg(cut, ckpt_every=10, resume=True))
    assert res.resumed_from == 20
    fit(rows, _cfg(clean, ckpt_every=10))
    _same_saes(cut, clean)
    assert fit(rows, _cfg(cut, ckpt_every=10, resume=True)).resumed_from == 40  # finished: returns itself
    with pytest.raises(TrainingError, match="other settings"):
        fit(rows[:2048], _cfg(cut, ckpt_every=10, resume=True))


def test_nested_off_on_trains_both_in_one_pass(rows: np.ndarray, tmp_path: Path) -> None:
    res = fit(rows, _cfg(tmp_path / "o", activation=("topk",), matryoshka=("off", "on"), prefixes=(0.25,)))
    by = {r["name"]: r for r in res.runs}
    assert list(by) == ["topk-w32-lr0.0003-k4", "topk-mat-w32-lr0.0003-k4"]
    plain, nested = (SAE.load(r["path"]).cfg for r in res.runs)
    assert plain.matryoshka == () and nested.matryoshka == (8, 32)
    assert plain.train["matryoshka"] == [] and nested.train["matryoshka"] == [8, 32]
    # one pass: both SAEs logged at every logged step of a single 40-step loop
    recs = [json.loads(ln) for ln in layout.train_metrics_fpath(tmp_path / "o").read_text().splitlines()]
    assert res.n_steps == 40 and [r["step"] for r in recs if r["run"] == "topk-w32-lr0.0003-k4"] == \
        [r["step"] for r in recs if r["run"] == "topk-mat-w32-lr0.0003-k4"] == [10, 20, 30, 40]


def test_nested_names_order_and_errors() -> None:
    cfg = Config(activation=("relu", "topk"), k=(4,), width=("2x",), matryoshka=("off", "on"), prefixes=(0.5,))
    assert [s.name for s in expand(cfg, 16)] == [
        "relu-w32-lr0.0003-l1-0.0008", "relu-mat-w32-lr0.0003-l1-0.0008",
        "topk-w32-lr0.0003-k4", "topk-mat-w32-lr0.0003-k4"]
    assert [s.matryoshka for s in expand(dataclasses.replace(cfg, matryoshka=("off",)), 16)] == [(), ()]
    with pytest.raises(InputError, match="--matryoshka on needs --prefixes"):
        Config(matryoshka=("off", "on"), prefixes=())
    with pytest.raises(InputError, match="empty sweep axis --matryoshka"):
        Config(matryoshka=())
    with pytest.raises(InputError, match="prefixes"):
        Config(prefixes=(0.0,))
    # the old spelling, prefix sizes given to --matryoshka, names the fix (from Python, TOML and the CLI alike)
    for old in ((0.25,), [0.0625, 0.25], "0.0625,0.25", 8):
        kw: dict[str, Any] = {"matryoshka": old}
        with pytest.raises(InputError, match="--matryoshka takes off, on or off,on") as e:
            Config(**kw)
        assert "--prefixes 0.0625,0.25" in e.value.one_line()
    # unused prefixes are left out of the resume fingerprint, so runs started before the axis existed still resume
    assert "prefixes" not in fingerprint(Config()) and fingerprint(cfg)["matryoshka"] == ["off", "on"]
    assert fingerprint(cfg)["prefixes"] == [0.5]


def test_run_saved_before_the_matryoshka_axis_resumes(rows: np.ndarray, tmp_path: Path) -> None:
    stop_at_25 = _stop_at(25)
    cut = tmp_path / "cut"
    cfg = _cfg(cut, activation=("topk",), ckpt_every=10, matryoshka=("off", "on"), prefixes=(0.25,))
    with pytest.raises(_Stop):
        fit(rows, cfg, progress=stop_at_25)
    # rewrite the saved settings as saevctl wrote them before: prefix sizes in `matryoshka`, the axis in `nested`
    (jpath,) = layout.train_state_dpath(cut).glob("step-*.json")
    header = json.loads(jpath.read_text())
    assert header["config"]["matryoshka"] == ["off", "on"] and header["config"]["prefixes"] == [0.25]
    del header["config"]["prefixes"]
    header["config"] |= {"matryoshka": [0.25], "nested": ["off", "on"]}
    jpath.write_text(json.dumps(header))
    with pytest.raises(TrainingError, match="other settings"):  # the old settings are still checked
        fit(rows, dataclasses.replace(cfg, resume=True, prefixes=(0.5,)))
    assert fit(rows, dataclasses.replace(cfg, resume=True)).resumed_from == 20
    # the old defaults: no prefixes (nested left out) is today's --matryoshka off, whatever --prefixes says
    now = fingerprint(Config())
    assert saved_settings(now | {"matryoshka": []}) == now
    assert saved_settings({"matryoshka": [0.25]}) == {"matryoshka": ["on"], "prefixes": [0.25]}
    assert saved_settings({"matryoshka": [0.25], "nested": ["off"]}) == {"matryoshka": ["off"]}
    assert saved_settings(fingerprint(cfg)) == fingerprint(cfg)  # today's fingerprints pass unchanged


def test_cli_nested_sweep(rows: np.ndarray, tmp_path: Path) -> None:
    store = syn.write_store(tmp_path / "store", rows[:1024], n_patches=N_PATCHES)
    out = tmp_path / "o"
    args = ["train", "--store", str(store), "--out", str(out), "--width", "2x", "--matryoshka", "off,on",
            "--prefixes", "0.25", "--batch-size", "64", "--device", "cpu"]
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    runs = json.loads(layout.train_sweep_fpath(out).read_text())["runs"]
    assert [r["matryoshka"] for r in runs] == [[], [8, 32]]
    bad = CliRunner().invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "b"),
                                   "--matryoshka", "off,on", "--prefixes", ""])
    assert bad.exit_code == 2 and "--matryoshka on needs --prefixes" in bad.output
    old = CliRunner().invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "b"),
                                   "--matryoshka", "0.0625,0.25"], terminal_width=200)
    assert old.exit_code == 2 and "Traceback" not in old.output
    assert "--matryoshka takes off, on or off,on. Give prefix sizes with --prefixes 0.0625,0.25." in old.output
