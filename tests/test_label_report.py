"""Labels in the HTML report: the feature table gains concept and AUROC columns that sort and filter in real
headless Chromium, feature pages name the concept, and an unlabelled SAE's table has neither column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from saevctl import layout
from saevctl.mine import Index
from saevctl.mine.label import Config as LabelConfig
from saevctl.mine.label import run as label
from saevctl.report import Config as ReportConfig
from saevctl.report import run as report

from test_label import _copy_index, env  # noqa: F401  (shared fixture)
from test_report_browser import CHROMIUM, Chromium


@pytest.fixture(scope="module")
def site(env: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("label-report")
    index = _copy_index(env, root)
    unlabelled = report(ReportConfig(index=index, out=root / "plain", workers=1))
    label(LabelConfig(sae=env["sae_dpath"], index=index, device="cpu"))
    labelled = report(ReportConfig(index=index, out=root / "site", workers=1))
    return {
        "index": index,
        "out": root / "site",
        "plain": root / "plain",
        "result": labelled,
        "plain_result": unlabelled,
    }


def _table_json(index_html: Path) -> dict[str, Any]:
    text = index_html.read_text()
    tag = '<script type="application/json" class="feature-data">'
    start = text.index(tag) + len(tag)
    return json.loads(text[start : text.index("</script>", start)])


def test_report_carries_concepts_only_when_labelled(site: dict, env: dict) -> None:
    plain = _table_json(layout.report_index_fpath(site["plain"]))
    assert plain["labelled"] is False and "concept (" not in layout.report_index_fpath(site["plain"]).read_text()
    got = _table_json(layout.report_index_fpath(site["out"]))
    assert got["labelled"] is True
    col = {c: i for i, c in enumerate(got["cols"])}
    with Index.open(site["index"]) as idx:
        want = {r["feature"]: r for r in idx.feature_labels(env["sae_id"], "patch")}
    assert got["rows"]
    for row in got["rows"]:
        r = want[row[col["feature"]]]
        assert row[col["concept"]] == r["class_name"] and row[col["auroc"]] == pytest.approx(r["auroc"])
    dpath = layout.report_sae_dpath(site["out"], site["result"].saes[0]["dname"])
    f = got["rows"][0][col["feature"]]
    page = (dpath / layout.report_feature_name(f)).read_text()
    assert f"patch level: <b class=\"concept\">{want[f]['class_name']}</b>" in page and "image level:" in page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
def test_concept_column_sorts_and_filters_in_chromium(site: dict, env: dict, tmp_path: Path) -> None:
    b = Chromium(tmp_path / "profile")
    try:
        s = b.open(layout.report_index_fpath(site["out"]).as_uri())
        with Index.open(site["index"]) as idx:
            labels = {r["feature"]: r for r in idx.feature_labels(env["sae_id"], "patch")}
        # The first SAE section is the labelled one (the index's second SAE is not labelled: no such columns).
        sec = "document.querySelector('section.sae')"
        assert b.eval(s, "document.querySelectorAll('section.sae th[data-key=auroc]').length") == 1
        rows_js = f"[...{sec}.querySelectorAll('table.features tbody tr')].map(r => +r.dataset.feature)"
        shown = set(b.eval(s, rows_js))
        b.eval(s, f"{sec}.querySelector('th[data-key=auroc]').click()")
        order = b.eval(s, rows_js)
        assert [labels[f]["auroc"] for f in order] == sorted((labels[f]["auroc"] for f in order), reverse=True)

        def filter_to(text: str) -> list[int]:
            b.eval(s, f"(() => {{ const i = {sec}.querySelector('input.filter'); i.value = {json.dumps(text)};"
                      " i.dispatchEvent(new Event('input')); })()")
            return sorted(b.eval(s, rows_js))

        assert filter_to("grass") == sorted(f for f in shown if labels[f]["class_name"] == "grass")
        cut = sorted(labels[f]["auroc"] for f in shown)[len(shown) // 2]
        assert filter_to(f"auroc>{cut!r}") == sorted(f for f in shown if labels[f]["auroc"] > cut)
        assert b.problems(s) == []
    finally:
        b.close()
