"""Atomic writes: every artifact file is written to a temporary name, flushed, then renamed.

A crash leaves either the old file or the new one, never half of one; ENOSPC becomes a clear OutputError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saevctl.errors import OutputError


def _no_space(path: Path) -> OutputError:
    return OutputError(
        f"no space left on the device while writing {path}",
        "free some disk space or choose another --out, then run the same command again to resume",
    )


@contextlib.contextmanager
def translate_os_errors(path: Path) -> Iterator[None]:
    """Turn 'disk full' and 'read-only' OS errors into one-line user errors."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(path) from e
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OutputError(f"cannot write {path} ({e.strerror})", "choose a writable output folder") from e
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process exists, so temp files of a killed writer (named by its pid) can be cleaned."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(dpath: Path) -> None:
    fd = os.open(dpath, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(fpath: Path, data: bytes) -> None:
    """Write `data` to `fpath` atomically."""
    tmp = fpath.with_name(f".{fpath.name}.tmp{os.getpid()}")
    with translate_os_errors(fpath):
        fpath.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, fpath)
        finally:
            if tmp.exists():
                tmp.unlink()


def write_text(fpath: Path, text: str) -> None:
    write_bytes(fpath, text.encode())


def write_json(fpath: Path, obj: Any) -> None:
    write_text(fpath, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staged_dir(final_dpath: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `final_dpath` in one step."""
    tmp = final_dpath.with_name(f".{final_dpath.name}.tmp")
    with translate_os_errors(final_dpath):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            for child in tmp.iterdir():
                if child.is_file():
                    with open(child, "rb") as f:
                        os.fsync(f.fileno())
            os.replace(tmp, final_dpath)
            fsync_dir(final_dpath.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(fpath: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_free_space(dpath: Path, n_bytes_needed: int) -> None:
    """Fail before starting when the output's filesystem clearly cannot hold the result."""
    probe = dpath
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < n_bytes_needed:
        raise OutputError(
            f"not enough disk space at {dpath}: needs {_fmt_bytes(n_bytes_needed)}, {_fmt_bytes(free)} free",
            "free space, choose another --out, use --max-images, or store fewer layers/token kinds",
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


fmt_bytes = _fmt_bytes
