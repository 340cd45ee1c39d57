"""Splice evaluation throughput (decode + mean pass + 3 resumed variants + head + per-image metrics) next to the
bare model doing the passes `eval splice` cannot avoid, at SAE widths 6,144 and 24,576.

Usage: python benchmarks/eval.py [--quick] [--repeats N] [--model demo] [--head saliency] [--json OUT]
Ceiling: on the same pre-decoded batches, the model's own modules (timm's embedding and blocks, the head's network
called directly; no saevctl code): blocks 0..layer once over every batch (the ablation mean, without a store),
then per batch blocks 0..layer once more and, from there, blocks layer+1.., the final norm and the head for the 3
variants (original, spliced, ablated), one at a time on a CPU and all at once on a GPU, as the splice runs them.
No SAE, no decoding, no statistics. Splice and ceiling are timed interleaved over several repeats; figures are
min / median / max with the load average.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from saevctl.edit.session import Prober
from saevctl.eval.splice import SpliceConfig, run_splice

from _bare import plain_forward, resumed_passes, sync
from _timing import Report, interleave, section
from probe import parse, setup  # the probe benchmark's model, batches, random SAEs and options

N_VARIANTS = 3


def splice_fn(prober: Prober, n: int, bs: int, tmp: Path, device: str) -> Callable[[], None]:
    w = prober.sae.cfg.n_latents
    cfg = SpliceConfig(images=f"demo:{n}", sae=prober.sae.save(tmp / f"sae{w}"), batch_size=bs, n_boot=200,
                       device=device, out=tmp / f"s{w}.json")

    def run() -> None:
        run_splice(cfg, prober=prober)

    return run


def main() -> None:
    args = parse(__doc__, "splice")
    bb, layer, batches, probers, vit, head_fn = setup(args)
    n, bs = sum(len(x) for x in batches), len(batches[0])
    on_gpu = args.device.startswith("cuda")
    ceiling = resumed_passes(vit, head_fn, batches, layer, N_VARIANTS, mean_pass=True, on_gpu=on_gpu)
    resumed_passes(vit, head_fn, batches[:1], layer, N_VARIANTS, mean_pass=True, on_gpu=on_gpu)()  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        fns: dict[str, Callable[[], None]] = {"ceiling": ceiling}
        fns |= {f"splice_{w}": splice_fn(p, n, bs, Path(tmp), args.device) for w, p in probers.items()}
        for p in probers.values():  # warm-up: one batch through each SAE
            splice_fn(p, bs, bs, Path(tmp) / "warm", args.device)()
        if not args.quick:
            fns["plain"] = plain_forward(vit, head_fn, batches)
        times = interleave(fns, args.repeats, warmup=0, sync=sync(args.device))
    head = next(iter(probers.values())).head.name
    rep = Report("eval", args.quick, model=args.model, head=head, layer=layer, images=n, batch_size=bs,
                 device=args.device, repeats=args.repeats, widths=list(probers), variants=N_VARIANTS)
    section(f"eval splice: {n} images, batch {bs}, layer {layer}, head {head}, {args.repeats} repeats")
    rep.rate("ceiling", f"ceiling: bare model, 2 prefixes + {N_VARIANTS} suffixes + head", times["ceiling"], n,
             "img/s", ".2f")
    for w in probers:
        rep.rate(f"splice_{w}", f"eval splice, SAE width {w:,} (img/s)", times[f"splice_{w}"], n, "img/s", ".2f")
        rep.series_ratio(f"ratio_{w}", f"ratio, width {w:,}", times[f"splice_{w}"], times["ceiling"], n, n)
    if "plain" in times:
        blocks = (2 * (layer + 1) + N_VARIANTS * (bb.n_blocks - layer - 1)) / bb.n_blocks
        rep.rate("plain", f"plain one-pass forward + head (not a ceiling; splice runs {blocks:.2f}x its blocks)",
                 times["plain"], n, "img/s", ".2f")
    w0 = next(iter(probers))
    rep.headline("eval splice images/s", f"splice_{w0}", "ceiling", f"ratio_{w0}")
    rep.write(args.json)


if __name__ == "__main__":
    main()
