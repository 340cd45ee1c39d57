"""Image-source read throughput: WebDataset tars and a saved Hugging Face dataset next to plain files.

Usage: python benchmarks/sources.py [--quick] [--json OUT]
The same JPEGs (ImageNet-like, 500x375) are written as files, as WebDataset tars and (when `datasets`
is installed) as a `save_to_disk` folder. Each source is listed, then every image is opened with
`open_image` (one thread). Ceiling: PIL decoding the same JPEG bytes from memory (no saevctl code). The ceiling
and every source are timed interleaved (ceiling, files, wds, hf, ceiling, ...) over several repeats; figures are
min / median / max with the load average, and a source's ratio is paired with the ceiling of the same repeat.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from saevctl.data import open_image, resolve_images, wds
from saevctl.data.images import demo_records

from _timing import Report, interleave, section


def make_jpegs(n: int) -> list[bytes]:
    out = []
    for rec in demo_records(n):
        img = open_image(rec.path).resize((500, 375))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_sources(jpegs: list[bytes], root: Path, n_tars: int) -> dict[str, str]:
    files = root / "files"
    files.mkdir()
    for i, b in enumerate(jpegs):
        (files / f"{i:06d}.jpg").write_bytes(b)
    per = -(-len(jpegs) // n_tars)
    for t in range(n_tars):
        with tarfile.open(root / f"shard-{t:04d}.tar", "w") as tf:
            for i in range(t * per, min((t + 1) * per, len(jpegs))):
                for name, data in ((f"{i:06d}.jpg", jpegs[i]), (f"{i:06d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    specs = {"files": str(files), "wds": f"wds:{root}/shard-{{0000..{n_tars - 1:04d}}}.tar"}
    try:
        import datasets
    except ImportError:
        return specs
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in jpegs], "label": [i % 10 for i in range(len(jpegs))]},
        features=feats,
    )
    ds.save_to_disk(str(root / "hf"))
    specs["hf"] = f"hf:{root / 'hf'}"
    return specs


def source_fn(spec: str, listing: list[float]) -> Callable[[], float]:
    """open_image over every record of the source (timed); the listing is timed apart, into `listing`."""
    def go() -> float:
        wds._INDEX._members.clear()  # list from scratch, as a new process would
        t0 = time.perf_counter()
        src = resolve_images(spec)
        t1 = time.perf_counter()
        for rec in src.records:
            open_image(rec.path)
        listing.append(t1 - t0)
        return time.perf_counter() - t1

    return go


def ceiling_fn(jpegs: list[bytes]) -> Callable[[], None]:
    def go() -> None:
        for b in jpegs:
            with Image.open(io.BytesIO(b)) as img:
                img.convert("RGB")

    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 images, 5 repeats (seconds)")
    ap.add_argument("--images", type=int, default=None, help="default 1024, quick 256")
    ap.add_argument("--tars", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 9, quick 5)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (256 if args.quick else 1024)
    repeats = args.repeats or (5 if args.quick else 9)
    jpegs = make_jpegs(n)
    listing: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = write_sources(jpegs, Path(tmp), args.tars)
        fns: dict[str, Callable[[], float | None]] = {"ceiling": ceiling_fn(jpegs)}
        fns |= {name: source_fn(spec, listing.setdefault(name, [])) for name, spec in specs.items()}
        times = interleave(fns, repeats, warmup=1)
    rep = Report("sources", args.quick, images=n, tars=args.tars, repeats=repeats, sources=list(specs))
    section(f"sources: {n} JPEGs 500x375, {args.tars} tars, one thread, {repeats} repeats")
    rep.rate("ceiling", "ceiling: PIL decode from memory (img/s)", times["ceiling"], n, "img/s")
    for name in specs:
        rep.rate(name, f"{name}: open_image (img/s)", times[name], n, "img/s")
        rep.figure(f"{name}_list_ms", f"{name}: listing", [1e3 * t for t in listing[name][1:]], "ms",
                   times[name].loads)
        rep.series_ratio(f"{name}_ratio", f"{name}: ratio", times[name], times["ceiling"], n, n)
    rep.headline("wds open_image images/s", "wds", "ceiling", "wds_ratio")
    rep.write(args.json)


if __name__ == "__main__":
    main()
