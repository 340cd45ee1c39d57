"""Shared timing for the benchmarks: paths and their ceilings timed interleaved (A B A B ...), every figure as
min / median / max with the 1-minute load average beside it, and one --json layout for every script.

A ceiling is the bare operation a path cannot beat at the same shapes and dtype (a GEMM, a plain timm forward,
PIL decoding), never a saevctl function; a ratio above 1 means the ceiling is wrong, and is flagged.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A timed function returns None (its wall time is measured) or its own seconds, when it has set-up or
# clean-up (a temporary folder, a fresh index path) that is not part of what it measures.
Timed = Callable[[], float | None]


def load_1m() -> float:
    return os.getloadavg()[0]


@dataclass
class Series:
    """Seconds of one timed thing over the interleaved repeats, and the 1-minute load average after each."""

    name: str
    seconds: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)

    def rates(self, work: float) -> list[float]:
        """Work per second of each repeat (work: images, activations, rows, ...)."""
        return [work / s for s in self.seconds]


def interleave(fns: Mapping[str, Timed], repeats: int, warmup: int = 1,
               sync: Callable[[], None] | None = None) -> dict[str, Series]:
    """Run every function once per repeat, in turn (A B A B ...), after `warmup` untimed rounds, so that load
    from other processes on a shared machine hits paths and ceilings alike."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        sync()
    out = {name: Series(name) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            sync()
            out[name].seconds.append(own if own is not None else time.perf_counter() - t0)
            out[name].loads.append(load_1m())
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _load_text(loads: Sequence[float]) -> str:
    lo, hi = min(loads), max(loads)
    return f"load {lo:.1f}" if hi - lo < 0.05 else f"load {lo:.1f}-{hi:.1f}"


class Report:
    """Collects a benchmark's figures, prints each as it comes, and writes them all as JSON."""

    def __init__(self, benchmark: str, quick: bool, **settings: Any) -> None:
        self.data: dict[str, Any] = {"benchmark": benchmark, "quick": quick, "settings": settings,
                                     "machine": machine(), "load_avg_1m_start": load_1m(), "figures": {}}
        self.flags: list[str] = []

    def figure(self, key: str, label: str, values: Sequence[float], unit: str, loads: Sequence[float],
               fmt: str = ",.1f", **extra: Any) -> dict[str, Any]:
        """One figure (a rate, a latency, ...) over repeats: printed and stored as min / median / max."""
        s = summary(values)
        fig = {"label": label, "unit": unit, **s, "values": list(values), "load_avg_1m": list(loads), **extra}
        self.data["figures"][key] = fig
        print(f"  {label:<44} {s['min']:{fmt}} / {s['median']:{fmt}} / {s['max']:{fmt}} {unit}  ({_load_text(loads)})",
              flush=True)
        return fig

    def rate(self, key: str, label: str, series: Series, work: float, unit: str, fmt: str = ",.1f",
             **extra: Any) -> dict[str, Any]:
        return self.figure(key, label, series.rates(work), unit, series.loads, fmt, seconds=series.seconds,
                           work=work, **extra)

    def ratio(self, key: str, label: str, path: Sequence[float], ceiling: Sequence[float],
              loads: Sequence[float], unit: str = "x the ceiling") -> dict[str, Any]:
        """Path over ceiling, both as rates (higher is faster), paired repeat by repeat (they ran back to back),
        plus the ratio of the medians."""
        pairs = [p / c for p, c in zip(path, ceiling, strict=True)]
        of_medians = statistics.median(path) / statistics.median(ceiling)
        fig = self.figure(key, label, pairs, unit, loads, ".3f", of_medians=of_medians)
        if of_medians > 1.0:
            msg = f"{key}: the path beats its ceiling ({of_medians:.3f} by medians): noise, or a wrong ceiling"
            self.flags.append(msg)
            print(f"  WARNING {msg}", flush=True)
        return fig

    def series_ratio(self, key: str, label: str, path: Series, ceiling: Series, work_path: float = 1.0,
                     work_ceiling: float = 1.0, unit: str = "x the ceiling") -> dict[str, Any]:
        loads = [max(a, b) for a, b in zip(path.loads, ceiling.loads, strict=True)]
        return self.ratio(key, label, path.rates(work_path), ceiling.rates(work_ceiling), loads, unit)

    def note(self, key: str, value: Any) -> None:
        """A setting or a measured fact without repeats (a size, a peak memory)."""
        self.data[key] = value

    def headline(self, metric: str, value_key: str, ceiling_key: str, ratio_key: str) -> None:
        """The figure a reader looks at first: medians of one path, its ceiling and their ratio."""
        figs = self.data["figures"]
        self.data |= {"metric": metric, "value": figs[value_key]["median"], "ceiling": figs[ceiling_key]["median"],
                      "ratio": figs[ratio_key]["median"], "unit": figs[value_key]["unit"]}

    def write(self, fpath: Path | None) -> None:
        self.data["load_avg_1m_end"] = load_1m()
        self.data["warnings"] = self.flags
        if fpath is not None:
            fpath.write_text(json.dumps(self.data, indent=2) + "\n")
            print(f"wrote {fpath}")


def section(title: str) -> None:
    print(f"{title}  (min / median / max)", flush=True)


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, Python and (if loaded) torch and its thread count."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                           "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    return out
