"""Extraction throughput (decode + forward + write) next to the bare forward on the same batches.

Usage: python benchmarks/extract.py [--quick] [--model demo] [--json OUT]
The ceiling is the model's forward to the deepest stored block on pre-decoded batches, measured in the
same process; the ratio is full extraction images/s over that ceiling.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saevctl.data import open_image, resolve_images
from saevctl.extract import Config, run
from saevctl.vit import load_backbone


def bare_forward(bb, batches: list[torch.Tensor], layers: list[int]) -> float:
    """Seconds for forward_to over pre-decoded, pre-normalised batches."""
    t0 = time.perf_counter()
    for x in batches:
        bb.forward_to(x, layers)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 images, one repeat (about a minute on 2 cores)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--images", type=int, default=None, help="demo images to use (default 512, quick 256)")
    ap.add_argument("--layers", default="6,10")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="decoding threads (default: the Config default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (256 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    layers = [int(x) for x in args.layers.split(",")]

    bb = load_backbone(args.model, args.device)
    layers = [bb.check_layer(x) for x in layers]
    src = resolve_images(f"demo:{n}")
    pre = bb.preprocess
    u8 = [torch.from_numpy(pre.to_uint8(open_image(r.path))) for r in src.records]
    batches = [
        pre.normalize(torch.stack(u8[i : i + args.batch_size])).to(args.device) for i in range(0, n, args.batch_size)
    ]
    bare_forward(bb, batches[:1], layers)  # warm-up

    bare_s, full_s = [], []
    for _ in range(repeats):
        bare_s.append(bare_forward(bb, batches, layers))
        out = Path(tempfile.mkdtemp(prefix="saevctl-bench-"))
        try:
            cfg = Config(model=args.model, images=f"demo:{n}", layers=tuple(layers), out=out / "store",
                         dtype=args.dtype, batch_size=args.batch_size, device=args.device,
                         **({"n_workers": args.workers} if args.workers else {}))
            t0 = time.perf_counter()
            run(cfg, backbone=bb)
            full_s.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    # Best of the interleaved repeats: on a shared machine other load only ever slows a run down.
    ceiling = n / min(bare_s)
    value = n / min(full_s)
    result = {
        "metric": "extract_images_per_s",
        "value": round(value, 2),
        "ceiling": round(ceiling, 2),
        "ratio": round(value / ceiling, 3),
        "model": args.model, "images": n, "layers": layers, "batch_size": args.batch_size, "dtype": args.dtype,
        "device": args.device, "torch_threads": torch.get_num_threads(), "repeats": repeats,
        "bare_s": [round(t, 2) for t in bare_s], "full_s": [round(t, 2) for t in full_s],
        "machine": platform.processor() or platform.machine(),
    }
    print(f"full extraction : {value:8.2f} images/s  (decode + forward + write, {args.dtype})")
    print(f"bare forward    : {ceiling:8.2f} images/s  (forward to block {max(layers)}, same batches)")
    print(f"ratio           : {value / ceiling:8.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
