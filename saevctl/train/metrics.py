"""Training metrics: window averages kept on the device (no per-step sync), JSONL records, optional wandb.

Dead = no firing in the last `dead_after` tokens; dense = fires on more than 1% of the window's tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from saevctl import atomic
from saevctl.errors import InputError
from saevctl.sae.model import DENSE_RATE
from saevctl.train.group import SAEGroup
from saevctl.train.step_ref import StepOut

log = logging.getLogger(__name__)
KEYS = ("loss", "mse", "fvu", "l0", "l1", "aux")


class Window:
    """Sums of each SAE's per-step metrics since the last record."""

    def __init__(self, groups: list[SAEGroup], device: torch.device) -> None:
        self.groups = groups
        self.sums = [torch.zeros(len(KEYS), g.n, device=device) for g in groups]
        self.n_steps = 0

    def add(self, outs: list[StepOut]) -> None:
        for acc, out in zip(self.sums, outs, strict=True):
            l0 = out.fired_ms.sum(-1) / out.n_counted
            acc += torch.stack([out.loss_m, out.mse_m, out.fvu_m, l0, out.l1_m, out.aux_m]).float()
        self.n_steps += 1

    def records(self, step: int, tokens: int, dead_after: int, lr_scale: float) -> list[dict[str, Any]]:
        """One record per SAE, then the window restarts (this is where the device syncs)."""
        out: list[dict[str, Any]] = []
        for g, acc in zip(self.groups, self.sums, strict=True):
            means = (acc / max(1, self.n_steps)).cpu().tolist()
            dead = g.dead(dead_after, capped=True).float().mean(-1).cpu().tolist()
            rate = g.trackers["window_fired"] / g.trackers["window_counted"].clamp_min(1)
            dense = (rate > DENSE_RATE).float().mean(-1).cpu().tolist()
            for i, spec in enumerate(g.specs):
                rec = {"step": step, "tokens": tokens, "run": spec.name, "lr": spec.lr * lr_scale}
                rec |= {k: means[j][i] for j, k in enumerate(KEYS)}
                rec |= {"dead": dead[i], "dense": dense[i]}
                out.append(rec)
            g.trackers["window_fired"].zero_()
            g.trackers["window_counted"].zero_()
            acc.zero_()
        self.n_steps = 0
        return out


class MetricsFile:
    """Appends records to metrics.jsonl; on resume drops records past the resumed step (and a last line cut short
    by a kill or a full disk)."""

    def __init__(self, fpath: Path, resume_step: int | None) -> None:
        self.fpath = fpath
        with atomic.translate_os_errors(fpath):
            fpath.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                fpath.write_text("")
            elif fpath.exists():
                keep = [json.dumps(r) for r in read(fpath) if r["step"] <= resume_step]
                atomic.write_text(fpath, "".join(ln + "\n" for ln in keep))
            self._f = open(fpath, "a")  # noqa: SIM115 - open for the whole run, closed in close()

    def write(self, records: list[dict[str, Any]]) -> None:
        with atomic.translate_os_errors(self.fpath):
            self._f.write("".join(json.dumps(r) + "\n" for r in records))
            self._f.flush()

    def sync(self) -> None:
        with atomic.translate_os_errors(self.fpath):
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk was reported by the write that met it
            self._f.close()


def read(fpath: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a line cut short (the run was killed, or the disk filled) is left out."""
    if not fpath.exists():
        return []
    out = []
    for ln in fpath.read_text().splitlines():
        try:
            rec = json.loads(ln) if ln else None
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def require_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise InputError("--wandb needs the wandb package", "install it with pip install wandb, or drop --wandb") from e
    return wandb


class Wandb:
    """Thin optional wrapper; wandb is imported only when asked for."""

    def __init__(self, project: str, name: str, config: dict[str, Any], out_dpath: Path) -> None:
        wandb = require_wandb()
        self.run = wandb.init(project=project, name=name, config=config, dir=str(out_dpath), reinit=True)

    def log(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        flat = {f"{r['run']}/{k}": v for r in records for k, v in r.items() if k not in ("run", "step", "tokens")}
        self.run.log(flat, step=records[0]["step"])

    def finish(self) -> None:
        self.run.finish()
