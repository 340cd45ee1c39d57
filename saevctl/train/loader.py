"""Stream shuffled activation rows from a memory-mapped store, in a background thread, resumable at any batch.

Blocks of contiguous images are read in a seeded random order, pooled into a large buffer, and shuffled there;
the stream is a pure function of (seed, batch index), so a resumed run sees exactly the batches it would have.
Under data parallelism every rank derives the same stream and reads only its own slice of each global batch.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from saevctl.store.format import from_numpy
from saevctl.store.reader import ShardedArray

log = logging.getLogger(__name__)
_PAGE = mmap.PAGESIZE
# Readahead for memory-mapped reads reaches past a block's end (read_ahead_kb, doubled for page faults:
# 16 MB on this project's machines) into the next block of the file.
_READAHEAD_SLACK = 32 << 20


@dataclass(frozen=True)
class Block:
    """Images [lo, hi) of one shard part."""

    part: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Chunk:
    """One buffer's worth of blocks, its row permutation (cut to the resume point) and the stream position of
    the permutation's first entry."""

    blocks: list[Block]
    perm: np.ndarray
    start: int


def _release(part: np.ndarray, lo: int, hi: int, drop_cache: bool = False, next_read: bool = False) -> None:
    """Unmap the pages of rows [lo, hi) of a memory-mapped part from this process once they are copied out, so
    resident memory stays at the buffer's size however large the store is; a later read faults them back in.
    `drop_cache` also evicts them from the page cache: a block is not read again until the next epoch, and a
    store larger than memory would otherwise push out everything else cached on the machine. `next_read`: the
    rows after `hi` were already read this epoch, so the readahead pages past the block go too (otherwise they
    are kept for the read that will use them)."""
    mm = getattr(part, "_mmap", None)
    if not isinstance(part, np.memmap) or mm is None or hi <= lo:
        return
    row_bytes = part.strides[0]
    start = int(part.offset) + lo * row_bytes
    aligned = start - start % _PAGE
    length = min(int(part.offset) + hi * row_bytes, len(mm)) - aligned
    try:  # not every platform has madvise / posix_fadvise; both are only optimisations
        mm.madvise(mmap.MADV_DONTNEED, aligned, length)
        if drop_cache and part.filename and hasattr(os, "posix_fadvise"):
            fd = os.open(part.filename, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, aligned, length + (_READAHEAD_SLACK if next_read else 0), os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except (OSError, ValueError, AttributeError, TypeError):
        pass


def store_exceeds_memory(arrays: dict[str, ShardedArray], fraction: float = 0.5) -> bool:
    """True when the arrays take more than `fraction` of physical memory (the page cache cannot keep them)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return sum(a.nbytes for a in arrays.values()) > fraction * ram


class ActivationLoader:
    """Batches of (batch_size / world_size, d) float32 rows from the given token arrays of one layer: with
    world_size W, rank r gets rows [r B/W, (r+1) B/W) of every global batch of B rows."""

    def __init__(
        self,
        arrays: dict[str, ShardedArray],
        batch_size: int,
        buffer_rows: int = 131072,
        seed: int = 0,
        block_rows: int = 16384,
        rank: int = 0,
        world_size: int = 1,
        drop_cache: bool = False,
    ) -> None:
        assert arrays, "the loader needs at least one token kind"
        assert 0 <= rank < world_size and batch_size % world_size == 0, (rank, world_size, batch_size)
        self.arrays = arrays
        first = next(iter(arrays.values()))
        self.dtype = first.dtype
        self.d = int(first.shape[-1])
        self.n_images = len(first)
        # rows one image contributes: p for patches, 1 for cls
        self.kind_rows = [int(np.prod(a.shape[1:-1], dtype=np.int64)) for a in arrays.values()]
        self.rows_per_image = sum(self.kind_rows)
        self.n_rows = self.n_images * self.rows_per_image
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.buffer_rows = max(buffer_rows, batch_size)
        self.seed = seed
        self.drop_cache = drop_cache
        self._released: set[tuple[int, int]] = set()  # blocks read in this pass, to evict readahead after them
        per_block = max(1, min(block_rows, self.buffer_rows // 8) // self.rows_per_image)
        self.blocks = [
            Block(p, lo, min(lo + per_block, len(part)))
            for p, part in enumerate(first.parts)
            for lo in range(0, len(part), per_block)
        ]

    # --- the deterministic order ---
    def _chunks(self, epoch: int) -> list[list[Block]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        chunks: list[list[Block]] = [[]]
        rows = 0
        for i in order:
            b = self.blocks[int(i)]
            n = (b.hi - b.lo) * self.rows_per_image
            if chunks[-1] and rows + n > self.buffer_rows:
                chunks.append([])
                rows = 0
            chunks[-1].append(b)
            rows += n
        return chunks

    def _read(self, blocks: list[Block]) -> np.ndarray:
        """Contiguous reads of each block, all token kinds, as (rows, d) in the store's numpy dtype; each block's
        pages are released as soon as it is copied, so at most one block is mapped at a time."""
        n = sum((b.hi - b.lo) * per for b in blocks for per in self.kind_rows)
        out = np.empty((n, self.d), dtype=next(iter(self.arrays.values())).parts[0].dtype)
        pos = 0
        for b in blocks:
            for arr, per in zip(self.arrays.values(), self.kind_rows, strict=True):
                part = arr.parts[b.part]
                rows = (b.hi - b.lo) * per
                out[pos : pos + rows] = np.asarray(part[b.lo : b.hi]).reshape(-1, self.d)
                self._done(part, b)
                pos += rows
        return out

    def _done(self, part: np.ndarray, b: Block) -> None:
        _release(part, b.lo, b.hi, self.drop_cache, (b.part, b.hi) in self._released)
        self._released.add((b.part, b.lo))
        if len(self._released) >= len(self.blocks):  # a new pass over the store begins
            self._released.clear()

    def _read_rows(self, blocks: list[Block], idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of the chunk made of `blocks` (in `_read`'s row order), in the order given: each block is
        visited once, front to back, and only the pages holding wanted rows are touched."""
        order = np.argsort(idx, kind="stable")
        wanted = idx[order]
        out = np.empty((len(idx), self.d), dtype=next(iter(self.arrays.values())).parts[0].dtype)
        start = 0
        for b in blocks:
            for arr, per in zip(self.arrays.values(), self.kind_rows, strict=True):
                n = (b.hi - b.lo) * per
                lo, hi = np.searchsorted(wanted, [start, start + n])
                if hi > lo:
                    part = arr.parts[b.part]
                    out[order[lo:hi]] = part[b.lo : b.hi].reshape(-1, self.d)[wanted[lo:hi] - start]
                    self._done(part, b)
                start += n
        return out

    def _shuffled_chunks(self, start_row: int) -> Iterator[Chunk]:
        """Chunks from the one holding stream row `start_row` on; the first is cut to start there."""
        epoch, offset = divmod(start_row, self.n_rows)
        while True:
            chunks = self._chunks(epoch)
            sizes = [sum(b.hi - b.lo for b in c) * self.rows_per_image for c in chunks]
            bounds = np.cumsum([0, *sizes]).tolist()
            c0 = bisect.bisect_right(bounds, offset) - 1
            for c in range(c0, len(chunks)):
                perm = np.random.default_rng([self.seed, epoch, c + 1]).permutation(sizes[c])
                skip = offset - bounds[c] if c == c0 else 0
                yield Chunk(chunks[c], perm[skip:], epoch * self.n_rows + bounds[c] + skip)
            epoch, offset = epoch + 1, 0

    def _rows_in_stream_order(self, start_row: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(rows, order) per chunk: this rank's rows of the chunk, in stream order once indexed by `order` (None:
        already in order). One process reads whole chunks and gathers batch by batch, not a permuted copy."""
        for ch in self._shuffled_chunks(start_row):
            if self.world_size == 1:
                yield self._read(ch.blocks), ch.perm
                continue
            pos = ch.start + np.arange(len(ch.perm))
            mine = (pos % self.batch_size) // self.local_batch == self.rank
            yield self._read_rows(ch.blocks, ch.perm[mine]), None

    def batches(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Batch `start_batch`, `start_batch + 1`, ... forever (epochs follow one another); this rank's slice."""
        carry: list[np.ndarray] = []
        n_carry = 0
        for rows, order in self._rows_in_stream_order(start_batch * self.batch_size):
            i, n = 0, len(rows) if order is None else len(order)
            while i < n:
                take = min(self.local_batch - n_carry, n - i)
                carry.append(rows[i : i + take] if order is None else rows[order[i : i + take]])
                n_carry += take
                i += take
                if n_carry == self.local_batch:
                    out = np.concatenate(carry) if len(carry) > 1 else np.ascontiguousarray(carry[0])
                    yield from_numpy(out, self.dtype).float()
                    carry, n_carry = [], 0
            # let this chunk go before the next is read (a partial batch may hold views into it)
            carry = [np.array(c) for c in carry]
            del rows, order

    def sample(self, n: int) -> torch.Tensor:
        """The first n rows of the stream (shuffled, the same on every rank), for normalisation statistics."""
        n = min(n, self.n_rows)
        out, got = [], 0
        for ch in self._shuffled_chunks(0):
            take = ch.perm[: n - got]
            out.append(from_numpy(self._read_rows(ch.blocks, take), self.dtype).float())
            got += len(take)
            if got >= n:
                self._released.clear()  # the sample is not part of a training pass
                return torch.cat(out)
        raise AssertionError("unreachable")


class Prefetcher:
    """Runs an iterator in a daemon thread, `depth` items ahead; errors surface in the consumer."""

    def __init__(self, it: Iterator[torch.Tensor], depth: int = 4, pin: bool = False) -> None:
        self.waited_s = 0.0
        """Seconds the consumer spent waiting for an item: near 0 when reading keeps up with training."""
        # Items, then None at the end; an error in the worker is handed over in their place.
        self._q: queue.Queue[torch.Tensor | BaseException | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin
        self._thread = threading.Thread(target=self._work, args=(it,), daemon=True, name="saevctl-loader")
        self._thread.start()

    def _work(self, it: Iterator[torch.Tensor]) -> None:
        try:
            for item in it:
                if self._pin:
                    item = item.pin_memory()
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer thread
            self._q.put(e)
            return
        self._q.put(None)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        t0 = time.perf_counter()
        item = self._q.get()
        self.waited_s += time.perf_counter() - t0
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
