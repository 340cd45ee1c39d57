"""Training from a store larger than the memory it may use, next to the bare ceiling of the same training.

Usage: python benchmarks/train_large.py [--quick] [--json OUT] [--store-gib 6] [--dir DIR] [--keep]

Writes a real synthetic activation store (float16, d=768, 256 patches per image, through StoreWriter) of
--store-gib GiB, evicts it from the page cache, and trains one SAE in a fresh process over all of it (one epoch:
every row read from disk once). Ceiling (no saevctl code), the slower of two bare operations:
- compute: the step's bare GEMM work at the same shapes and dtype (TopK: `x @ W_enc` plus the sparse decoder's
  minimum b*k*d multiply-adds for decode and for each of its two gradients, counted at the GEMM's rate; ReLU:
  the 5 GEMMs),
  looped in a second fresh process **at the same time** (each process with half the cores), so load from other
  jobs hits both alike;
- disk: reading the same store cold, in order, with plain 64 MiB reads (measured just before, then evicted again).
The overlap of the two processes is cut into equal windows; each window gives one rate of each and one ratio, so
figures are min / median / max over windows, with the load average sampled during each. Each process also reports
the share of time its training loop waited for data.
Memory: the big-store run starts inside a child memory cgroup capped at a third of the store (page cache
included), so the store is 3x the memory it may use; where no cgroup can be made, its peak resident memory
(anonymous + mapped file pages) is checked against the same budget instead. `fincore` gives the store's pages
left in the page cache (reclaimable), and /proc/self/io read_bytes shows the rows came from disk.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _timing import Report, load_1m, section

D, PATCHES, PER_SHARD = 768, 256, 256


def write_store(dpath: Path, n_images: int, seed: int) -> Path:
    """A real store (manifest, shards, image table) of random float16 patch activations; one random pool of
    images is reused with a per-shard offset, so writing 9 GiB does not need 9 GiB of random numbers."""
    from saevctl.store import StoreWriter

    config = {
        "model": {"spec": "synthetic", "arch": "synthetic", "weights_sha256": "0" * 64, "n_blocks": 1, "d_model": D,
                  "layout": {"n_cls": 1, "n_reg": 0, "grid_h": 16, "grid_w": PATCHES // 16}},
        "layers": [0], "tokens": ["patches"], "dtype": "float16",
        "images": {"spec": "synthetic", "n": n_images}, "images_per_shard": PER_SHARD,
    }
    pool = np.random.default_rng(seed).standard_normal((PER_SHARD, PATCHES, D), dtype=np.float32).astype(np.float16)
    writer = StoreWriter(dpath, config, n_images)
    for index, (lo, hi) in enumerate(writer.shard_ranges):
        acts = pool[: hi - lo] + np.float16((index % 97) * 0.01)
        images = [{"id": i, "path": f"synthetic/{i}", "label": None, "width": 16, "height": 16, "status": "ok"}
                  for i in range(lo, hi)]
        writer.write_shard(index, {(0, "patches"): acts}, images)
    writer.finalize()
    return dpath


def store_files(dpath: Path) -> list[Path]:
    return sorted(dpath.glob("shards/*/*.npy"))


def evict(dpath: Path) -> None:
    """Drop the store's own pages from the page cache (only these files)."""
    os.sync()
    for f in store_files(dpath):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read_rate(dpath: Path) -> float:
    """Bytes/s of reading the store's shard files in order with plain 64 MiB reads, from a cold page cache."""
    evict(dpath)
    n, t0 = 0, time.perf_counter()
    for f in store_files(dpath):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                n += len(chunk)
    rate = n / (time.perf_counter() - t0)
    evict(dpath)
    return rate


def cached_bytes(dpath: Path) -> int | None:
    """Bytes of the store's files in the page cache (util-linux fincore), or None without it."""
    if not shutil.which("fincore"):
        return None
    files = [str(f) for f in store_files(dpath)]
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(x) for x in out.split())


def _proc(fname: str, key: str) -> int:
    for line in Path(f"/proc/self/{fname}").read_text().splitlines():
        if line.startswith(key):
            v = line.split(":")[1].split()
            return int(v[0]) * (1024 if len(v) > 1 and v[1] == "kB" else 1)
    return -1


def child(args: argparse.Namespace) -> None:
    """Train in this fresh process; print one JSON line with the rate and what memory it used."""
    import torch

    from saevctl.train import Config, run

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the training and its ceiling run side by side
    cfg = Config(store=Path(args.store), out=Path(args.out), activation=(args.activation,), width=(f"{args.width}x",),
                 k=(args.k,), batch_size=args.batch, n_tokens=args.steps * args.batch, device="cpu", log_every=10**9,
                 ckpt_every=10**9, n_norm_sample=16384, lr_warmup=10, sparsity_warmup=10,
                 drop_cache=args.drop_cache == "yes", dtype=args.dtype)
    marks: list[float] = []
    peak = {"anon": 0, "file": 0}

    def progress(n: int, records: object) -> None:
        marks.append(time.monotonic())  # comparable across processes
        if len(marks) % 10 == 0:
            peak["anon"] = max(peak["anon"], _proc("status", "RssAnon"))
            peak["file"] = max(peak["file"], _proc("status", "RssFile"))

    io0 = [0]

    def progress_io(n: int, records: object) -> None:
        if not marks:  # disk reads from the first step on: not the imports' shared libraries
            io0[0] = _proc("io", "read_bytes")
        progress(n, records)

    res = run(cfg, progress=progress_io)
    skip = min(5, len(marks) // 4)  # the first steps include thread start-up and the first buffer fill
    rate = (len(marks) - 1 - skip) * args.batch / (marks[-1] - marks[skip])  # alone; the parent uses the overlap
    print(json.dumps({"rows_per_s": rate, "steps": len(marks), "peak_rss": _proc("status", "VmHWM"),
                      "data_wait_s": res.data_wait_s, "train_s": marks[-1] - marks[0], "marks": marks,
                      "peak_rss_anon": peak["anon"], "peak_rss_file": peak["file"],
                      "disk_read_bytes": _proc("io", "read_bytes") - io0[0]}))


def ceiling_child(args: argparse.Namespace) -> None:
    """Loop the step's bare GEMM work (see the docstring) until the stop file appears; print when each ended."""
    import torch

    from _bare import encoder_step_gemm, step_gemms, topk_min_work_factor

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    s, bf16 = args.width * D, args.dtype == "bfloat16"
    relu = args.activation == "relu"
    work = (step_gemms if relu else encoder_step_gemm)(args.batch, D, s, bf16, "cpu")
    stop, marks = Path(args.stop), [time.monotonic()]
    while not stop.exists() and time.monotonic() < marks[0] + 4 * 3600:
        work()
        marks.append(time.monotonic())
    print(json.dumps({"marks": marks, "factor": 1.0 if relu else topk_min_work_factor(s, args.k)}))


def memory_cgroup(limit_bytes: int) -> Path | None:
    """A child memory cgroup of this process's own (cgroup v1 or v2) capped at `limit_bytes`, page cache
    included; None where the hierarchy is not writable. Nesting under our own cgroup keeps the parent's limits."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            base, limit_file = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "memory.limit_in_bytes"
            break
    else:
        rel = next(
            ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")
        )
        base, limit_file = Path("/sys/fs/cgroup") / rel.lstrip("/"), "memory.max"
    group = base / f"saevctl-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit_bytes))
    except OSError:
        if group.is_dir():
            group.rmdir()
        return None
    return group


def cgroup_peak(group: Path | None) -> int | None:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if group is not None and (group / name).is_file():
            return int((group / name).read_text())
    return None


def start_child(args: argparse.Namespace, extra: list[str], group: Path | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, *extra, "--batch", str(args.batch), "--activation", args.activation,
           "--width", str(args.width), "--k", str(args.k), "--dtype", args.dtype]

    def enter_group() -> None:  # runs in the child before exec: all its memory, page cache too, is charged there
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=enter_group)


def finish_child(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_side_by_side(args: argparse.Namespace, big: Path, root: Path, steps: int,
                     group: Path | None) -> tuple[dict, dict, list[tuple[float, float]]]:
    """The training (in the cgroup) and its compute ceiling at the same time; the load average every second."""
    stop = root / "stop"
    train = start_child(args, ["--child", "--store", str(big), "--out", str(root / "sae"), "--steps", str(steps),
                               "--drop-cache", "yes"], group)
    ceiling = start_child(args, ["--child-ceiling", "--stop", str(stop)])
    loads: list[tuple[float, float]] = []
    try:
        while train.poll() is None:
            loads.append((time.monotonic(), load_1m()))
            time.sleep(1.0)
    finally:
        stop.touch()
    return finish_child(train), finish_child(ceiling), loads


def windows(disk: dict, ceil: dict, batch: int, n: int) -> tuple[np.ndarray, list[float], list[float]]:
    """Window edges over the interval in which both ran (after the training's first 5 steps), and each one's
    rows/s per window, from its cumulative rows interpolated at the edges (not quantised to whole steps)."""
    lo = max(disk["marks"][min(5, len(disk["marks"]) // 4)], ceil["marks"][1])
    hi = min(disk["marks"][-1], ceil["marks"][-1])
    assert hi > lo, "the training and its ceiling did not overlap"
    edges = np.linspace(lo, hi, n + 1)

    def rates(marks: list[float], rows_per_mark: float) -> list[float]:
        done = np.interp(edges, marks, np.arange(len(marks)) * rows_per_mark)
        return list(np.diff(done) / np.diff(edges))

    return edges, rates(disk["marks"], batch), rates(ceil["marks"], batch / ceil["factor"])


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a 0.6 GiB store, 3 windows, cap 1.5 GiB (under a minute; a mechanics check, not 3x memory)")
    ap.add_argument("--store-gib", type=float, default=None, help="big store size (default 6; quick 0.6)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--activation", default="topk")
    ap.add_argument("--width", type=int, default=2, help="latents as a multiple of d=768")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", help="matmul precision: bfloat16 (AMX; the cheapest step, so the\
                    loader is tested hardest) or float32")
    ap.add_argument("--windows", type=int, default=None, help="windows the overlap is cut into (default 8, quick 3)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the store (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="cgroup memory cap (page cache included) for the training (default: a third of the store; "
                    "quick: 1.5)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-ceiling", action="store_true", help=argparse.SUPPRESS)
    for name in ("--store", "--out", "--steps", "--drop-cache", "--stop"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse()
    if args.child:
        args.steps = int(args.steps)
        return child(args)
    if args.child_ceiling:
        return ceiling_child(args)
    gib = args.store_gib or (0.6 if args.quick else 6.0)
    img_bytes = PATCHES * D * 2
    n_big = int(gib * 2**30 // img_bytes) // PER_SHARD * PER_SHARD
    root = args.dir or Path(tempfile.mkdtemp(prefix="saevctl-train-large-"))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < n_big * img_bytes + 4 * 2**30:
        raise SystemExit(f"{root} has {free / 2**30:.1f} GiB free; the store needs {gib:.1f} GiB plus 4 GiB to spare")
    group = None
    try:
        t0 = time.perf_counter()
        big = write_store(root / "big", n_big, 0)
        print(f"wrote a {gib:.1f} GiB store in {time.perf_counter() - t0:.0f} s", flush=True)
        read_rate = cold_read_rate(big)  # leaves the store evicted
        cap = int((args.memory_cap_gib or (1.5 if args.quick else gib / 3)) * 2**30)
        group = memory_cgroup(cap)
        print(f"memory cap for the training: {cap / 2**30:.2f} GiB "
              + ("(cgroup " + str(group) + ")" if group else "(no writable cgroup here: peak RSS is reported instead)"),
              flush=True)
        disk, ceil, loads = run_side_by_side(args, big, root, n_big * PATCHES // args.batch, group)
        disk["cgroup_cap"], disk["cgroup_peak"] = (cap if group else None), cgroup_peak(group)
        left = cached_bytes(big)
    finally:
        if group is not None:
            group.rmdir()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(args, disk, ceil, loads, read_rate, left, n_big * img_bytes, cap)


def window_loads(loads: list[tuple[float, float]], edges: np.ndarray) -> list[float]:
    """The highest 1-minute load average sampled during each window."""
    out = []
    for a, b in itertools.pairwise(edges):
        inside = [la for t, la in loads if a <= t <= b]
        out.append(max(inside) if inside else max(la for _, la in loads))
    return out


def report(args: argparse.Namespace, disk: dict, ceil: dict, loads: list[tuple[float, float]], read_rate: float,
           left: int | None, store_bytes: int, budget: int) -> None:
    n_windows = args.windows or (3 if args.quick else 8)
    edges, path_rates, gemm_rates = windows(disk, ceil, args.batch, n_windows)
    disk_rows = read_rate / (D * 2)
    ceil_rates = [min(r, disk_rows) for r in gemm_rates]
    win_loads = window_loads(loads, edges)
    g = 2**30
    rep = Report("train_large", args.quick, activation=args.activation, width=args.width * D, k=args.k, d=D,
                 dtype=args.dtype, batch=args.batch, store_gib=store_bytes / g, store_dtype="float16",
                 windows=n_windows, overlap_s=float(edges[-1] - edges[0]))
    section(f"train_large: {args.activation} width {args.width * D:,} k={args.k}, batch {args.batch}, {args.dtype}, "
            f"{store_bytes / g:.2f} GiB store, {n_windows} windows of {(edges[1] - edges[0]):.0f} s")
    rep.figure("train", "training from the store (rows/s)", path_rates, "rows/s", win_loads, ",.0f")
    rep.figure("ceiling_compute", "compute ceiling: bare step GEMMs, side by side", gemm_rates, "rows/s", win_loads,
               ",.0f")
    rep.note("ceiling_disk_rows_per_s", disk_rows)
    print(f"  disk ceiling: cold in-order read {read_rate / 1e9:.2f} GB/s = {disk_rows:,.0f} rows/s (once, before)")
    rep.figure("ceiling", "ceiling: the slower of the two (rows/s)", ceil_rates, "rows/s", win_loads, ",.0f")
    rep.ratio("ratio", "ratio training / ceiling (per window)", path_rates, ceil_rates, win_loads)
    wait = disk["data_wait_s"] / disk["train_s"]
    cap, peak = disk.get("cgroup_cap"), disk.get("cgroup_peak")
    facts = {"data_wait_frac": wait, "steps": disk["steps"], "disk_read_gib": disk["disk_read_bytes"] / g,
             "peak_rss_gib": disk["peak_rss"] / g, "peak_rss_anon_gib": disk["peak_rss_anon"] / g,
             "peak_rss_file_gib": disk["peak_rss_file"] / g, "memory_budget_gib": budget / g,
             "store_cached_after_gib": None if left is None else left / g,
             "cgroup_cap_gib": None if not cap else cap / g, "cgroup_peak_gib": None if peak is None else peak / g}
    for k, v in facts.items():
        rep.note(k, v)
    print(f"  waiting for data {wait:.1%} of the training time; read from disk {facts['disk_read_gib']:.2f} GiB")
    print(f"  memory: peak RSS {facts['peak_rss_gib']:.2f} GiB (anon {facts['peak_rss_anon_gib']:.2f}, mapped files "
          f"{facts['peak_rss_file_gib']:.2f}) vs budget {budget / g:.2f} GiB (the cap): "
          f"{'ok' if disk['peak_rss'] <= budget else 'OVER'}; store pages left in the page cache (reclaimable): "
          f"{'n/a' if left is None else f'{left / g:.2f} GiB'}")
    if cap:
        print(f"  cgroup cap {cap / g:.2f} GiB (store = {store_bytes / cap:.1f}x the cap), peak charged to it "
              f"(process + page cache) {'n/a' if peak is None else f'{peak / g:.2f} GiB'}")
    rep.headline("train rows/s from a store 3x memory", "train", "ceiling", "ratio")
    rep.write(args.json)


if __name__ == "__main__":
    main()
