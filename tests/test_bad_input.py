"""Bad input through the real CLI: each case runs `python -m saevctl` in a subprocess on a small real workspace
(a tiny ViT's store, a trained SAE, a mined index) and must end in exactly one stderr line "error: ..." naming the
problem, exit 2, no traceback, and every file of the workspace byte for byte as it was (none added either).

Locks, full disks, read-only folders and killed writers are tests/test_reliability.py's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saevctl import layout

# (id, arguments, text the error line must contain). Placeholders name the workspace's artifacts: {store}, {sae}
# (the checkpoint folder), {run} (train's --out), {index}, {img} (one image file), {imgs} (the image folder), {ws}.
CASES: list[tuple[str, list[str], str]] = [
    # reported: each was a traceback, a download, the wrong name or a silent success before
    ("sql-extension", ["sql", "SELECT * FROM sqlite_scan('x.db', 't')", "--index", "{index}"],
     "extensions are disabled"),
    ("sql-install", ["sql", "INSTALL sqlite", "--index", "{index}"], "refuses INSTALL or LOAD statements"),
    ("sql-max-rows", ["sql", "SELECT 1", "--max-rows", "-1", "--index", "{index}"],
     "--max-rows -1 is out of range: it must be positive"),
    ("sae-info-stray-file", ["sae", "info", "{ws}/some.pt"], "some.pt is not an SAE checkpoint"),
    ("train-lr-inf", ["train", "--store", "{store}", "--lr", "inf", "--out", "{ws}/new-sae"], "--lr inf"),
    ("train-sparsity-nan", ["train", "--store", "{store}", "--sparsity", "nan", "--out", "{ws}/new-sae"],
     "--sparsity nan"),
    ("mine-top-k-huge", ["mine", "--sae", "{sae}", "--store", "{store}", "--index", "{ws}/new.duckdb",
                         "--top-k", "1000000000"], "--top-k 1000000000 is out of range"),
    ("features-top-k-negative", ["features", "top", "--id", "0", "--k", "-5", "--index", "{index}"],
     "--k -5 is out of range"),
    # what the option parser itself refuses: one line too, naming the command's --help
    ("unknown-option", ["train", "--store", "{store}", "--nosuch"], "No such option: --nosuch"),
    ("unknown-command", ["trian"], "No such command 'trian'"),
    ("not-a-number", ["train", "--store", "{store}", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    ("missing-argument", ["sae", "info"], "Missing argument"),
    # every numeric option in range, before any work
    ("train-batch-size-zero", ["train", "--store", "{store}", "--batch-size", "0", "--out", "{ws}/new-sae"],
     "--batch-size"),
    ("train-batch-too-big", ["train", "--store", "{store}", "--batch-size", "100000000", "--width", "1000x",
                             "--out", "{ws}/new-sae", "--device", "cpu"], "--batch-size 100000000 with 1 SAE(s)"),
    ("train-seed-negative", ["train", "--store", "{store}", "--seed", "-1", "--out", "{ws}/new-sae"], "--seed -1"),
    ("train-aux-coef-negative", ["train", "--store", "{store}", "--aux-coef", "-1", "--out", "{ws}/new-sae"],
     "--aux-coef"),
    ("train-k-zero", ["train", "--store", "{store}", "--activation", "topk", "--k", "0", "--out", "{ws}/new-sae"],
     "--k"),
    ("extract-batch-size-zero", ["extract", "--model", "{vit}", "--images", "{imgs}", "--batch-size", "0",
                                 "--out", "{ws}/new-store"], "--batch-size"),
    ("extract-max-images-zero", ["extract", "--model", "{vit}", "--images", "{imgs}", "--max-images", "0",
                                 "--out", "{ws}/new-store"], "--max-images 0"),
    ("features-id-negative", ["features", "show", "--id", "-1", "--index", "{index}"], "--id -1 is out of range"),
    ("features-list-limit-zero", ["features", "list", "--limit", "0", "--index", "{index}"], "--limit 0"),
    ("features-label-threshold", ["features", "label", "--thresholds", "1.5", "--index", "{index}"], "thresholds"),
    ("probe-batch-size-zero", ["probe", "--images", "{imgs}", "--clamp", "0=0", "--batch-size", "0"], "--batch-size"),
    ("eval-min-auroc", ["eval", "all", "--min-auroc", "2", "--sae", "{sae}"], "--min-auroc 2 is out of range"),
    ("eval-recon-batch-tokens", ["eval", "recon", "--batch-tokens", "0", "--sae", "{sae}"], "--batch-tokens"),
    ("heads-val-fraction", ["heads", "train", "--task", "classify", "--images", "{imgs}", "--val-fraction", "1"],
     "--val-fraction"),
    ("report-cols-zero", ["report", "--cols", "0", "--index", "{index}", "--out", "{ws}/new-report"], "--cols 0"),
    # names that do not fit the model, the store or the SAE
    ("train-layer-not-stored", ["train", "--store", "{store}", "--layer", "1", "--out", "{ws}/new-sae",
                                "--device", "cpu"], "layer"),
    ("extract-layer-beyond-model", ["extract", "--model", "{vit}", "--images", "{imgs}", "--layers", "9",
                                    "--out", "{ws}/new-store", "--device", "cpu"], "9"),
    ("train-width-bad", ["train", "--store", "{store}", "--width", "abc", "--out", "{ws}/new-sae"], "--width"),
    ("train-width-zero", ["train", "--store", "{store}", "--width", "0x", "--out", "{ws}/new-sae"], "--width"),
    ("train-activation-unknown", ["train", "--store", "{store}", "--activation", "gelu", "--out", "{ws}/new-sae"],
     "unknown --activation 'gelu'"),
    ("features-id-beyond-width", ["features", "top", "--id", "64", "--index", "{index}"], "feature 64 is out of range"),
    ("probe-clamp-beyond-width", ["probe", "--image", "{img}", "--sae", "{sae}", "--head", "timm", "--clamp",
                                  "99999=0", "--index", "{index}", "--device", "cpu"], "99999"),
    # paths that are missing, or hold something else
    ("train-store-missing", ["train", "--store", "{ws}/no-store", "--out", "{ws}/new-sae", "--device", "cpu"],
     "no-store"),
    ("mine-sae-missing", ["mine", "--sae", "{ws}/no-sae", "--store", "{store}", "--index", "{ws}/new.duckdb",
                          "--device", "cpu"], "no-sae"),
    ("features-index-missing", ["features", "list", "--index", "{ws}/no-index.duckdb"], "no-index.duckdb"),
    ("features-index-not-duckdb", ["features", "list", "--index", "{ws}/garbage.duckdb"], "not a DuckDB file"),
    ("config-is-folder", ["train", "--config", "{ws}/configs"], "is a folder"),
    ("config-not-toml", ["train", "--config", "{ws}/configs/broken.toml"], "not valid TOML"),
    ("config-unknown-key", ["train", "--config", "{ws}/configs/unknown.toml"], "unknown config keys ['learning_rate']"),
    ("sae-zero-byte-weights", ["sae", "info", "{ws}/empty-weights"], "sae.safetensors cannot be read"),
    ("sae-corrupt-config", ["sae", "info", "{ws}/corrupt-config"], "config.json is corrupt"),
    ("store-truncated-manifest", ["train", "--store", "{ws}/truncated-store", "--out", "{ws}/new-sae",
                                  "--device", "cpu"], "manifest.json"),
]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tiny_vit: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A store of the tiny ViT's layer 2, one trained 64-latent TopK SAE, its mined index, and broken copies."""
    from saevctl.extract import Config as ExtractConfig
    from saevctl.extract import run as extract
    from saevctl.mine import Config as MineConfig
    from saevctl.mine import run as mine
    from saevctl.train import Config as TrainConfig
    from saevctl.train import run as train

    ws = tmp_path_factory.mktemp("bad-input")
    store, run, index = ws / "store", ws / "sae", ws / "index.duckdb"
    extract(ExtractConfig(model=tiny_vit, images=str(image_dir), layers=(2,), out=store, batch_size=4,
                          device="cpu"))
    trained = train(TrainConfig(store=store, activation=("topk",), k=(4,), width=("2x",), batch_size=32,
                                n_tokens=128, lr_warmup=1, out=run, device="cpu"))
    sae = Path(trained.runs[0]["path"])
    mine(MineConfig(sae=sae, store=store, index=index, top_k=3, device="cpu", set_defaults=False))
    (ws / "some.pt").write_bytes(b"not a checkpoint")
    (ws / "garbage.duckdb").write_bytes(b"not a database" * 100)
    (ws / "configs").mkdir()
    (ws / "configs" / "broken.toml").write_text("lr = [1e-3,\n")
    (ws / "configs" / "unknown.toml").write_text("learning_rate = 1e-3\n")
    shutil.copytree(sae, ws / "empty-weights")
    layout.sae_weights_fpath(ws / "empty-weights").write_bytes(b"")
    shutil.copytree(sae, ws / "corrupt-config")
    cfg = layout.sae_config_fpath(ws / "corrupt-config")
    cfg.write_bytes(cfg.read_bytes()[: cfg.stat().st_size // 2])
    shutil.copytree(store, ws / "truncated-store")
    manifest = ws / "truncated-store" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    (ws / "home").mkdir()
    img = next(p for p in sorted(image_dir.rglob("*.png")))
    return {"ws": str(ws), "store": str(store), "sae": str(sae), "run": str(run), "index": str(index),
            "img": str(img), "imgs": str(image_dir), "vit": tiny_vit}


@pytest.fixture(scope="module")
def before(workspace: dict[str, str]) -> dict[str, str]:
    """Every workspace file's hash before any case runs (each case is compared with it)."""
    return _hashes(Path(workspace["ws"]))


@pytest.mark.parametrize(("args", "expected"), [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_one_line_and_changes_nothing(workspace: dict[str, str], before: dict[str, str],
                                                   args: list[str], expected: str) -> None:
    ws = Path(workspace["ws"])
    argv = [a.format(**workspace) for a in args]
    env = {**os.environ, "SAEVCTL_HOME": str(ws / "home"), "SAEVCTL_DEBUG": "0"}
    proc = subprocess.run([sys.executable, "-m", "saevctl", *argv], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.splitlines()
    print(" ".join(args[:2]), "->", proc.stderr.strip())  # `pytest -rP` lists every case's message
    assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert _hashes(ws) == before, f"{argv} changed the workspace"


# Concurrency: another process holds an artifact's write lock (the same lock every saevctl writer takes, held by a
# real second process); the writer started now must refuse in one line naming that process, and change nothing.
HOLDER = """
import sys
from pathlib import Path
from saevctl import lock
with lock.exclusive(Path(sys.argv[1]), "the artifact"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""
BUSY: list[tuple[str, str, list[str], str]] = [
    ("extract-into-a-busy-store", "{store}",
     ["extract", "--model", "{vit}", "--images", "{imgs}", "--layers", "2", "--out", "{store}", "--batch-size", "4",
      "--device", "cpu"], "the store"),
    ("mine-into-a-busy-index", "{index}",
     ["mine", "--sae", "{sae}", "--store", "{store}", "--index", "{index}", "--top-k", "3", "--device", "cpu"],
     "the index"),
    ("train-into-a-busy-run", "{run}",
     ["train", "--store", "{store}", "--out", "{run}", "--resume", "--activation", "topk", "--k", "4", "--width", "2x",
      "--batch-size", "32", "--n-tokens", "128", "--lr-warmup", "1", "--device", "cpu"], "the training run"),
]


@pytest.mark.parametrize(("target", "args", "what"), [pytest.param(t, a, w, id=i) for i, t, a, w in BUSY])
def test_a_second_writer_is_one_line_and_changes_nothing(workspace: dict[str, str], before: dict[str, str],
                                                          target: str, args: list[str], what: str) -> None:
    ws = Path(workspace["ws"])
    env = {**os.environ, "SAEVCTL_HOME": str(ws / "home"), "SAEVCTL_DEBUG": "0"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, target.format(**workspace)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ws, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "saevctl", *(a.format(**workspace) for a in args)], cwd=ws,
                              env=env, capture_output=True, text=True, timeout=120)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    lines = proc.stderr.splitlines()
    print(" ".join(args[:1]), "->", proc.stderr.strip())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {what} "), proc.stderr
    assert f"being written by another saevctl process (pid {holder.pid}" in lines[0], lines[0]
    assert _hashes(ws) == before, f"{args[0]} changed the workspace while refused"
