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


STAGES = ("edit", "eval", "extract", "mine", "probe", "report", "sae", "serve", "train")


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


# --- stages meet only through artifacts and public surfaces -------------------------------------------------

PIPELINE = ("extract", "train", "mine", "report", "probe", "eval", "serve")
SHARED = ("data", "edit", "sae", "store", "vit")
"""Packages every stage may build on; they import no stage either, beyond the public surfaces below."""
PUBLIC = {
    "saevctl.mine.Index": "the index's public reader, as the mine package exports it",
    "saevctl.mine.index.Index": "the index's public reader: the one way into a mined index",
    "saevctl.mine.schema.STAT_COLUMNS": "the index format's per-feature statistic columns (docs/disk-layout.md)",
    "saevctl.mine.schema.hist_edges": "the index format's histogram bins (docs/disk-layout.md)",
    "saevctl.mine.vectors": "the reader of the index's decoder-direction and faiss sidecar files",
    "saevctl.mine.figures.TILE_PX": "report draws exemplar tiles with mine's renderer, so browser and CLI grids match",
    "saevctl.mine.figures.open_model_view": "report draws exemplar tiles with mine's renderer (the model's view)",
    "saevctl.mine.figures.heat_tile": "report draws exemplar tiles with mine's renderer (the heat overlay)",
    "saevctl.mine.figures.compose": "report draws exemplar sheets with mine's renderer (tiles, captions, colour bar)",
    "saevctl.mine.figures.caption": "report captions tiles as mine's grids do (rank, value, image id)",
    "saevctl.mine.figures.label_tile": "report writes the image id on its thumbnails with mine's tile labeller",
    "saevctl.train.Config": "eval trains the random-decoder null baseline with train's own loop and settings",
    "saevctl.train.run": "eval trains the random-decoder null baseline with train's own loop and settings",
    "saevctl.mine.Config": "eval mines each null baseline with mine's own code, so its label coverage is the SAE's",
    "saevctl.mine.run": "eval mines each null baseline with mine's own code, so its label coverage is the SAE's",
    "saevctl.mine.config.LabelConfig": "eval labels each null baseline with features label's own settings",
    "saevctl.mine.label.run": "eval labels each null baseline with features label's own code",
    "saevctl.mine.pipeline.recorded_compute": "eval mines each null baseline in the precision the SAE's index "
                                              "records (mine --compute), read as mine and features label read it",
    "saevctl.mine.figures.shared_vmax": "serve draws exemplar strips on the colour scale mine's grids use",
    "saevctl.mine.figures.LUT": "serve draws an edit's saliency maps on mine's heat scale",
    "saevctl.mine.query": "serve answers its views with the features commands' own queries (the Figure-2 sum, "
                          "faiss neighbours, cross-SAE matches), so the app and `features search/show/match` agree",
    "saevctl.mine.queries.sae_in_index": "serve finds its SAE in the index the way every features command does",
    "saevctl.probe.Config": "serve's edit view runs `saevctl probe`'s own run, with the CLI's Config",
    "saevctl.probe.run": "serve's edit view runs `saevctl probe`'s own run, so its numbers are the CLI's",
    "saevctl.probe.BatchConfig": "serve's controls button runs the probe's batch mode, with its Config",
    "saevctl.probe.run_batch": "serve's controls button runs the probe's batch mode (controls and bootstrap CIs)",
}
"""Names one stage (or shared package) may import from another stage, each with why it is a public surface."""


def _package_imports(pkg: str) -> list[tuple[str, str]]:
    """(file, dotted name) for every import in saevctl/<pkg>/*.py, inside functions and TYPE_CHECKING too."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "saevctl" / pkg
    out = []
    for fpath in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(fpath.read_text(), str(fpath))):
            if isinstance(node, ast.Import):
                out += [(fpath.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against saevctl.<pkg>
                    parent = ["saevctl", pkg][: max(0, 3 - node.level)]
                    base = ".".join([*parent, *([base] if base else [])])
                out += [(fpath.name, f"{base}.{a.name}") for a in node.names]
    return out


def _stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "saevctl" and parts[1] in PIPELINE else None


def test_stages_import_each_other_only_through_public_surfaces() -> None:
    bad, used = [], set()
    for pkg in PIPELINE + SHARED:
        for fname, name in _package_imports(pkg):
            other = _stage_of(name)
            if other is None or other == pkg:
                continue
            if name in PUBLIC:
                used.add(name)
            else:
                bad.append(f"saevctl/{pkg}/{fname} imports {name}")
    assert not bad, "stages meet only through artifacts and public surfaces (move shared code beside sae/, vit/, " \
                    "edit/, or add a public surface to PUBLIC with its reason):\n" + "\n".join(bad)
    assert set(PUBLIC) <= used, f"PUBLIC lists names no stage imports any more: {sorted(set(PUBLIC) - used)}"


def test_configs_build_without_torch() -> None:
    # EditOpts checks --value with the clamp parser when a Config is built; that parser must stay torch-free.
    assert loaded_after("from pathlib import Path\nfrom saevctl.eval.config import AllConfig, EditsConfig\n"
                        "EditsConfig(images='x', masks=Path('m'), sae='s', value='-2x')\n"
                        "AllConfig(sae='s', value='3')") == []
