"""Multi-process runs: who am I (torchrun or SLURM env) and a thin, idempotent torch.distributed wrapper.

Imports torch only inside functions, so `saevctl --help` stays light; every call is a no-op in a 1-process run.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import TypeVar

from saevctl.errors import SaevctlError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective (barrier, gather) waits for a missing rank before failing, unless
SAEVCTL_DIST_TIMEOUT_S says otherwise: long enough for the slowest rank's last shard, short enough not to
hold a cluster allocation for hours after a rank died outside Python (killed, out of memory)."""


class DistError(SaevctlError):
    """A multi-process run that cannot start (missing rendezvous address) or whose peer rank failed."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """This process's global rank, 0..world_size-1."""
    world_size: int
    """Number of processes in the run (1 without a launcher)."""
    local_rank: int
    """Rank on this node; picks the GPU."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise DistError(f"environment variable {name}={value!r} is not a number", "unset it or fix the launcher") from e


def dist_info() -> DistInfo:
    """Rank facts from torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else from a task started by srun
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with SLURM_STEP_ID set), else a single process (0, 1, 0)."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        return DistInfo(rank, world, _env_int("LOCAL_RANK") or 0)
    # srun marks each task with a step id; a batch script run directly also has SLURM_PROCID and the job's
    # SLURM_NTASKS, but is one process that must not wait for peers nobody started.
    in_step = any(os.environ.get(v) for v in ("SLURM_STEP_ID", "SLURM_STEPID"))
    rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
    if in_step and rank is not None and world is not None:
        return DistInfo(rank, world, _env_int("SLURM_LOCALID") or 0)
    return DistInfo(0, 1, 0)


def timeout_s() -> float:
    value = os.environ.get("SAEVCTL_DIST_TIMEOUT_S")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        return float(value)
    except ValueError as e:
        raise DistError(f"SAEVCTL_DIST_TIMEOUT_S={value!r} is not a number of seconds", "unset it or fix it") from e


def _is_initialized() -> bool:
    if "torch.distributed" not in sys.modules:  # no group can exist yet; and keep torch unimported
        return False
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def _rendezvous(info: DistInfo) -> str:
    """The init_method URL. torchrun sets MASTER_ADDR/PORT; under plain srun the user names rank 0's host
    (we cannot tell which node srun gave rank 0 without parsing SLURM's compressed node lists). The
    environment is read, never written: a library call must not leave a rank behind in os.environ."""
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        raise DistError(
            f"rank {info.rank} of {info.world_size} has no MASTER_ADDR to meet the other ranks",
            'launch with torchrun, or export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        )
    if _env_int("RANK") is not None and _env_int("WORLD_SIZE") is not None:
        return "env://"  # torchrun: its variables are complete, and its agent may host the store
    port = os.environ.get("MASTER_PORT") or "29500"
    host = f"[{addr}]" if ":" in addr else addr  # IPv6 literal
    return f"tcp://{host}:{port}"


def init_process_group(device: str) -> DistInfo:
    """Join the process group once (nccl for cuda devices, gloo otherwise); no-op for a single process.
    On cuda, selects the GPU numbered local_rank. Collectives time out after `timeout_s()` seconds."""
    info = dist_info()
    if info.world_size <= 1:
        return info
    import torch
    import torch.distributed as tdist

    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(_gpu_index(info))
    if _is_initialized():
        return info
    init_method = _rendezvous(info)
    backend = "nccl" if on_cuda else "gloo"
    log.info("rank %d/%d joins the %s process group", info.rank, info.world_size, backend)
    try:
        tdist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s()),
        )
    except RuntimeError as e:  # DistStoreError, DistNetworkError: the others never came, or the address is wrong
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT') or 29500}"
        raise DistError(
            f"rank {info.rank} of {info.world_size} could not meet the other ranks at {where} "
            f"within {timeout_s():.0f} s ({_first_line(e)})",
            "start every rank (same world size), check MASTER_ADDR/MASTER_PORT, or raise SAEVCTL_DIST_TIMEOUT_S",
        ) from e
    return info


def _gpu_index(info: DistInfo) -> int:
    """LOCAL_RANK, modulo the GPUs this process sees: srun --gpus-per-task=1 shows each task only its own."""
    import torch

    return info.local_rank % max(1, torch.cuda.device_count())


def rank_device(device: str) -> str:
    """The device this rank computes on: `cuda` becomes `cuda:LOCAL_RANK` in a multi-process run."""
    info = dist_info()
    if info.world_size > 1 and device.startswith("cuda:"):
        # NCCL refuses two ranks on one GPU, and a fixed index would put every rank there.
        raise DistError(
            f"--device {device} names one GPU for all {info.world_size} processes",
            "pass --device cuda (or auto): each process then takes the GPU numbered by its LOCAL_RANK",
        )
    if device == "cuda" and info.world_size > 1:
        return f"cuda:{_gpu_index(info)}"
    return device


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if not _is_initialized():
        return
    import torch
    import torch.distributed as tdist

    try:
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            tdist.barrier()
    except RuntimeError as e:  # torch's DistBackendError (a peer died, or the timeout passed) is one
        raise _peer_error(e) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200].rstrip(".") if text else type(e).__name__


def _peer_error(e: BaseException) -> DistError:
    return DistError(
        f"rank {dist_info().rank} lost its peers ({_first_line(e)})",
        "another rank failed or was killed (see its output), or took longer than SAEVCTL_DIST_TIMEOUT_S "
        f"({timeout_s():.0f} s); re-run to resume",
    )


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (a picklable value; the identity without a process group)."""
    if not _is_initialized():
        return obj
    import torch.distributed as tdist

    box = [obj]
    try:
        tdist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise _peer_error(e) from e
    return box[0]


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return dist_info().rank == 0


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: every rank passes its own failure (or None); all ranks then raise the first failure, naming
    its rank, so that no rank waits at a later barrier for a peer that already gave up."""
    if not _is_initialized():
        if error is not None:
            raise error
        return
    import torch.distributed as tdist

    mine = None
    if error is not None:
        mine = error.one_line() if isinstance(error, SaevctlError) else f"{type(error).__name__}: {error}"
    everyone: list[str | None] = [None] * tdist.get_world_size()
    try:
        tdist.all_gather_object(everyone, mine)
    except RuntimeError as e:
        raise _peer_error(e) from e
    if error is not None:
        raise error
    for rank, msg in enumerate(everyone):
        if msg is not None:
            raise DistError(f"rank {rank} failed: {msg.rstrip('.')}", "fix that rank's problem and re-run to resume")


def exit_now_if_grouped(code: int) -> None:
    """On an error, a rank still in a process group ends its process at once with `code`, output flushed: it
    cannot leave the group cleanly (a peer may be dead), and the interpreter's teardown of the backend's threads
    was seen to abort the process with SIGABRT ("terminate called without an active exception") after the
    error line, turning exit 2 into -6. No-op without a group."""
    if _is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def shutdown() -> None:
    """Leave the process group together (no-op without one): a rank that tears its connections down while a
    peer is still finishing its last collective can make that peer's transport threads abort the process.

    A rank other than 0 then ends its process at once: its work is done and written, and the interpreter's
    teardown (destructors of the backend's threads, run while rank 0 still prints) was seen to abort an idle rank
    with SIGABRT now and then, which made torchrun report a finished run as failed."""
    if _is_initialized():
        import torch.distributed as tdist

        with contextlib.suppress(RuntimeError, DistError):
            barrier()
        tdist.destroy_process_group()
        if dist_info().rank != 0:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
