"""Errors a user can cause. Each carries a one-line message and a hint naming the fix.

The root CLI turns any `SaevctlError` into one stderr line and exit code 2; library code only raises.
"""

from __future__ import annotations


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
