"""The whole path through the CLI on a tiny real ViT and real image files: extract, train, mine,
features, eval, report, probe; each stage reads only what the previous one wrote."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from saevctl.cli import app


def _ok(runner: CliRunner, args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, f"{args}: {res.output}"
    return res.output


def test_extract_train_mine_report_probe(tiny_vit: str, image_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    store, sae_out, index = tmp_path / "store", tmp_path / "sae", tmp_path / "index.duckdb"
    _ok(runner, ["extract", "--model", tiny_vit, "--images", str(image_dir), "--layers", "2",
                 "--out", str(store), "--device", "cpu", "--batch-size", "4"])
    _ok(runner, ["train", "--store", str(store), "--layer", "2", "--activation", "topk", "--k", "4",
                 "--width", "4x", "--batch-size", "64", "--n-tokens", "2048", "--out", str(sae_out), "--device", "cpu"])
    sweep = json.loads((sae_out / "sweep.json").read_text())
    assert sweep["runs"], sweep
    _ok(runner, ["mine", "--sae", str(sae_out), "--store", str(store), "--index", str(index), "--top-k", "5"])

    # Workspace defaults: no --index/--sae from here on.
    listing = _ok(runner, ["features", "list", "--sort", "freq", "--limit", "3"])
    feature = int(
        next(
            line.split()[1]
            for line in listing.splitlines()
            if line.strip().startswith("│") and line.split()[1].isdigit()
        )
    )
    top = _ok(runner, ["features", "top", "--id", str(feature)])
    png = Path(next(line for line in top.splitlines() if line.startswith("grid: ")).removeprefix("grid: "))
    assert png.is_file() and png.stat().st_size > 1000

    card = _ok(runner, ["eval", "all", "--images", str(image_dir), "--head", "timm", "--n-boot", "50"])
    assert "recovered" in card
    _ok(runner, ["report", "--out", str(tmp_path / "report")])
    assert "report card</a>" in (tmp_path / "report" / "index.html").read_text()

    image = next(p for p in sorted(image_dir.rglob("*.png")))
    out_png = tmp_path / "probe.png"
    probe = _ok(runner, ["probe", "--image", str(image), "--head", "timm", "--clamp", f"{feature}=2x",
                         "--patches", "all", "--out", str(out_png)])
    assert out_png.is_file() and "class" in probe.lower()

    # Batch mode runs the same edit over the folder next to both controls.
    batch = _ok(runner, ["probe", "--images", str(image_dir), "--head", "timm", "--clamp", f"{feature}=2x",
                         "--n-boot", "50", "--out", str(tmp_path / "batch.png")])
    assert "random feature" in batch.lower() and "random direction" in batch.lower(), batch
