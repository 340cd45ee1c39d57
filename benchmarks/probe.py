"""Batch-mode probe throughput (decode + SAE edits + 4 resumed passes + head + effect sizes) next to the
bare forward of the same model doing the same passes, measured in the same process.

Usage: python benchmarks/probe.py [--quick] [--model demo] [--head saliency] [--json OUT]
Ceiling: on pre-decoded batches, the model to the SAE's layer once and, from there, the rest of the
model plus the head for the 4 variants a controlled probe needs (before, feature, random feature,
random direction), with no SAE, no image decoding and no statistics. The ratio is probe images/s over
that ceiling. The plain one-pass forward (images/s of model + head) is reported beside it for scale.
Feature frequencies are given directly (as a mined index would), so no frequency pre-pass is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saevctl.data import open_image, resolve_images
from saevctl.edit.heads import describe_model, resolve_head
from saevctl.edit.session import FeatureStats, Prober
from saevctl.probe.batch import BatchConfig, run_batch
from saevctl.sae import SAE, SAEConfig
from saevctl.vit import load_backbone


def make_sae(bb, layer: int, n_latents: int, batches: list[torch.Tensor]) -> SAE:
    """A random SAE normalised on real activations, its biases set so each feature fires on some patches."""
    torch.manual_seed(0)
    acts = bb.forward_to(batches[0], [layer])[layer][:, bb.layout.n_prefix :].reshape(-1, bb.d_model)
    sae = SAE(SAEConfig(bb.d_model, n_latents, model=describe_model(bb), layer=layer))
    sae.set_normalization(acts)
    with torch.no_grad():
        pre = sae.pre_acts(sae.normalize(acts[:4096]))
        sae.b_enc.sub_(pre.quantile(0.98, dim=0))  # ~2% of patches fire per feature
    return sae.to(next(bb.parameters()).device).eval()


@torch.no_grad()
def ceiling(prober: Prober, batches: list[torch.Tensor], n_variants: int) -> float:
    """Seconds for the passes a probe cannot avoid: one prefix, then n_variants suffixes + head per batch."""
    t0 = time.perf_counter()
    for x in batches:
        x_btd = prober.prefix(x)
        prober.outputs(x_btd.repeat(n_variants, 1, 1), chunk=prober.variant_chunk(len(x)))
    return time.perf_counter() - t0


@torch.no_grad()
def plain(prober: Prober, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for x in batches:
        prober.plain(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 images, 3 repeats (about 2 minutes on 2 CPU cores)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--head", default=None, help="default: saliency for demo, else timm")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--n-latents", type=int, default=6144)
    ap.add_argument("--images", type=int, default=None, help="demo images (default 96, quick 32)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timings are the fastest of these (robust to other load)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.images or (32 if args.quick else 96)
    repeats = args.repeats

    bb = load_backbone(args.model, args.device)
    layer = bb.check_layer(args.layer)
    src = resolve_images(f"demo:{n}")
    pre = bb.preprocess
    u8 = [torch.from_numpy(pre.to_uint8(open_image(r.path))) for r in src.records]
    bs = args.batch_size
    batches = [pre.normalize(torch.stack(u8[i : i + bs])).to(args.device) for i in range(0, n, bs)]
    sae = make_sae(bb, layer, args.n_latents, batches)
    head = resolve_head(args.head or ("saliency" if args.model == "demo" else "timm"), bb)
    prober = Prober(sae, bb, head)
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = sae.save(Path(tmp) / "sae")
        with torch.no_grad():
            codes = sae.encode(prober.prefix(batches[0])[:, bb.layout.n_prefix :].reshape(-1, bb.d_model))
        stats = FeatureStats(codes.amax(0).cpu().numpy(), (codes > 0).float().mean(0).cpu().numpy(), "benchmark sample")
        feature = int(np.argsort(stats.freq_s)[len(stats.freq_s) // 2])  # a feature of median frequency
        cfg = BatchConfig(images=f"demo:{n}", clamps=(f"{feature}=2x",), sae=sae_dir, batch_size=bs, n_boot=200,
                          device=args.device, out=Path(tmp) / "b.png")
        ceiling(prober, batches[:1], 4)  # warm-up
        run_batch(dataclasses.replace(cfg, images=f"demo:{bs}"), prober=prober, stats=stats)
        probe_s, ceil_s, plain_s = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = run_batch(cfg, prober=prober, stats=stats)
            probe_s.append(time.perf_counter() - t0)
            ceil_s.append(ceiling(prober, batches, 4))
            plain_s.append(plain(prober, batches))
    value, ceil = n / min(probe_s), n / min(ceil_s)
    out = {
        "metric": "probe_batch_images_per_s",
        "value": round(value, 3),
        "ceiling": round(ceil, 3),
        "ratio": round(value / ceil, 3),
        "plain_forward_images_per_s": round(n / min(plain_s), 3),
        "ratio_to_plain_forward": round(value / (n / min(plain_s)), 3),
        "model": args.model, "head": head.name, "layer": layer, "n_latents": args.n_latents, "images": n,
        "batch_size": bs, "device": args.device, "threads": torch.get_num_threads(), "repeats": repeats,
        "specific": res.specific, "machine": platform.processor() or platform.machine(),
        "probe_s": [round(t, 2) for t in probe_s], "ceiling_s": [round(t, 2) for t in ceil_s],
    }
    print(f"probe batch (4 variants): {value:.2f} img/s | ceiling (same passes, bare model): {ceil:.2f} img/s | "
          f"ratio {value / ceil:.2f}")
    work = (layer + 1 + 4 * (bb.n_blocks - layer - 1)) / bb.n_blocks
    plain_ips = out["plain_forward_images_per_s"]
    print(f"plain one-pass forward: {plain_ips:.2f} img/s (the probe runs {work:.2f}x its blocks)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
