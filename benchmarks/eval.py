"""Splice evaluation throughput (decode + mean pass + 3 resumed variants + head + per-image metrics) next to the
bare forward of the same model doing the same passes, measured in the same process.

Usage: python benchmarks/eval.py [--quick] [--repeats N] [--model demo] [--head saliency] [--json OUT]
Ceiling: on pre-decoded batches, the passes `eval splice` cannot avoid without a store: the model to the SAE's
layer once for the ablation mean, then once more to the layer and, from there, the rest of the model plus the
head for the 3 variants (original, spliced, ablated), with no SAE, no decoding and no statistics. The ratio is
splice images/s over that ceiling. The plain one-pass forward (model + head) is printed beside it for scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from saevctl.data import open_image, resolve_images
from saevctl.edit.heads import resolve_head
from saevctl.edit.session import Prober
from saevctl.eval.splice import SpliceConfig, run_splice
from saevctl.vit import load_backbone

from probe import make_sae, plain  # the probe benchmark's random SAE and plain forward


@torch.no_grad()
def ceiling(prober: Prober, batches: list[torch.Tensor], n_variants: int) -> float:
    """Seconds for a prefix pass (the mean), then per batch one prefix and n_variants suffixes + head."""
    t0 = time.perf_counter()
    for x in batches:
        prober.prefix(x)
    for x in batches:
        x_btd = prober.prefix(x)
        prober.outputs(x_btd.repeat(n_variants, 1, 1), chunk=prober.variant_chunk(len(x)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 images, 2 repeats (about 3 minutes on 2 CPU cores)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--head", default=None, help="default: saliency for demo, else timm")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--n-latents", type=int, default=6144)
    ap.add_argument("--images", type=int, default=None, help="demo images (default 96, quick 32)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timings are the fastest of these (default 3, quick 2)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (32 if args.quick else 96)
    repeats = args.repeats or (2 if args.quick else 3)

    bb = load_backbone(args.model, args.device)
    layer = bb.check_layer(args.layer)
    pre = bb.preprocess
    u8 = [torch.from_numpy(pre.to_uint8(open_image(r.path))) for r in resolve_images(f"demo:{n}").records]
    bs = args.batch_size
    batches = [pre.normalize(torch.stack(u8[i : i + bs])).to(args.device) for i in range(0, n, bs)]
    sae = make_sae(bb, layer, args.n_latents, batches)
    prober = Prober(sae, bb, resolve_head(args.head or ("saliency" if args.model == "demo" else "timm"), bb))
    splice_s, ceil_s, plain_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = sae.save(Path(tmp) / "sae")
        cfg = SpliceConfig(images=f"demo:{n}", sae=sae_dir, batch_size=bs, n_boot=200, device=args.device,
                           out=Path(tmp) / "s.json")
        ceiling(prober, batches[:1], 3)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = run_splice(cfg, prober=prober)
            splice_s.append(time.perf_counter() - t0)
            ceil_s.append(ceiling(prober, batches, 3))
            plain_s.append(plain(prober, batches))
    value, ceil, plain_ips = n / min(splice_s), n / min(ceil_s), n / min(plain_s)
    out = {
        "metric": "eval_splice_images_per_s", "value": round(value, 3), "ceiling": round(ceil, 3),
        "ratio": round(value / ceil, 3), "plain_forward_images_per_s": round(plain_ips, 3),
        "ratio_of_medians": round(float(np.median(ceil_s) / np.median(splice_s)), 3),
        "ratio_to_plain_forward": round(value / plain_ips, 3), "recovery": res.recovery,
        "model": args.model, "head": prober.head.name, "layer": layer, "n_latents": args.n_latents, "images": n,
        "batch_size": bs, "device": args.device, "threads": torch.get_num_threads(), "repeats": repeats,
        "machine": platform.processor() or platform.machine(),
        "splice_s": [round(t, 2) for t in splice_s], "ceiling_s": [round(t, 2) for t in ceil_s],
    }
    print(f"eval splice (mean pass + 3 variants): {value:.2f} img/s | ceiling (same passes, bare model): "
          f"{ceil:.2f} img/s | ratio {value / ceil:.2f} (of the median times: {out['ratio_of_medians']:.2f})")
    work = (2 * (layer + 1) + 3 * (bb.n_blocks - layer - 1)) / bb.n_blocks
    print(f"plain one-pass forward: {plain_ips:.2f} img/s (the splice runs {work:.2f}x its blocks, the head 3x)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
