"""Extraction throughput (listing, decoding, forward, cast and write) next to the bare forward of the same model.

Usage: python benchmarks/extract.py [--quick] [--model demo] [--json OUT]
Ceiling: the model's own modules (timm's patch embedding, blocks 0..deepest stored layer; no saevctl code) on the
same pre-decoded, pre-normalised batches, same batch size and compute dtype (--compute: float32 on a CPU by
default; bfloat16 autocast on CUDA for a 16-bit store, or anywhere with --compute bfloat16, as extraction runs it).
With bfloat16 the path also measures its error against float32 on 4 images of each fresh store, which it pays
for. Paths and ceiling are timed interleaved (bare, full, bare, full, ...) over several repeats, --quick
included; figures are min / median / max with the load average.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saevctl.data import open_image, resolve_images
from saevctl.extract import Config, run
from saevctl.extract.precision import resolve_compute
from saevctl.vit import load_backbone

from _bare import BareViT, autocast, sync
from _timing import Report, interleave, section


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 images, 3 repeats (under a minute on 2 cores)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--images", type=int, default=None, help="demo images to use (default 512, quick 64)")
    ap.add_argument("--layers", default="6,10")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float16", help="store dtype")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="forward precision, for the path and the bare forward alike (auto: bf16 on CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, quick 3)")
    ap.add_argument("--workers", type=int, default=None, help="decoding threads (default: the Config default)")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def main() -> None:
    args = parse()
    n = args.images or (64 if args.quick else 512)
    repeats = args.repeats or (3 if args.quick else 5)
    bb = load_backbone(args.model, args.device)
    layers = sorted({bb.check_layer(int(x)) for x in args.layers.split(",")})
    pre = bb.preprocess
    u8 = [torch.from_numpy(pre.to_uint8(open_image(r.path))) for r in resolve_images(f"demo:{n}").records]
    bs = args.batch_size
    # Contiguous (b, 3, h, w) float32, as extraction's decoding threads hand them to the forward pass.
    batches = [pre.normalize(torch.stack(u8[i : i + bs])).contiguous().to(args.device) for i in range(0, n, bs)]
    vit, deepest = BareViT(bb), max(layers)
    bf16 = resolve_compute(args.compute, args.device, args.dtype) == "bfloat16"  # what extraction's forward runs

    def bare() -> None:
        with torch.inference_mode(), autocast(args.device, bf16):
            for x in batches:
                vit.to_layer(x, deepest)

    def full(images: int = n) -> float:
        out = Path(tempfile.mkdtemp(prefix="saevctl-bench-"))
        try:
            cfg = Config(model=args.model, images=f"demo:{images}", layers=tuple(layers), out=out / "store",
                         dtype=args.dtype, batch_size=bs, device=args.device, compute=args.compute,
                         **({"n_workers": args.workers} if args.workers else {}))
            t0 = time.perf_counter()
            run(cfg, backbone=bb)
            return time.perf_counter() - t0
        finally:
            shutil.rmtree(out, ignore_errors=True)

    bare()  # warm-up: allocator, thread pool
    full(min(n, bs))  # warm-up: the demo photo cache, the writer
    times = interleave({"bare": bare, "full": full}, repeats, warmup=0, sync=sync(args.device))
    rep = Report("extract", args.quick, model=args.model, images=n, layers=layers, batch_size=bs, dtype=args.dtype,
                 device=args.device, repeats=repeats, compute="bfloat16 autocast" if bf16 else "float32")
    section(f"extract: {n} images, batch {bs}, layers {layers}, store {args.dtype}, {args.device}, {repeats} repeats")
    rep.rate("full", "full extraction (images/s)", times["full"], n, "img/s", ".2f")
    rep.rate("ceiling", f"ceiling: bare forward to block {deepest} (images/s)", times["bare"], n, "img/s", ".2f")
    rep.series_ratio("ratio", "ratio full / bare forward (per repeat)", times["full"], times["bare"], n, n)
    rep.headline("extract images/s", "full", "ceiling", "ratio")
    rep.write(args.json)


if __name__ == "__main__":
    main()
