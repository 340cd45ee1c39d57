"""Artifact readers stay torch-free: the report, the index and the store reader import neither torch nor the ViT
package (checked in a fresh interpreter, since this test process has loaded both), and stage packages export
their public names lazily."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TORCH_FREE = (
    "saevctl.report", "saevctl.report.pipeline", "saevctl.report.data", "saevctl.report.pages",
    "saevctl.report.pictures", "saevctl.report.site", "saevctl.mine.index", "saevctl.mine.schema",
    "saevctl.mine.figures", "saevctl.store", "saevctl.store.reader", "saevctl.store.format", "saevctl.data.preprocess",
    "saevctl.data.masks", "saevctl.lazy",
)
HEAVY = ("torch", "saevctl.vit")


def loaded_after(code: str) -> list[str]:
    """The heavy modules (HEAVY, or a submodule) in sys.modules after running `code` in a fresh interpreter."""
    probe = code + (f"\nimport json, sys\nheavy = {HEAVY!r}\n"
                    "loaded = [m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)]\n"
                    "print(json.dumps(sorted(loaded)))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def test_artifact_readers_import_no_torch() -> None:
    assert loaded_after("\n".join(f"import {m}" for m in TORCH_FREE)) == []
    # The public names the report uses resolve without torch too.
    assert loaded_after("from saevctl.mine import Index\nfrom saevctl.report import Config, count_pages, run") == []


STAGES = ("eval", "extract", "mine", "probe", "report", "sae", "train")


def test_stage_packages_import_nothing_heavy() -> None:
    assert loaded_after("\n".join(f"import saevctl.{pkg}" for pkg in STAGES)) == []


@pytest.mark.parametrize("pkg", STAGES)
def test_stage_packages_export_lazily(pkg: str) -> None:
    import importlib

    mod = importlib.import_module(f"saevctl.{pkg}")
    assert mod.__all__, pkg
    for name in mod.__all__:
        assert getattr(mod, name) is not None, (pkg, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mod.nope  # noqa: B018 - the attribute access is the test
