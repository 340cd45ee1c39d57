"""Incremental reruns (saevctl.rerun): a stage whose inputs are unchanged says so and keeps its output byte for
byte; a changed input (options, the SAE, the index's content) runs it again, and the stages after it too."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from saevctl import rerun
from saevctl.cli import app

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, f"{args}: {res.output}"
    return res.output


def _stamps(*paths: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


def test_second_run_of_every_stage_keeps_its_output(tiny_vit: str, tiny_store: Path, image_dir: Path,
                                                     tmp_path: Path) -> None:
    sae, index, head = tmp_path / "sae", tmp_path / "index.duckdb", tmp_path / "head"
    _ok(["train", "--store", str(tiny_store), "--layer", "3", "--activation", "topk", "--k", "4", "--width", "4x",
         "--batch-size", "32", "--n-tokens", "512", "--out", str(sae), "--device", "cpu"])
    steps = [
        ["mine", "--sae", str(sae), "--store", str(tiny_store), "--index", str(index), "--top-k", "4"],
        ["heads", "train", "--task", "classify", "--model", tiny_vit, "--images", str(image_dir), "--out", str(head),
         "--epochs", "5", "--device", "cpu"],
        ["eval", "all", "--images", str(image_dir), "--head", "timm", "--n-boot", "20", "--no-vision"],
        ["eval", "recon", "--max-images", "4"],
        ["report", "--out", str(tmp_path / "report"), "--neighbours", "0"],
        ["probe", "--image", str(next(image_dir.rglob("*.png"))), "--head", "timm", "--clamp", "top=0",
         "--out", str(tmp_path / "probe.png")],
    ]
    first = [_ok(s) for s in steps]
    assert not any("unchanged" in out for out in first), first
    outputs = [index, head / "head.json", tmp_path / "report" / "index.html", tmp_path / "probe.png",
               tmp_path / "probe.json"]
    outputs += list((tmp_path / "index.duckdb.eval").rglob("*.json"))
    before = _stamps(*outputs)
    second = [_ok(s) for s in steps]
    for step, out in zip(steps, second, strict=True):
        assert "unchanged" in out, (step, out)
    assert _stamps(*outputs) == before  # nothing rewritten
    # What a kept stage prints is what it printed when it ran (the probe's tables, the card, the head's figures).
    assert first[5].split("figure:")[0].strip() in second[5]
    assert "recovered" in second[2]

    # Another option reruns mine; the index's content changed, so the eval card and the report follow.
    third = [_ok([*steps[0][:-1], "3"]), _ok(steps[2]), _ok(steps[4])]
    assert not any("unchanged" in out for out in third), third
    # --force redoes a stage whose inputs did not change.
    assert "unchanged" not in _ok([*steps[5], "--force"])


def test_a_changed_or_extra_file_in_a_kept_report_rebuilds_it(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "a.html").write_text("x")
    first = rerun.listing(site)
    (site / "stale.txt").write_text("from before")
    assert rerun.listing(site) != first
    os.remove(site / "stale.txt")
    assert rerun.listing(site) == first
    (site / "a.html").write_text("xy")
    assert rerun.listing(site) != first


def test_fingerprint_follows_the_options_that_shape_the_output() -> None:
    from saevctl.eval.config import ReconConfig

    a = rerun.config_part(ReconConfig(max_images=4, device="cpu"))
    assert a == rerun.config_part(ReconConfig(max_images=4, device="cuda", force=True))  # speed, not output
    assert a != rerun.config_part(ReconConfig(max_images=5))
    assert rerun.digest({"config": a}) != rerun.digest({"config": rerun.config_part(ReconConfig(max_images=5))})
