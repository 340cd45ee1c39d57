"""Errors a user can cause. Each carries a one-line message and a hint naming the fix.

The root CLI turns any `SaevctlError` into one stderr line and exit code 2; library code only raises.
"""

from __future__ import annotations

import errno
import os


class SaevctlError(Exception):
    """Base class for problems a user can cause and fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        msg = self.message.rstrip(".")
        hint = self.hint[:1].upper() + self.hint[1:] if self.hint else ""
        return f"{msg}. {hint.rstrip('.')}." if hint else f"{msg}."


class InputError(SaevctlError):
    """A path, folder or file given by the user is missing, empty or unreadable."""


class ModelError(SaevctlError):
    """An unknown model name, an unreachable hub, or weights that do not fit."""


class LayerError(SaevctlError):
    """A layer index outside the model, or a layer the artifact does not hold."""


class StoreError(SaevctlError):
    """An activation store that is missing, of another schema, or made with other settings."""


class MismatchError(SaevctlError):
    """An SAE used with a store or model it does not fit: other weights, a layer or token kind not stored, or
    another width."""


class OutputError(SaevctlError):
    """An output location that holds something else, or no room left to write."""


class CheckpointError(SaevctlError):
    """An SAE checkpoint that is missing, corrupt or of another schema."""


class TrainingError(SaevctlError):
    """Training stopped: non-finite values, out of memory, or a bad configuration."""


class IndexError_(SaevctlError):
    """A mined index that is missing, locked, corrupt, or lacks what was asked."""


class ProbeError(SaevctlError):
    """A probe that cannot run: mismatched head, bad feature id, patch outside the grid."""


class LockedError(SaevctlError):
    """An artifact (store, index, SAE run, head, report, eval output) that another process is writing."""


# errno -> (what went wrong at PATH, the fix), for OSErrors that reach the root CLI (see `from_os_error`).
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device writing {path}",
                   "free space or choose an output on a larger disk, then run the same command again to resume"),
    errno.EDQUOT: ("disk quota exceeded writing {path}",
                   "free space or choose an output on another disk, then run the same command again to resume"),
    errno.EROFS: ("{path} is on a read-only file system", "choose an output on a writable disk"),
    errno.EACCES: ("permission denied for {path}", "fix its permissions, or choose a path you can write"),
    errno.EPERM: ("operation not permitted on {path}", "fix its permissions, or choose a path you can write"),
    errno.EIO: ("input/output error at {path} (the disk or network file system failed)",
                "check the disk (dmesg), then run the same command again to resume"),
    errno.ENOTDIR: ("a part of the path {path} is a file, not a folder", "check the path"),
    errno.EISDIR: ("{path} is a folder", "pass a file path"),
    errno.ENAMETOOLONG: ("the path {path} is too long", "use a shorter path"),
    errno.EMFILE: ("too many open files at {path}", "raise the limit (ulimit -n), or use fewer --n-workers"),
    errno.ENFILE: ("too many open files at {path}", "raise the limit (ulimit -n), or use fewer --n-workers"),
}


def from_os_error(e: OSError) -> SaevctlError:
    """The one-line error for an OSError no stage turned into its own message: what failed, at which path, and the
    fix (disk full, read-only, permissions, I/O error, a path that cannot exist)."""
    raw = e.filename if e.filename is not None else e.filename2
    reason = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    problem, fix = _OS_ERRORS.get(e.errno or -1, ("{path}: " + reason[:1].lower() + reason[1:],
                                                  "check the path and the disk, then run the same command again"))
    if raw is None:  # a failed write() names no file: say what happened
        return OutputError(reason[:1].lower() + reason[1:], fix)
    path = os.fsdecode(raw)
    if e.errno == errno.ENOENT:
        if os.path.isdir(os.path.dirname(os.path.abspath(path))):  # the folder refuses new entries (/proc)
            return OutputError(f"cannot create {path} (no such file or directory)",
                               "choose a location on a normal writable disk")
        return InputError(f"{path} does not exist", "check the path")
    return OutputError(problem.replace("{path}", path), fix)
