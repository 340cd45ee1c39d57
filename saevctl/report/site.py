"""The report folder as one atomic unit: built in a hidden sibling, synced, then swapped in by rename, so an
interrupted report leaves either the previous site or none, never a half site that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from saevctl import atomic, layout, lock
from saevctl.errors import OutputError

log = logging.getLogger(__name__)
FORMAT = "saevctl-report"


def is_report(dpath: Path) -> bool:
    """True when `dpath` holds a complete report (its report.json is written last)."""
    try:
        meta = json.loads(layout.report_meta_fpath(dpath).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_target(out_dpath: Path) -> None:
    """Refuse to replace a folder that is neither empty nor an earlier report."""
    cwd = Path.cwd().resolve()
    if out_dpath.resolve() == cwd or out_dpath.resolve() in cwd.parents:
        raise OutputError(f"--out {out_dpath} is the working folder or holds it",
                          "pass a new folder, e.g. --out report")
    if out_dpath.is_file():
        raise OutputError(f"--out {out_dpath} is a file", "pass a folder for the report")
    if out_dpath.is_dir() and any(out_dpath.iterdir()) and not is_report(out_dpath):
        raise OutputError(
            f"--out {out_dpath} already holds files that are not a saevctl report",
            "choose a new or empty folder (a previous report there is replaced)",
        )


def remove_stale(out_dpath: Path) -> None:
    """Delete build folders left by reports that were killed (their process is gone)."""
    for prefix in (f".{out_dpath.name}.tmp", f".{out_dpath.name}.old"):
        for p in out_dpath.parent.glob(f"{prefix}*") if out_dpath.parent.is_dir() else []:
            tail = p.name[len(prefix):]
            if tail.isdigit() and int(tail) != os.getpid() and not atomic.pid_alive(int(tail)):
                log.info("removing %s left by an interrupted report", p)
                shutil.rmtree(p, ignore_errors=True)


def _swap(tmp: Path, out_dpath: Path) -> None:
    old = layout.report_old_dpath(out_dpath, os.getpid())
    if out_dpath.exists():
        # Two renames, not an rmtree first: the old site stays whole until the new one is in place.
        os.replace(out_dpath, old)
    os.replace(tmp, out_dpath)
    atomic.fsync_dir(out_dpath.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_site(out_dpath: Path) -> Iterator[Path]:
    """Yield an empty build folder; on success it replaces `out_dpath` (an earlier report or nothing). The report
    folder's write lock is held throughout: a second report into it is refused, not swapped in half-way."""
    with lock.exclusive(out_dpath, "the report", "--out"), _staged(out_dpath.absolute()) as tmp:
        yield tmp


@contextlib.contextmanager
def _staged(out_dpath: Path) -> Iterator[Path]:
    check_target(out_dpath)
    remove_stale(out_dpath)
    tmp = layout.report_tmp_dpath(out_dpath, os.getpid())
    with atomic.translate_os_errors(out_dpath):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if not is_report(tmp):
                raise AssertionError("a report folder is complete only once report.json is written")
            os.sync()  # one flush of all pages, so the rename never publishes files still in the page cache
            _swap(tmp, out_dpath)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
