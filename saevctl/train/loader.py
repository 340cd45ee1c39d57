"""Stream shuffled activation rows from a memory-mapped store, in a background thread, resumable at any batch.

Blocks of contiguous images are read in a seeded random order, pooled into a large buffer, and shuffled there;
the stream is a pure function of (seed, batch index), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from saevctl.store.format import from_numpy
from saevctl.store.reader import ShardedArray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """Images [lo, hi) of one shard part."""

    part: int
    lo: int
    hi: int


class ActivationLoader:
    """Batches of (batch_size, d) float32 rows from the given token arrays of one layer."""

    def __init__(
        self,
        arrays: dict[str, ShardedArray],
        batch_size: int,
        buffer_rows: int = 131072,
        seed: int = 0,
        block_rows: int = 16384,
    ) -> None:
        assert arrays, "the loader needs at least one token kind"
        self.arrays = arrays
        first = next(iter(arrays.values()))
        self.dtype = first.dtype
        self.d = int(first.shape[-1])
        self.n_images = len(first)
        # rows one image contributes: p for patches, 1 for cls
        self.rows_per_image = sum(int(np.prod(a.shape[1:-1], dtype=np.int64)) for a in arrays.values())
        self.n_rows = self.n_images * self.rows_per_image
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, batch_size)
        self.seed = seed
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
        """Contiguous reads of each block, all token kinds, as (rows, d) in the store's numpy dtype."""
        pieces = []
        for b in blocks:
            for arr in self.arrays.values():
                pieces.append(np.asarray(arr.parts[b.part][b.lo : b.hi]).reshape(-1, self.d))
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def _shuffled_chunks(self, start_row: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(chunk rows, permutation) from the chunk holding `start_row` on; the first is cut to start there."""
        epoch, offset = divmod(start_row, self.n_rows)
        while True:
            chunks = self._chunks(epoch)
            sizes = [sum(b.hi - b.lo for b in c) * self.rows_per_image for c in chunks]
            bounds = np.cumsum([0, *sizes]).tolist()
            c0 = bisect.bisect_right(bounds, offset) - 1
            for c in range(c0, len(chunks)):
                perm = np.random.default_rng([self.seed, epoch, c + 1]).permutation(sizes[c])
                skip = offset - bounds[c] if c == c0 else 0
                yield self._read(chunks[c]), perm[skip:]
            epoch, offset = epoch + 1, 0

    def batches(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Batch `start_batch`, `start_batch + 1`, ... forever (epochs follow one another)."""
        carry: list[np.ndarray] = []
        n_carry = 0
        for rows, perm in self._shuffled_chunks(start_batch * self.batch_size):
            i = 0
            while i < len(perm):
                take = min(self.batch_size - n_carry, len(perm) - i)
                carry.append(rows[perm[i : i + take]])
                n_carry += take
                i += take
                if n_carry == self.batch_size:
                    out = np.concatenate(carry) if len(carry) > 1 else carry[0]
                    yield from_numpy(out, self.dtype).float()
                    carry, n_carry = [], 0

    def sample(self, n: int) -> torch.Tensor:
        """The first n rows of the stream (shuffled), for normalisation statistics."""
        n = min(n, self.n_rows)
        out, got = [], 0
        for rows, perm in self._shuffled_chunks(0):
            take = perm[: n - got]
            out.append(from_numpy(rows[take], self.dtype).float())
            got += len(take)
            if got >= n:
                return torch.cat(out)
        raise AssertionError("unreachable")


class Prefetcher:
    """Runs an iterator in a daemon thread, `depth` items ahead; errors surface in the consumer."""

    _END = object()

    def __init__(self, it: Iterator[torch.Tensor], depth: int = 4, pin: bool = False) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
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
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._q.put(e)
            return
        self._q.put(self._END)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
