"""Up-front checks of the mine, label and features Configs: bad numbers are one line before any work, and a
--top-k whose exemplar buffers cannot fit in memory is refused before the scan."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saevctl.cli import app
from saevctl.errors import InputError
from saevctl.mine import Config, run
from saevctl.mine import config as mine_config
from saevctl.mine.config import LabelConfig, check_exemplar_memory, exemplar_bytes
from saevctl.mine.queries import ListQuery, MatchQuery, SearchQuery, ShowQuery, SimilarQuery, SqlQuery, TopQuery
from saevctl.mine.scan import FeatureScanner

from test_mine import make_sae

runner = CliRunner()


@pytest.mark.parametrize(("make", "text"), [
    (lambda: Config(top_k=0), "--top-k 0 is out of range"),
    (lambda: Config(top_k=40_000), "--top-k must be <= 32767"),
    (lambda: Config(top_n=0), "--top-n 0 is out of range"),
    (lambda: Config(chunk_images=0), "--chunk-images 0 is out of range"),
    (lambda: Config(by="median"), "unknown --by 'median'"),
    (lambda: TopQuery(id=1, k=0), "--k 0 is out of range"),
    (lambda: TopQuery(id=-1), "--id -1 is out of range"),
    (lambda: ShowQuery(id=1, n_similar=-1), "--similar -1 is out of range"),
    (lambda: SimilarQuery(id=1, n=0), "--n 0 is out of range"),
    (lambda: ListQuery(limit=0), "--limit 0 is out of range"),
    (lambda: MatchQuery(id=1, to="b", n=0), "--n 0 is out of range"),
    (lambda: SearchQuery(image=Path("x.png"), n=0), "--n 0 is out of range"),
    (lambda: SqlQuery(query="SELECT 1", max_rows=0), "--max-rows 0 is out of range"),
    (lambda: LabelConfig(n_bins=1), "--bins 1 is out of range"),
    (lambda: LabelConfig(batch_size=0), "--batch-size 0 is out of range"),
    (lambda: LabelConfig(max_memory_mb=float("nan")), "--max-memory-mb nan is not a finite number"),
    (lambda: LabelConfig(thresholds=(0.0, 1.5)), "bad thresholds"),
])
def test_bad_numbers_are_refused_on_construction(make: Callable[[], object], text: str) -> None:
    with pytest.raises(InputError) as e:
        make()
    assert text in e.value.one_line()


def test_label_config_takes_a_path_for_the_sae() -> None:
    assert LabelConfig(sae=Path("ckpt/sae")).sae == str(Path("ckpt/sae"))


def test_cli_bad_numbers_are_one_line() -> None:
    for args, text in ((["mine", "--top-k", "0"], "--top-k 0 is out of range"),
                       (["features", "top", "--id", "3", "--k", "0"], "--k 0 is out of range"),
                       (["features", "list", "--limit", "0"], "--limit 0 is out of range"),
                       (["sql", "SELECT 1", "--max-rows", "0"], "--max-rows 0 is out of range")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr


def test_exemplar_estimate_covers_what_the_scanner_allocates() -> None:
    s, k, p = 40, 7, 16
    got = 0
    for kind in ("patches", "cls"):
        sc = FeatureScanner(s, k, p, "max", 4, keep_patches=kind == "patches")
        tensors = [sc.topk.vals_ks, sc.topk.ids_ks, *([sc.topk.patches_skp] if sc.topk.patches_skp is not None else [])]
        got += sum(t.numel() * t.element_size() for t in tensors)
    assert got <= exemplar_bytes(k, s, p, ("patches", "cls")) <= 2 * got


def test_exemplar_memory_check_names_a_lower_top_k() -> None:
    check_exemplar_memory(25, 16_384, 256, ("patches",), available=1 << 30)  # ~0.2 GiB: fits
    with pytest.raises(InputError) as e:
        check_exemplar_memory(30_000, 65_536, 1024, ("patches", "cls"), available=64 << 30)
    line = e.value.one_line()
    assert "--top-k 30000 needs about" in line and "a lower --top-k (at most about" in line
    fits = int(line.rsplit("at most about ", 1)[1].split(")")[0].replace(",", ""))
    assert 1 <= fits < 30_000 and exemplar_bytes(fits, 65_536, 1024, ("patches", "cls")) <= 64 << 30


def test_mine_refuses_a_top_k_too_big_for_memory_before_the_scan(tiny_store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    make_sae(tiny_store, tmp_path / "sae").save(tmp_path / "sae")
    monkeypatch.setattr(mine_config, "physical_memory", lambda: 1 << 16)
    r = runner.invoke(app, ["mine", "--sae", str(tmp_path / "sae"), "--store", str(tiny_store), "--top-k", "1000",
                            "--device", "cpu"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "a lower --top-k (at most about" in r.stderr, r.output
    assert not Path("index.duckdb").exists()


def test_run_reports_the_image_total_before_the_scan(tiny_store: Path, tmp_path: Path) -> None:
    make_sae(tiny_store, tmp_path / "sae").save(tmp_path / "sae")
    totals: list[int] = []
    seen: list[int] = []
    res = run(Config(sae=tmp_path / "sae", store=tiny_store, index=tmp_path / "ix.duckdb", top_k=2, device="cpu",
                     set_defaults=False),
              progress=lambda n: seen.append(n) if totals else pytest.fail("progress before the total"),
              on_total=totals.append)
    assert totals == [res.n_images] and sum(seen) == res.n_images
