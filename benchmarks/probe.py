"""Batch-mode probe throughput (decode + SAE edits + 4 resumed passes + head + effect sizes) next to the bare
model doing the passes a probe cannot avoid, at SAE widths 6,144 and 24,576.

Usage: python benchmarks/probe.py [--quick] [--model demo] [--head saliency] [--widths 6144,24576] [--json OUT]
Ceiling: on the same pre-decoded batches, the model's own modules (timm's embedding and blocks, the head's network
called directly; no saevctl code): per batch, blocks 0..layer once, then blocks layer+1.. and the head for each of
the 4 variants a controlled probe runs (before, feature, random feature, random direction), one variant at a time
on a CPU and all at once on a GPU, as the probe batches them. No SAE, no decoding, no statistics. Probe and
ceiling are timed interleaved over several repeats; figures are min / median / max with the load average.
Feature frequencies are given directly (as a mined index would), so no frequency pre-pass is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saevctl.data import open_image, resolve_images
from saevctl.edit.heads import describe_model, resolve_head
from saevctl.edit.session import FeatureStats, Prober
from saevctl.probe.batch import BatchConfig, run_batch
from saevctl.sae import SAE, SAEConfig
from saevctl.vit import Backbone, load_backbone

from _bare import BareViT, head_network, plain_forward, resumed_passes, sync
from _timing import Report, interleave, section

N_VARIANTS = 4


def make_sae(bb: Backbone, layer: int, n_latents: int, batches: list[torch.Tensor]) -> SAE:
    """A random SAE normalised on real activations, its biases set so each feature fires on ~2% of patches."""
    torch.manual_seed(0)
    acts = bb.forward_to(batches[0], [layer])[layer][:, bb.layout.n_prefix :].reshape(-1, bb.d_model)
    sae = SAE(SAEConfig(bb.d_model, n_latents, model=describe_model(bb), layer=layer))
    sae.set_normalization(acts)
    with torch.no_grad():
        pre = sae.pre_acts(sae.normalize(acts[:4096]))
        sae.b_enc.sub_(pre.kthvalue(max(1, int(0.98 * len(pre))), dim=0).values)
    return sae.to(next(bb.parameters()).device).eval()


def load_batches(bb: Backbone, n: int, bs: int, device: str) -> list[torch.Tensor]:
    """Pre-decoded, normalised demo images as contiguous float32 (b, 3, h, w) batches."""
    pre = bb.preprocess
    u8 = [torch.from_numpy(pre.to_uint8(open_image(r.path))) for r in resolve_images(f"demo:{n}").records]
    return [pre.normalize(torch.stack(u8[i : i + bs])).contiguous().to(device) for i in range(0, n, bs)]


def parse(doc: str | None, what: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 images, batch 8, 3 repeats (about a minute on 2 cores)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--head", default=None, help="default: saliency for demo, else timm")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--widths", default="6144,24576", help="SAE widths (latents), comma-separated")
    ap.add_argument("--images", type=int, default=None, help="demo images (default 48, quick 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16, quick 8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help=f"interleaved repeats of {what} and ceiling")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def setup(args: argparse.Namespace) -> tuple[Backbone, int, list[torch.Tensor], dict[int, Prober], BareViT,
                                             Callable[[torch.Tensor], torch.Tensor]]:
    """The model, the batches, one Prober per SAE width, and the bare model with its head network."""
    n, bs = args.images or (8 if args.quick else 48), args.batch_size or (8 if args.quick else 16)
    bb = load_backbone(args.model, args.device)
    layer = bb.check_layer(args.layer)
    batches = load_batches(bb, n, bs, args.device)
    head = resolve_head(args.head or ("saliency" if args.model == "demo" else "timm"), bb)
    probers = {w: Prober(make_sae(bb, layer, w, batches), bb, head) for w in (int(x) for x in args.widths.split(","))}
    vit = BareViT(bb)
    return bb, layer, batches, probers, vit, head_network(head, bb, vit)


def probe_fn(prober: Prober, batches: list[torch.Tensor], n: int, tmp: Path, device: str) -> Callable[[], None]:
    """run_batch over the demo images with an `F=2x` edit of a median-frequency feature and the controls."""
    w = prober.sae.cfg.n_latents
    sae_dir = prober.sae.save(tmp / f"sae{w}")
    with torch.no_grad():
        x_btd = prober.prefix(batches[0])[:, prober.bb.layout.n_prefix :]
        codes = prober.sae.encode(x_btd.reshape(-1, prober.bb.d_model))
    stats = FeatureStats(codes.amax(0).cpu().numpy(), (codes > 0).float().mean(0).cpu().numpy(), "benchmark sample")
    feature = int(np.argsort(stats.freq_s)[len(stats.freq_s) // 2])
    cfg = BatchConfig(images=f"demo:{n}", clamps=(f"{feature}=2x",), sae=sae_dir, batch_size=len(batches[0]),
                      n_boot=200, device=device, out=tmp / f"b{w}.png")
    run_batch(dataclasses.replace(cfg, images=f"demo:{len(batches[0])}"), prober=prober, stats=stats)  # warm-up

    def run() -> None:
        run_batch(cfg, prober=prober, stats=stats)

    return run


def main() -> None:
    args = parse(__doc__, "probe")
    bb, layer, batches, probers, vit, head_fn = setup(args)
    n, bs = sum(len(x) for x in batches), len(batches[0])
    on_gpu = args.device.startswith("cuda")
    ceiling = resumed_passes(vit, head_fn, batches, layer, N_VARIANTS, mean_pass=False, on_gpu=on_gpu)
    resumed_passes(vit, head_fn, batches[:1], layer, N_VARIANTS, mean_pass=False, on_gpu=on_gpu)()  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        fns: dict[str, Callable[[], None]] = {"ceiling": ceiling}
        fns |= {f"probe_{w}": probe_fn(p, batches, n, Path(tmp), args.device) for w, p in probers.items()}
        if not args.quick:
            fns["plain"] = plain_forward(vit, head_fn, batches)
        times = interleave(fns, args.repeats, warmup=0, sync=sync(args.device))
    head = next(iter(probers.values())).head.name
    rep = Report("probe", args.quick, model=args.model, head=head, layer=layer, images=n, batch_size=bs,
                 device=args.device, repeats=args.repeats, widths=list(probers), variants=N_VARIANTS)
    section(f"probe batch: {n} images, batch {bs}, layer {layer}, head {head}, {args.repeats} repeats")
    rep.rate("ceiling", f"ceiling: bare model, 1 prefix + {N_VARIANTS} suffixes + head", times["ceiling"], n, "img/s",
             ".2f")
    for w in probers:
        rep.rate(f"probe_{w}", f"probe, SAE width {w:,} (img/s)", times[f"probe_{w}"], n, "img/s", ".2f")
        rep.series_ratio(f"ratio_{w}", f"ratio, width {w:,}", times[f"probe_{w}"], times["ceiling"], n, n)
    if "plain" in times:
        blocks = (layer + 1 + N_VARIANTS * (bb.n_blocks - layer - 1)) / bb.n_blocks
        rep.rate("plain", f"plain one-pass forward + head (not a ceiling; probe runs {blocks:.2f}x its blocks)",
                 times["plain"], n, "img/s", ".2f")
    w0 = next(iter(probers))
    rep.headline("probe batch images/s", f"probe_{w0}", "ceiling", f"ratio_{w0}")
    rep.write(args.json)


if __name__ == "__main__":
    main()
