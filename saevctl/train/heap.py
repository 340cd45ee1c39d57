"""Keep the training step's big buffers in the heap between steps (glibc only; elsewhere a no-op).

Each step allocates and frees tensors of latents x d (the two weight gradients in float32, the bfloat16 weight cast) and
(batch, latents) (the pre-activations): 75 MB each at 24,576 latents. glibc serves blocks above 32 MB (its largest
mmap threshold) with a fresh mmap and unmaps them on free, so every step page-faults each of them in again: on the
CPU that was a fifth of a bfloat16 TopK step at batch 1,024 (torch profiler: 750 -> 602 ms of self time, the
zero-fills of the two gradients 97 -> 48 ms). Inside `kept()` large blocks come from the heap and stay there, so
later steps reuse those pages; on leaving, glibc's defaults come back and the heap is trimmed.

Not from the first step: torch's 64-byte-aligned allocation asks 96 bytes more than a freed block of the same
size holds, so freed blocks serve again once neighbours have coalesced (tests/test_train_heap.py: after 4 or 5
rounds of a two-buffer pattern, no faults). The price is resident memory: at 24,576 latents a bf16 TopK step
holds ~360 MB more (1.37 against 1.0 GB over 40 steps, stable). Threads on a secondary glibc arena still mmap
big blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def kept(enabled: bool = True) -> Iterator[bool]:
    """Large allocations from the heap, never given back while inside; yields whether that took effect."""
    libc = _libc() if enabled else None
    if libc is None:
        yield False
        return
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield ok
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        libc.malloc_trim(0)
