"""One writer per artifact: an exclusive OS lock (flock) on `<artifact>.lock` beside the store, index, training
run, head, report or eval output, held while a command writes it. Readers never lock.

The kernel drops the lock when its process dies (even by SIGKILL), so no stale lock survives a crash; the pid and
command line written into the file only name the holder in the error that a second writer gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from saevctl.errors import LockedError

_HELD: dict[str, tuple[int, int]] = {}
"""Locks this process holds: lock file (real path) -> (descriptor, depth). Re-entrant, because flock treats a
second descriptor of the same process as another owner (eval all holds its folder while each evaluation runs)."""
_READ_WAIT_S = 1.0
"""How long a refused writer waits for a holder that has just locked to write its pid and command."""


def lock_fpath(target: Path) -> Path:
    """The lock file of an artifact: beside it (never inside, so a folder that holds other files stays untouched)."""
    full = Path(os.path.abspath(target))  # `--out .` names the folder it is
    return full.with_name(full.name + ".lock") if full.name else full / ".lock"


def this_command() -> str:
    """This process's command line, as the error of a refused writer shows it."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("saevctl", "__main__.py"):
        argv[0] = "saevctl"
    text = " ".join(argv)
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def exclusive(target: Path, what: str, flag: str = "--out", *, make_parent: bool = True) -> Iterator[None]:
    """Hold the write lock of `target` (a file or folder, which need not exist yet) for the block.

    `what` names the artifact in the error ("the store"); `flag` is the option that picks another one;
    `make_parent` creates the folder that will hold `target` (writers of existing artifacts pass False). Another
    process holding it is one LockedError line naming its pid and command; an OSError creating the lock (read-only,
    no space, no such place) is re-raised naming `target`, for the root CLI's one line."""
    key = os.path.realpath(lock_fpath(Path(target)))
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
    else:
        _HELD[key] = (_acquire(Path(key), Path(target), what, flag, make_parent), 1)
    try:
        yield
    finally:
        fd, depth = _HELD.pop(key)
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
        else:
            with contextlib.suppress(OSError):
                os.unlink(key)  # while still locked: whoever opens the path next makes and locks a new file
            os.close(fd)


def _acquire(fpath: Path, target: Path, what: str, flag: str, make_parent: bool) -> int:
    try:
        if make_parent:
            fpath.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(fpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _locked(fpath, target, what, flag) from None
            if _same_file(fd, fpath):
                break
            os.close(fd)  # the last holder unlinked the file between our open and our lock: lock the new one
        info = json.dumps({"pid": os.getpid(), "command": this_command()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(target)) from e
    return fd


def _same_file(fd: int, fpath: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(fpath)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fpath: Path) -> tuple[int | None, str]:
    """(pid, command) the holder wrote, waiting a moment for one that has only just taken the lock."""
    deadline = time.monotonic() + _READ_WAIT_S
    while True:
        try:
            info = json.loads(fpath.read_bytes() or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and isinstance(info.get("pid"), int):
            return info["pid"], str(info.get("command") or "?")
        if time.monotonic() > deadline:
            return None, "?"
        time.sleep(0.05)


def _locked(fpath: Path, target: Path, what: str, flag: str) -> LockedError:
    pid, command = _holder(fpath)
    who = f"pid {pid}: {command}" if pid is not None else f"its pid is not recorded in {fpath}"
    shown = str(target) if target.is_absolute() or str(target).startswith(".") else f"./{target}"
    return LockedError(
        f"{what} {shown} is being written by another saevctl process ({who})",
        f"wait for it to finish (or stop it), or pass another {flag}",
    )
