"""Multi-process training (torchrun): the collectives a step needs (gradients and metrics averaged in one flat
buffer, the global BatchTopK threshold, the AuxK normaliser) and the placement of a sweep's SAEs on ranks.

Data parallel: every rank holds the same weights, computes gradients on its slice of the global batch, and
the averaged gradients give every rank the same update. Placement "ranks": each rank trains its own SAEs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

from saevctl import dist
from saevctl.errors import InputError
from saevctl.sae.topk import flat_topk
from saevctl.train.step_ref import StepOut

_MEAN_FIELDS = ("loss_m", "mse_m", "fvu_m", "l1_m", "aux_m")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True)
class Comm:
    """This process's place among `world` ranks; every method is a collective all ranks must call in step."""

    rank: int
    world: int
    device: str = "cpu"
    """Where collective buffers live: the rank's GPU under nccl (which moves CUDA tensors only), else cpu."""

    def _guard(self, fn: Callable[P, R], *args: P.args, **kw: P.kwargs) -> R:
        try:
            return fn(*args, **kw)
        except RuntimeError as e:  # a dead or timed-out peer surfaces as DistBackendError (a RuntimeError)
            raise dist._peer_error(e) from e

    def sum_(self, t: Tensor) -> Tensor:
        """In-place sum over ranks."""
        self._guard(tdist.all_reduce, t, op=tdist.ReduceOp.SUM)
        return t

    def min_(self, t: Tensor) -> Tensor:
        self._guard(tdist.all_reduce, t, op=tdist.ReduceOp.MIN)
        return t

    def broadcast_(self, t: Tensor) -> Tensor:
        """Rank 0's values in `t` on every rank."""
        self._guard(tdist.broadcast, t, src=0)
        return t

    def kth_largest(self, top_n: Tensor, n: int) -> Tensor:
        """The n-th largest value of the union over ranks, given each rank's own n largest values (equal-length
        lists: every rank has the same local batch and width). The global top n lie within the local top n."""
        parts = [torch.empty_like(top_n) for _ in range(self.world)]
        self._guard(tdist.all_gather, parts, top_n.contiguous())
        return flat_topk(torch.cat(parts), n)[0].min()

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able `obj`, in rank order, on every rank (JSON bytes in a tensor; no pickle)."""
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self._guard(tdist.all_gather, sizes, size)
        lengths = [int(s) for s in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[: len(data)] = data
        parts = [torch.zeros_like(padded, device=self.device) for _ in range(self.world)]
        self._guard(tdist.all_gather, parts, padded.to(self.device))
        return [json.loads(p[:n].cpu().numpy().tobytes().decode()) for p, n in zip(parts, lengths, strict=True)]

    def min_int(self, value: int) -> int:
        """The smallest `value` over ranks."""
        return int(self.min_(torch.tensor([value], dtype=torch.int64, device=self.device))[0])

    def barrier(self) -> None:
        dist.barrier()

    def reduce_steps(self, outs: list[StepOut], min_act: bool) -> None:
        """Average gradients and per-step metrics and sum firing counts over ranks, in place, in one all-reduce
        of a flat float32 buffer; `min_act` (the same on every rank: a BatchTopK group is trained) adds a min
        all-reduce of the smallest selected activation."""
        mean_parts: list[Tensor] = []
        sum_parts: list[Tensor] = []
        for o in outs:
            mean_parts += [o.grads[n].reshape(-1).float() for n in sorted(o.grads)]
            mean_parts += [getattr(o, f).reshape(-1).float() for f in _MEAN_FIELDS]
            sum_parts += [o.fired_ms.reshape(-1).float(), o.loss_m.new_full((1,), float(o.n_counted))]
        n_mean = sum(p.numel() for p in mean_parts)
        flat = self.sum_(torch.cat(mean_parts + sum_parts))
        flat[:n_mean].div_(self.world)
        offset = 0

        def take(like: Tensor) -> Tensor:
            nonlocal offset
            piece = flat[offset : offset + like.numel()].view(like.shape)
            offset += like.numel()
            return piece

        for o in outs:
            o.grads = {n: take(o.grads[n]) for n in sorted(o.grads)}
            for f in _MEAN_FIELDS:
                setattr(o, f, take(getattr(o, f)))
        for o in outs:
            o.fired_ms = take(o.fired_ms)
            o.n_counted = round(float(take(o.loss_m.new_zeros(1))[0]))
        if min_act:
            self._reduce_min_act(outs)

    def _reduce_min_act(self, outs: list[StepOut]) -> None:
        # a rank that selected nothing reports 0: +inf keeps it out of the minimum (back to 0 if every rank did)
        flat = self.min_(torch.cat([torch.where(o.min_act_m > 0, o.min_act_m.float(), torch.inf) for o in outs]))
        flat = torch.where(torch.isinf(flat), torch.zeros_like(flat), flat)
        offset = 0
        for o in outs:
            o.min_act_m = flat[offset : offset + len(o.min_act_m)]
            offset += len(o.min_act_m)


def check_batch(batch_size: int, world: int, placement: str) -> None:
    if placement == "data" and batch_size % world:
        raise InputError(
            f"--batch-size {batch_size} does not split over {world} processes",
            f"use a multiple of {world} (each rank takes batch/{world} rows of every step)",
        )


def mine(items: list[T], rank: int, world: int) -> list[T]:
    """Round-robin share of a sweep's SAEs for placement 'ranks'."""
    if len(items) < world:
        raise InputError(
            f"--place-sweep ranks spreads {len(items)} SAE(s) over {world} processes, leaving some idle",
            "train at least as many SAEs as processes, or use --place-sweep data",
        )
    return items[rank::world]


@dataclass(frozen=True)
class Place:
    """How this process takes part in a run: alone, one slice of a data-parallel run, or owner of some SAEs."""

    comm: Comm | None
    mode: str
    """single, data or ranks."""

    @property
    def main(self) -> bool:
        """Rank 0 writes what is shared: metrics, plots, the sweep summary (and every file in data mode)."""
        return self.comm is None or self.comm.rank == 0

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.rank

    @property
    def world(self) -> int:
        return 1 if self.comm is None else self.comm.world

    @property
    def peers(self) -> Comm:
        """The communicator of a data or ranks run (where there always is one)."""
        assert self.comm is not None, f"{self.mode} mode without a communicator"
        return self.comm

    @property
    def grad_comm(self) -> Comm | None:
        """The communicator steps reduce over (data parallel only)."""
        return self.comm if self.mode == "data" else None

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (so none waits for a peer that gave up)."""
        dist.raise_if_any_failed(error)


def place(placement: str, device: str, batch_size: int) -> Place:
    """Join the process group when launched with several processes (torchrun/srun) and check the batch splits."""
    check_batch(batch_size, dist.dist_info().world_size, placement)  # before joining: every rank fails alike
    info = dist.init_process_group(device)
    if info.world_size <= 1:
        return Place(None, "single")
    return Place(Comm(info.rank, info.world_size, device if device.startswith("cuda") else "cpu"), placement)
