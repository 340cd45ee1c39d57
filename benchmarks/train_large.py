"""Training from a store larger than the memory it may use, next to training from a store held in RAM.

Usage: python benchmarks/train_large.py [--quick] [--json OUT] [--store-gib 6] [--dir DIR] [--keep]

Writes a real synthetic activation store (float16, d=768, 256 patches per image, through StoreWriter) of
--store-gib GiB, evicts it from the page cache, and trains one SAE in a fresh process over all of it (one
epoch: every row read from disk once). Ceiling: the same training (same SAE, shapes, settings) in a second
fresh process, at the same time, on a small store of the same shape read into the page cache beforehand (so
its loader never waits for the disk). Each process gets half the cores; rows/s are counted over the interval
in which both train, so load from other jobs on a shared machine hits both alike. Ratio = big-store rows/s
over in-RAM rows/s; each process also reports the share of time its training loop waited for data.
Memory: the big-store run starts inside a child memory cgroup capped at a third of the store (page cache
included), so the store is 3x the memory it may use; where no cgroup can be made, its peak resident memory
(anonymous + mapped file pages) is checked against the same budget instead. `fincore` gives the store's pages
left in the page cache (reclaimable), and /proc/self/io read_bytes shows the rows came from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def warm(dpath: Path) -> None:
    for f in store_files(dpath):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


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

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # two trainings run side by side
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


def start_child(store: Path, out: Path, steps: int, args: argparse.Namespace, drop: bool,
                group: Path | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--child", "--store", str(store), "--out", str(out), "--steps", str(steps),
           "--batch", str(args.batch), "--activation", args.activation, "--width", str(args.width), "--k", str(args.k),
           "--drop-cache", "yes" if drop else "no", "--dtype", args.dtype]

    def enter_group() -> None:  # runs in the child before exec: all its memory, page cache too, is charged there
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=enter_group)


def finish_child(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"training child failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def overlap_rates(a: dict, b: dict, batch: int) -> tuple[float, float, float]:
    """Rows/s of each run over the interval in which both were training (after each one's first 5 steps)."""
    lo = max(a["marks"][5], b["marks"][5])
    hi = min(a["marks"][-1], b["marks"][-1])
    assert hi > lo, "the two runs did not overlap"

    def rate(r: dict) -> float:
        inside = [t for t in r["marks"] if lo <= t <= hi]
        return (len(inside) - 1) * batch / (inside[-1] - inside[0])

    return rate(a), rate(b), hi - lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 1.5 GiB store (about 3 minutes; below 3x the memory used)")
    ap.add_argument("--store-gib", type=float, default=None, help="big store size (default 6; quick 1.5)")
    ap.add_argument("--ram-gib", type=float, default=0.5, help="in-RAM store size")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--activation", default="topk")
    ap.add_argument("--width", type=int, default=2, help="latents as a multiple of d=768")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", help="matmul precision: bfloat16 (AMX; the cheapest step, so the\
                    loader is tested hardest) or float32")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument(
        "--memory-cap-gib",
        type=float,
        default=None,
        help="cgroup memory cap (page cache included) for the big-store run (default: a third of the store)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--store", "--out", "--steps", "--drop-cache"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.steps = int(args.steps)
        return child(args)
    gib = args.store_gib or (1.5 if args.quick else 6.0)
    img_bytes = PATCHES * D * 2
    n_big = int(gib * 2**30 // img_bytes) // PER_SHARD * PER_SHARD
    n_small = int(args.ram_gib * 2**30 // img_bytes) // PER_SHARD * PER_SHARD
    root = args.dir or Path(tempfile.mkdtemp(prefix="saevctl-train-large-"))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < n_big * img_bytes + 4 * 2**30:
        raise SystemExit(f"{root} has {free / 2**30:.1f} GiB free; the store needs {gib:.1f} GiB plus 4 GiB to spare")
    try:
        t0 = time.perf_counter()
        big = write_store(root / "big", n_big, 0)
        small = write_store(root / "small", n_small, 1)
        print(f"wrote {gib:.1f} GiB + {args.ram_gib:.1f} GiB stores in {time.perf_counter() - t0:.0f} s", flush=True)
        big_steps = n_big * PATCHES // args.batch  # one epoch: every row of the big store read once
        warm(small)
        evict(big)
        cap = int((args.memory_cap_gib or gib / 3) * 2**30)
        group = memory_cgroup(cap)
        print(f"memory cap for the big-store run: {cap / 2**30:.2f} GiB "
              + ("(cgroup " + str(group) + ")" if group else "(no writable cgroup here: peak RSS is reported instead)"),
              flush=True)
        procs = [start_child(big, root / "sae-big", big_steps, args, drop=True, group=group),
                 start_child(small, root / "sae-small", big_steps, args, drop=False)]
        disk, ram = finish_child(procs[0]), finish_child(procs[1])
        disk["cgroup_cap"], disk["cgroup_peak"] = (cap if group else None), cgroup_peak(group)
        left = cached_bytes(big)
    finally:
        if "group" in locals() and group is not None:
            group.rmdir()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(args, disk, ram, left, n_big * img_bytes, n_small * img_bytes)


def report(args: argparse.Namespace, disk: dict, ram: dict, left: int | None, store_bytes: int,
           small_bytes: int) -> None:
    budget = store_bytes / 3
    disk["rows_per_s"], ram["rows_per_s"], both_s = overlap_rates(disk, ram, args.batch)
    ratio = disk["rows_per_s"] / ram["rows_per_s"]
    wait = {k: r["data_wait_s"] / r["train_s"] for k, r in (("disk", disk), ("ram", ram))}
    g = 2**30
    print(f"SAE: {args.activation} d={D} width {args.width}x k={args.k}, batch {args.batch}, {args.dtype}, "
          f"{os.cpu_count()} cores")
    print(f"big store   {store_bytes / g:6.2f} GiB: {disk['rows_per_s']:9,.0f} rows/s ({disk['steps']} steps), "
          f"waiting for data {wait['disk']:.1%} of the time; read from disk {disk['disk_read_bytes'] / g:.2f} GiB")
    print(f"in-RAM store {small_bytes / g:5.2f} GiB: {ram['rows_per_s']:9,.0f} rows/s (ceiling, side by side), "
          f"waiting for data {wait['ram']:.1%}")
    print(f"ratio {ratio:.3f} (rates over the {both_s:.0f} s both trained)")
    print(f"memory: peak RSS {disk['peak_rss'] / g:.2f} GiB (anon {disk['peak_rss_anon'] / g:.2f}, mapped files "
          f"{disk['peak_rss_file'] / g:.2f}) vs budget {budget / g:.2f} GiB = store / 3: "
          f"{'ok' if disk['peak_rss'] <= budget else 'OVER'} (store = {store_bytes / disk['peak_rss']:.1f}x peak RSS); "
          f"store pages left in the page cache (reclaimable): {'n/a' if left is None else f'{left / g:.2f} GiB'}")
    cap, peak = disk.get("cgroup_cap"), disk.get("cgroup_peak")
    if cap:
        print(f"cgroup cap {cap / g:.2f} GiB (store = {store_bytes / cap:.1f}x the cap), peak charged to it "
              f"(process + page cache) {'n/a' if peak is None else f'{peak / g:.2f} GiB'}")
    if args.json:
        args.json.write_text(json.dumps({
            "cgroup_cap_gib": None if not cap else cap / g, "cgroup_peak_gib": None if peak is None else peak / g,
            "metric": "train_rows_per_s_store_3x_memory", "value": disk["rows_per_s"], "ceiling": ram["rows_per_s"],
            "ratio": ratio, "overlap_s": both_s, "data_wait_frac_big": wait["disk"],
            "data_wait_frac_ram": wait["ram"], "store_gib": store_bytes / g, "memory_budget_gib": budget / g,
            "peak_rss_gib": disk["peak_rss"] / g, "peak_rss_anon_gib": disk["peak_rss_anon"] / g,
            "peak_rss_file_gib": disk["peak_rss_file"] / g,
            "store_cached_after_gib": None if left is None else left / g,
            "disk_read_gib": disk["disk_read_bytes"] / g, "steps": disk["steps"], "batch": args.batch,
            "activation": args.activation, "width": args.width * D, "k": args.k, "d": D, "dtype": args.dtype,
            "store_dtype": "float16",
        }, indent=2))


if __name__ == "__main__":
    main()
