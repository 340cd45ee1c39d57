"""Every jaxtyping shape in saevctl's annotations uses the letters of the shape glossary (saevctl/shapes.py)."""

from __future__ import annotations

import re
from pathlib import Path

from saevctl.shapes import GLOSSARY

ROOT = Path(__file__).resolve().parents[1] / "saevctl"
ANNOTATION = re.compile(r'\b(?:Float|Int|Bool|Shaped|Num|Integer|Real|UInt)\[[\w.]+, "([^"]*)"\]')


def _dims() -> dict[str, list[str]]:
    """{dimension name: where it is used} over every jaxtyping annotation in the package."""
    found: dict[str, list[str]] = {}
    for fpath in sorted(ROOT.rglob("*.py")):
        for lineno, line in enumerate(fpath.read_text().splitlines(), 1):
            for shape in ANNOTATION.findall(line):
                for dim in shape.split():
                    found.setdefault(dim.lstrip("*#"), []).append(f"{fpath.relative_to(ROOT)}:{lineno}")
    return found


def test_annotations_use_the_glossary() -> None:
    dims = _dims()
    assert {"b", "d", "s"} <= set(dims), "the scan found no annotations: the pattern is out of date"
    unknown = {d: where[:3] for d, where in dims.items() if not d.isdigit() and d not in GLOSSARY}
    assert not unknown, f"shape letters missing from saevctl/shapes.py GLOSSARY: {unknown}"


def test_glossary_letters_are_single_and_unique() -> None:
    assert all(len(k) == 1 and k.islower() for k in GLOSSARY)
