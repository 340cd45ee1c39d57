"""Split an extraction's shards over the ranks of a torchrun or srun launch; rank 0 owns the manifest.

With one process every call here is the plain single-process path (no process group, no collectives).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saevctl import dist, layout, lock
from saevctl.store import StoreWriter
from saevctl.store.format import read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    writer: StoreWriter
    complete: bool
    """The store was already complete before this run: nothing to do."""
    done: tuple[int, ...]
    """Shards on disk before this run (skipped by every rank)."""
    mine: tuple[tuple[int, tuple[int, int]], ...]
    """(shard index, (first image, end image)) that this rank extracts."""


def _visible(fpath: Path, wait_s: float = 10.0) -> bool:
    """Whether `fpath` exists, allowing a network file system a few seconds to show another node's write."""
    deadline = time.monotonic() + wait_s
    while not fpath.is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _open_writer(out: Path, config: dict[str, Any], n_images: int, rank: int) -> StoreWriter:
    if rank != 0 and not _visible(layout.store_manifest_fpath(out)):
        raise dist.DistError(
            f"rank {rank} cannot see the store that rank 0 created at {out}",
            "put --out on a filesystem that every node mounts at the same path",
        )
    # On ranks > 0 this also checks that their image listing and model equal rank 0's (same config).
    return StoreWriter(out, config, n_images)


def assign(todo: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of the unfinished shards: every world_size-th, from position `rank` (round-robin keeps
    the ranks within one shard of each other, also when a resume leaves gaps)."""
    return todo[rank::world_size]


def plan_shards(out: Path, config: dict[str, Any], n_images: int, held: contextlib.ExitStack) -> Plan:
    """Rank 0 locks and creates (or checks) the store, then the others check it; rank 0 lists the finished shards
    and every rank takes every world_size-th unfinished shard, starting at its rank. A shard's bytes do not
    depend on which rank writes it, so the result equals a 1-process run, and a re-run with any number of
    ranks resumes where the last one stopped. Rank 0's write lock stays in `held`: one lock per launch, so the
    ranks of one launch never block each other, while a second launch's rank 0 is refused (and its ranks with it)."""
    info = dist.dist_info()
    writer: StoreWriter | None = None
    for turn in (0, 1):  # rank 0 first: the others must find its manifest
        error: Exception | None = None
        if (info.rank == 0) == (turn == 0):
            try:
                if info.rank == 0:
                    held.enter_context(lock.exclusive(out, "the store"))
                writer = _open_writer(out, config, n_images, info.rank)
            except Exception as e:  # handed to every rank, then re-raised here
                error = e
        dist.raise_if_any_failed(error)
    assert writer is not None
    # Only rank 0 reads the shard folder (and clears stale temp folders), before anyone writes: every rank
    # then plans from the same list even on a filesystem whose listings lag between nodes.
    state = dist.broadcast_object((writer.is_complete, sorted(writer.done_shards())) if info.rank == 0 else None)
    assert state is not None  # rank 0 always sends its listing
    complete, done = state
    todo = [s for s in range(len(writer.shard_ranges)) if s not in set(done)]
    mine = assign(todo, info.rank, info.world_size)
    if info.world_size > 1:
        log.info("rank %d/%d extracts %d of %d remaining shards", info.rank, info.world_size, len(mine), len(todo))
    return Plan(writer, bool(complete), tuple(done), tuple((s, writer.shard_ranges[s]) for s in mine))


def finish(writer: StoreWriter) -> dict[str, Any]:
    """Wait for every rank's shards, let rank 0 write the final manifest, and return it on every rank."""
    dist.barrier()
    error: Exception | None = None
    if dist.is_main():
        try:
            writer.finalize()
        except Exception as e:  # handed to every rank, then re-raised here
            error = e
    dist.raise_if_any_failed(error)
    return read_manifest(writer.dpath)
