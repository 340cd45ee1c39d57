"""`run(cfg)`: train every SAE of a sweep in one pass over an activation store (or, through `train_on`, over
fit()'s array), with periodic resumable checkpoints, metrics, a summary and plots. `saevctl train` is a thin CLI
over `run`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import saevctl
from saevctl import atomic, dist, layout, lock
from saevctl.config import resolve_device
from saevctl.errors import OutputError, SaevctlError, TrainingError
from saevctl.hardware import bf16_if_fast
from saevctl.train import distributed, heap, optim, plots, state
from saevctl.train.config import Config, RunSpec, expand, group_specs
from saevctl.train.distributed import Place
from saevctl.train.group import SAEGroup
from saevctl.train.loader import Prefetcher
from saevctl.train.metrics import MetricsFile, Wandb, Window, read, require_wandb
from saevctl.train.setup import Data, check_train_memory, open_data, provenance
from saevctl.train.step_ref import StepOut

log = logging.getLogger(__name__)
# progress(steps_done_now, latest metric records or None)
Progress = Callable[[int, list[dict[str, Any]] | None], None]
# opener(cfg, rank, world_size, alone): the rows this process trains on (open_data for a store)
Opener = Callable[[Config, int, int, bool], Data]
# "out" is where the run lives, so a moved run folder still resumes.
RESUME_FREE = ("resume", "wandb", "wandb_project", "ckpt_every", "log_every", "device", "out", "drop_cache")


@dataclass(frozen=True)
class Result:
    out: Path
    """The run's output folder."""
    runs: list[dict[str, Any]]
    """One entry per SAE: name, path (its checkpoint folder), hyperparameters, final metrics."""
    plots: list[Path]
    """PNG files written."""
    n_steps: int
    resumed_from: int | None
    """The step the run continued from (None for a fresh run)."""
    data_wait_s: float = 0.0
    """Seconds the training loop waited for the loader (this process): near 0 when reading kept up."""


def fingerprint(cfg: Config, array: dict[str, Any] | None = None) -> dict[str, Any]:
    """Settings that must match to resume; `array`: fit()'s array shape and dtype, in place of the store."""
    d = dataclasses.asdict(cfg)
    # defaults of options added later: runs started before they existed still resume
    if d.get("place_sweep") == "data":
        del d["place_sweep"]
    if "on" not in cfg.matryoshka:  # unused, so they do not block a resume
        del d["prefixes"]
    if d.get("freeze_decoder") is False:
        del d["freeze_decoder"]
    if array is not None:
        d["store"] = array
    # Paths are compared resolved, so `--store store` from the run's folder equals `--store run/store`.
    return {k: (str(v.resolve()) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in d.items() if k not in RESUME_FREE}


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved fingerprint in today's keys. Runs started before matryoshka was a sweep axis saved the prefix sizes
    as `matryoshka` (a number list, [] for none) and the axis as `nested` (left out when it was ["on"])."""
    sizes = saved.get("matryoshka")
    if "nested" not in saved and not (isinstance(sizes, list) and all(isinstance(v, (int, float)) for v in sizes)):
        return saved
    d = {k: v for k, v in saved.items() if k not in ("matryoshka", "nested")}
    d["matryoshka"] = saved.get("nested", ["on"]) if sizes else ["off"]
    if "on" in d["matryoshka"]:
        d["prefixes"] = sizes
    return d


def _check_out(cfg: Config) -> None:
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file", "choose a folder for the SAEs")
    if cfg.resume or not out.is_dir() or not any(out.iterdir()):
        return
    if layout.train_state_dpath(out).is_dir() or layout.train_sweep_fpath(out).is_file():
        raise OutputError(
            f"{out} already holds a training run",
            "pass --resume to continue it, or choose a new --out",
        )
    raise OutputError(f"output folder {out} holds other files", "choose an empty or new --out folder")


def _build_groups(cfg: Config, data: Data, device: str, place: Place) -> list[SAEGroup]:
    specs = _all_specs(cfg, data)
    # every rank checks the busiest rank's share, so all refuse alike (none waits for a peer that gave up)
    shares = [distributed.mine(specs, r, place.world) for r in range(place.world)] if place.mode == "ranks" else [specs]
    check_train_memory(cfg, shares, data, device)
    if place.mode == "ranks":  # dealt in sweep.json's order
        specs = shares[place.rank]
    return [SAEGroup(g, data.d, cfg.seed, cfg.aux_coef, device, cfg.freeze_decoder) for g in group_specs(specs)]


def _state_tensors(groups: list[SAEGroup], mean_d: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"norm.mean": mean_d.cpu(), "norm.scale": scale.cpu().reshape(())}
    for j, g in enumerate(groups):
        out |= g.state_tensors(f"g{j}.")
    return out


def _state_dpath(cfg: Config, place: Place) -> Path:
    if place.mode == "ranks":
        return layout.train_rank_state_dpath(cfg.out, place.rank)
    return layout.train_state_dpath(cfg.out)


def _restore(cfg: Config, data: Data, groups: list[SAEGroup],
             place: Place) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    dpath = _state_dpath(cfg, place)
    at_most = None
    if place.mode == "ranks" and place.comm is not None:
        # every rank resumes at the newest step all ranks saved (older states are pruned only once all have)
        own = state.latest(dpath)
        at_most = place.comm.min_int(own[0]["step"] if own else 0)
        if at_most == 0:
            return None
    found = state.latest(dpath, at_most)
    if found is None:
        return None
    header, tensors = found
    state.check_same_settings(saved_settings(header["config"]), fingerprint(cfg, data.array), cfg.out)
    if place.mode == "ranks" and header.get("world_size") != place.world:
        raise TrainingError(
            f"the run in {cfg.out} spread its SAEs over {header.get('world_size')} processes, not {place.world}",
            "resume with the same --nproc-per-node, or train into a new --out",
        )
    for j, g in enumerate(groups):
        g.load_state_tensors(tensors, f"g{j}.")
    log.info("resuming %s at step %d", cfg.out, header["step"])
    return int(header["step"]), tensors["norm.mean"], tensors["norm.scale"]


def _export(cfg: Config, data: Data, groups: list[SAEGroup], norm: tuple[torch.Tensor, torch.Tensor],
            step: int, n_steps: int, final: dict[str, dict[str, Any]], save: bool = True) -> list[dict[str, Any]]:
    runs = []
    for g in groups:
        for i, spec in enumerate(g.specs):
            prov = provenance(cfg, data, spec, step, n_steps, final.get(spec.name, {}))
            dpath = layout.train_run_dpath(cfg.out, spec.name)
            if save:
                g.to_sae(i, norm[0], norm[1], prov).save(dpath)
            runs.append({"name": spec.name, "path": str(dpath), **spec.hyper(), "final": final.get(spec.name, {})})
    return runs


def _non_finite(step: int, x_bd: torch.Tensor, last_ckpt: int | None, out: Path) -> TrainingError:
    what = "the activations" if not bool(torch.isfinite(x_bd).all()) else "the loss"
    kept = (
        f"the last good checkpoint (step {last_ckpt}) is kept in {out}"
        if last_ckpt
        else "no checkpoint was written yet"
    )
    return TrainingError(
        f"{what} became NaN or infinite at step {step}; training stopped and {kept}",
        "check the store for corrupt values, or lower --lr and resume with --resume",
    )


def _oom(e: BaseException, cfg: Config) -> TrainingError:
    return TrainingError(
        f"out of memory with --batch-size {cfg.batch_size} ({type(e).__name__})",
        "use a smaller --batch-size, fewer SAEs per sweep, or --dtype bfloat16",
    )


def _already_done(cfg: Config, array: dict[str, Any] | None) -> Result | None:
    fpath = layout.train_sweep_fpath(cfg.out)
    if not (cfg.resume and fpath.is_file()):
        return None
    summary = json.loads(fpath.read_text())
    state.check_same_settings(saved_settings(summary["config"]), fingerprint(cfg, array), cfg.out)
    pngs = sorted(layout.train_plots_dpath(cfg.out).glob("*.png"))
    return Result(cfg.out, summary["runs"], pngs, summary["n_steps"], summary["n_steps"])


def run(cfg: Config, progress: Progress | None = None, on_total: Callable[[int, int], None] | None = None) -> Result:
    """Train the sweep; with cfg.resume, continue from the last checkpoint in cfg.out (or return a finished run).
    Under torchrun every rank calls this: data parallel by default, or cfg.place_sweep == "ranks".
    `on_total(n_steps, n_saes)` is called once the data is open, before the first step."""
    return train_on(cfg, open_data, None, progress, on_total)


def train_on(cfg: Config, opener: Opener, array: dict[str, Any] | None, progress: Progress | None = None,
             on_total: Callable[[int, int], None] | None = None) -> Result:
    """run() on the rows `opener` gives: a store's (array None) or fit()'s array (array: its shape and dtype)."""
    device = dist.rank_device(resolve_device(cfg.device))
    place = distributed.place(cfg.place_sweep, device, cfg.batch_size)
    with contextlib.ExitStack() as held:  # rank 0 holds the run folder's write lock until the run is written
        error, done = None, None
        try:
            if place.main:  # one lock per launch: a second launch into this --out is refused on every rank
                held.enter_context(lock.exclusive(cfg.out, "the training run", "--out"))
            _check_out(cfg)
            if cfg.wandb and place.main:
                require_wandb()
            done = _already_done(cfg, array)
        except (SaevctlError, OSError) as e:
            error = e
        place.agree(error)  # every rank has checked before rank 0 writes anything
        return done or _train_run(cfg, opener, device, place, progress, on_total)


def _train_run(cfg: Config, opener: Opener, device: str, place: Place, progress: Progress | None,
               on_total: Callable[[int, int], None] | None) -> Result:
    """Open the data, build the SAEs, restore them or normalise afresh, train, and write the results."""
    data = opener(cfg, *((place.rank, place.world) if place.mode == "data" else (0, 1)), place.comm is None)
    groups = _build_groups(cfg, data, device, place)
    n_steps = max(1, (cfg.n_tokens or data.loader.n_rows) // cfg.batch_size)
    if on_total is not None:
        on_total(n_steps, sum(g.n for g in groups))
    restored = _restore(cfg, data, groups, place) if cfg.resume else None
    if restored:
        start, mean_d, scale = restored
    else:
        start = 0
        mean_d, scale = data.normalization(cfg.n_norm_sample)
    mean_d, scale = mean_d.to(device).contiguous(), scale.to(device).reshape(())
    if place.comm is not None and not restored:  # the same sample on every rank; rank 0's sums make them equal
        place.comm.broadcast_(mean_d)
        place.comm.broadcast_(scale)
    if place.main:
        cfg.out.mkdir(parents=True, exist_ok=True)
    try:
        with heap.kept(not device.startswith("cuda")):  # the CPU step's big buffers stay mapped between steps
            waited_s = _train(cfg, data, groups, (mean_d, scale), start, n_steps, device, place, progress)
    except torch.OutOfMemoryError as e:
        raise _oom(e, cfg) from e
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise _oom(e, cfg) from e
        raise
    result = _finish(cfg, data, groups, (mean_d, scale), n_steps, start if restored else None, place)
    place.barrier()  # no rank returns before rank 0 has written the summary
    log.info("the training loop waited %.2f s for data", waited_s)
    return dataclasses.replace(result, data_wait_s=waited_s)


def _use_bf16(cfg: Config, device: str) -> bool:
    """bfloat16 matmuls as asked, except on a CPU without AMX or AVX512-BF16: there torch emulates them, slower
    than float32 (#17), so the run trains in float32 and says so."""
    return cfg.dtype == "bfloat16" and bf16_if_fast("--dtype bfloat16", device, "training")


def _train(cfg: Config, data: Data, groups: list[SAEGroup], norm: tuple[torch.Tensor, torch.Tensor],
           start: int, n_steps: int, device: str, place: Place, progress: Progress | None) -> float:
    """The steps from `start` to `n_steps`; returns the seconds spent waiting for batches."""
    mean_d, scale = norm
    metrics = MetricsFile(layout.train_metrics_fpath(cfg.out), start if cfg.resume else None) if place.main else None
    wb = (Wandb(cfg.wandb_project, cfg.out.name, fingerprint(cfg, data.array), cfg.out)
          if cfg.wandb and place.main else None)
    window = Window(groups, torch.device(device))
    batches = Prefetcher(data.loader.batches(start), pin=device.startswith("cuda"))
    last_ckpt: int | None = start or None
    # short runs (demos, tests) would otherwise spend most of their steps warming up
    lr_warmup, sp_warmup = min(cfg.lr_warmup, n_steps // 5), min(cfg.sparsity_warmup, n_steps // 5)
    dead_after = cfg.dead_after_tokens(n_steps)
    bf16 = _use_bf16(cfg, device)
    batchtopk = any(g.hp.activation == "batchtopk" for g in groups)
    try:
        for t in range(start, n_steps):
            x_bd = (next(batches).to(device, non_blocking=True) - mean_d) * scale
            coef = optim.sparsity_factor(t, sp_warmup)
            outs = [g.compute(x_bd, coef, dead_after, cfg.impl, bf16, place.grad_comm) for g in groups]
            if place.mode == "data":
                place.peers.reduce_steps(outs, batchtopk)
            _check_finite(outs, t, x_bd, last_ckpt, cfg.out, place)
            lr_scale = optim.lr_factor(t, n_steps, lr_warmup, cfg.lr_decay)
            for g, o in zip(groups, outs, strict=True):
                g.apply(o, t, lr_scale, fused=cfg.impl == "fast")
            window.add(outs)
            done = t + 1
            records = None
            if done % cfg.log_every == 0 or done == n_steps:
                records = window.records(done, done * cfg.batch_size, dead_after, lr_scale)
                records = _gather(records, cfg, data, place)
                if metrics:
                    metrics.write(records)
                if wb:
                    wb.log(records)
            if done % cfg.ckpt_every == 0 and done < n_steps:
                _checkpoint(cfg, data, groups, norm, done, n_steps, metrics, place)
                last_ckpt = done
            if progress:
                progress(1, records)
    finally:
        batches.close()
        if metrics:
            metrics.close()
        if wb:
            wb.finish()
    return batches.waited_s


def _check_finite(outs: list[StepOut], t: int, x_bd: torch.Tensor, last_ckpt: int | None, out: Path,
                  place: Place) -> None:
    """Raise on every rank alike: data mode reduced the losses already; in ranks mode one rank's NaN is summed in."""
    total = torch.stack([o.loss_m.sum() for o in outs]).sum().reshape(1).float()
    if place.mode == "ranks":
        total = place.peers.sum_(total)
    if not math.isfinite(float(total)):
        raise _non_finite(t, x_bd, last_ckpt, out)


def _gather(records: list[dict[str, Any]], cfg: Config, data: Data, place: Place) -> list[dict[str, Any]]:
    """Every SAE's records on every rank (ranks mode), in the order one process would write them."""
    if place.mode != "ranks":
        return records
    order = {s.name: i for i, s in enumerate(_all_specs(cfg, data))}
    everyone = [r for part in place.peers.gather_json(records) for r in part]
    return sorted(everyone, key=lambda r: order[r["run"]])


def _all_specs(cfg: Config, data: Data) -> list[RunSpec]:
    return [s for g in group_specs(expand(cfg, data.d)) for s in g]


def _checkpoint(cfg: Config, data: Data, groups: list[SAEGroup], norm: tuple[torch.Tensor, torch.Tensor],
                done: int, n_steps: int, metrics: MetricsFile | None, place: Place) -> None:
    """Data mode: rank 0 writes everything. Ranks mode: each rank its own SAEs and state part; old parts are
    pruned only after every rank has written its new one, so a kill anywhere leaves a common step to resume."""
    t0 = time.perf_counter()
    if metrics:
        metrics.sync()
    if place.mode == "data" and not place.main:
        return
    _export(cfg, data, groups, norm, done, n_steps, {})
    header = {"config": fingerprint(cfg, data.array), "groups": [[s.name for s in g.specs] for g in groups],
              "n_steps": n_steps, "saevctl_version": saevctl.__version__, "world_size": place.world}
    dpath = _state_dpath(cfg, place)
    state.save(dpath, done, _state_tensors(groups, *norm), header, prune_old=place.mode != "ranks")
    if place.mode == "ranks":
        place.barrier()
        state.prune(dpath, done)
    log.info("checkpoint at step %d in %.1fs", done, time.perf_counter() - t0)


def _final_metrics(cfg: Config, place: Place) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    if place.main:
        for r in read(layout.train_metrics_fpath(cfg.out)):
            last[r["run"]] = {k: v for k, v in r.items() if k != "run"}
    if place.comm is not None:
        last = place.comm.gather_json(last)[0]  # rank 0's view of the metrics file, everywhere
    return last


def _finish(cfg: Config, data: Data, groups: list[SAEGroup], norm: tuple[torch.Tensor, torch.Tensor],
            n_steps: int, resumed_from: int | None, place: Place) -> Result:
    final = _final_metrics(cfg, place)
    runs = _export(cfg, data, groups, norm, n_steps, n_steps, final, save=place.main or place.mode == "ranks")
    if place.mode == "ranks":
        order = {s.name: i for i, s in enumerate(_all_specs(cfg, data))}
        everyone = place.peers.gather_json(runs)
        runs = sorted((r for part in everyone for r in part), key=lambda r: order[r["name"]])
    if not place.main:
        return Result(cfg.out, runs, [], n_steps, resumed_from)
    summary = {
        "schema_version": layout.SAE_SCHEMA, "format": "saevctl-train-sweep", "complete": True,
        "saevctl_version": saevctl.__version__, "store": str(cfg.store) if data.array is None else None,
        **({} if data.array is None else data.source), "layer": data.layer,
        "tokens": cfg.tokens, "n_steps": n_steps, "batch_size": cfg.batch_size,
        "n_tokens": n_steps * cfg.batch_size, "config": fingerprint(cfg, data.array), "runs": runs,
        "world_size": place.world, "place_sweep": place.mode,
    }
    pdir = layout.train_plots_dpath(cfg.out)
    pngs = [plots.curves(read(layout.train_metrics_fpath(cfg.out)), pdir / "curves.png")]
    if plots.wants_pareto(runs):
        pngs.append(plots.mse_vs_l0(runs, pdir / "mse_vs_l0.png"))
    atomic.write_json(layout.train_sweep_fpath(cfg.out), summary)  # last: marks the run complete (see --resume)
    shutil.rmtree(layout.train_state_dpath(cfg.out), ignore_errors=True)
    return Result(cfg.out, runs, pngs, n_steps, resumed_from)
