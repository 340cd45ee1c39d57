"""Image-source read throughput: WebDataset tars and a saved Hugging Face dataset next to plain files.

Usage: python benchmarks/sources.py [--quick] [--json OUT]
The same JPEGs (ImageNet-like, 500x375) are written as files, as WebDataset tars and (when `datasets`
is installed) as a `save_to_disk` folder. Each source is listed, then every image is opened with
`open_image` (one thread). The ceiling is decoding the same JPEG bytes from memory with PIL, in the same
process; the ratio is a source's images/s over it.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from saevctl.data import open_image, resolve_images, wds
from saevctl.data.images import demo_records


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


def time_source(spec: str) -> tuple[float, float]:
    """(listing seconds, images/s of open_image over every record)."""
    wds._INDEX._members.clear()  # list from scratch, as a new process would
    t0 = time.perf_counter()
    src = resolve_images(spec)
    t1 = time.perf_counter()
    for rec in src.records:
        open_image(rec.path)
    return t1 - t0, len(src.records) / (time.perf_counter() - t1)


def ceiling(jpegs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for b in jpegs:
        with Image.open(io.BytesIO(b)) as img:
            img.convert("RGB")
    return len(jpegs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 images, one repeat")
    ap.add_argument("--images", type=int, default=None, help="default 1024, quick 256")
    ap.add_argument("--tars", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None, help="best of N (default 3, quick 1)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (256 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 3)
    jpegs = make_jpegs(n)
    with tempfile.TemporaryDirectory() as tmp:
        specs = write_sources(jpegs, Path(tmp), args.tars)
        best: dict[str, tuple[float, float]] = {}
        ceil = 0.0
        for _ in range(repeats):  # interleaved, best of N: the machine may be shared
            ceil = max(ceil, ceiling(jpegs))
            for name, spec in specs.items():
                list_s, rate = time_source(spec)
                old = best.get(name, (float("inf"), 0.0))
                best[name] = (min(old[0], list_s), max(old[1], rate))
    print(f"{n} JPEGs 500x375, {args.tars} tars, best of {repeats}; ceiling (PIL decode from memory) {ceil:.1f} img/s")
    for name, (list_s, rate) in best.items():
        print(f"  {name:6s} list {list_s * 1e3:8.1f} ms   open_image {rate:8.1f} img/s   ratio {rate / ceil:.3f}")
    result = {
        "metric": "wds open_image images/s",
        "value": round(best["wds"][1], 1),
        "ceiling": round(ceil, 1),
        "ratio": round(best["wds"][1] / ceil, 3),
        "images": n,
        "tars": args.tars,
        "repeats": repeats,
        "sources": {k: {"list_ms": round(v[0] * 1e3, 1), "images_per_s": round(v[1], 1),
                        "ratio": round(v[1] / ceil, 3)} for k, v in best.items()},
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
