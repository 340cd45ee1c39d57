"""`saevctl extract`: options (or --config x.toml) fill the Config, run with a progress bar, print a rich summary."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from rich.console import Console

    from saevctl.extract.config import Config
    from saevctl.extract.pipeline import Result

app = typer.Typer()


def _configs() -> ModuleType:
    """The stage's Config module, imported only when one of its commands is built (see saevctl.cliconfig)."""
    from saevctl.extract import config

    return config


@config_command(app, "extract", lambda: _configs().Config)
def extract(cfg: Config) -> None:
    """Store a ViT's residual-stream activations at chosen blocks in a resumable, memory-mappable store.

    Under `torchrun --nproc-per-node N -m saevctl extract ...` (or srun) the shards are split over the
    processes; the store is the same as a one-process run's."""
    from saevctl.console import console, progress_bar, say_path
    from saevctl.dist import is_main, shutdown
    from saevctl.extract import run

    # torchrun/srun: other ranks work quietly; rank 0 shows its own share's progress and the summary.
    # On an error the process exits without leaving the group: a clean leave could wait on a dead peer.
    if not is_main():
        run(cfg)
        shutdown()
        return
    with progress_bar("extract", None, "img") as advance:
        result = run(cfg, progress=advance, on_total=advance.set_total)
    shutdown()
    _summary(console, result)
    say_path("store", result.out)


def _summary(console: Console, result: Result) -> None:
    from rich.table import Table

    from saevctl.atomic import fmt_bytes

    m = result.manifest
    cfg = m["config"]
    lay = cfg["model"]["layout"]
    n_tok = lay["grid_h"] * lay["grid_w"]
    t = Table(title="activation store" + (" (already complete)" if result.already_complete else ""), show_header=False)
    t.add_row("model", f"{cfg['model']['spec']} ({cfg['model']['arch']}, d={cfg['model']['d_model']})")
    t.add_row("images", f"{m['n_rows']:,} stored, {m['n_failed']:,} unreadable (listed in images.jsonl)")
    t.add_row("layers", ", ".join(str(x) for x in cfg["layers"]))
    t.add_row("tokens", f"{', '.join(cfg['tokens'])}; {n_tok} patches/image ({lay['grid_h']}x{lay['grid_w']})")
    t.add_row("activations", f"{m['n_rows'] * n_tok * len(cfg['layers']):,} patch vectors, dtype {cfg['dtype']}")
    if result.compute:
        c = result.compute
        errs = ", ".join(f"layer {k} {100 * v:.2f}%" for k, v in c["rel_error_vs_float32"].items())
        t.add_row("compute", f"bfloat16 autocast on {c['device']}; error vs float32 on {c['images_measured']} "
                  f"images: {errs}")
    if cfg.get("masks"):
        sets = [cfg["masks"], *(cfg.get("mask_sets") or [])]
        heads = result.label_sets or [result.labels or {}]
        for i, (entry, head) in enumerate(zip(sets, heads, strict=False)):
            name = f" (set {head.get('name')}{', default' if i == 0 else ''})" if len(sets) > 1 else ""
            t.add_row("labels" if i == 0 else "", f"{head.get('n_labelled_rows', 0):,} images labelled per patch, "
                      f"{len(entry['classes']) - 1} classes, from {entry['dpath']}{name}")
    resumed = f" ({result.resumed_shards} resumed)" if result.resumed_shards and not result.already_complete else ""
    t.add_row("size", f"{fmt_bytes(m['bytes'])} in {len(m['shards'])} shards{resumed}")
    console.print(t)


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
