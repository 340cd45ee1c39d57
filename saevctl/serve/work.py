"""One queue for everything that runs the ViT: one job at a time, so two users (or two tabs) cannot hold two
forward passes in memory at once, and at most `depth` waiting, so a flood of requests is refused, not stacked up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread

from saevctl.errors import SaevctlError

T = TypeVar("T")


class Busy(SaevctlError):
    """More ViT requests are waiting than the server queues (answered 503)."""


class ViTQueue:
    """Runs blocking ViT jobs in a worker thread, one at a time, in arrival order."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.pending = 0
        """Jobs waiting or running."""
        self._lock: asyncio.Lock | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        if self._lock is None:  # made inside the server's event loop
            self._lock = asyncio.Lock()
        if self.pending > self.depth:
            raise Busy(f"the server is busy: {self.pending} model runs are queued", "try again in a few seconds")
        self.pending += 1
        try:
            async with self._lock:
                # Not abandoned on cancellation: the lock is held until the ViT is really done.
                return await anyio.to_thread.run_sync(fn)
        finally:
            self.pending -= 1
