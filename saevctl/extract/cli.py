"""`saevctl extract`: parse options (or --config x.toml), build the Config, run, print a rich summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def extract(
    model: str = typer.Option(None, "--model", "-m", help="demo, timm:NAME, local-dir:/path, hf-hub:org/name, open_clip:ARCH/PRETRAINED (default demo)."),
    images: str = typer.Option(None, "--images", "-i", help="Image folder (recursive; ImageFolder labels from subfolders), .txt list of paths, demo[:N] (default demo = 2,048 scikit-image crops), WebDataset tars wds:/path/{000000..000099}.tar, or a Hugging Face dataset hf:NAME[:split] or hf:/saved/folder[:split]."),
    layers: str = typer.Option(None, "--layers", "-l", help="Comma list of blocks to store, 0-based; negative counts from the end (default -1)."),
    out: Path = typer.Option(None, "--out", "-o", help="Store folder; re-running the same command resumes it (default ./store)."),
    tokens: str = typer.Option(None, "--tokens", help="Comma list of token kinds: patches, cls, registers (default patches, plus cls when the model has one)."),
    dtype: str = typer.Option(None, "--dtype", help="float16 (default; refuses values beyond its range), bfloat16 or float32."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per forward pass (default 32)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    max_images: int = typer.Option(None, "--max-images", help="Use only the first N images."),
    images_per_shard: int = typer.Option(None, "--images-per-shard", help="Images per shard, the unit of resume (default 512)."),
    masks: Path = typer.Option(None, "--masks", help="Folder of per-image PNG class masks named <image stem>.png, with classes.txt (or ADE20K's objectInfo150.csv): stores each patch's majority class beside the activations."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options (command-line values win)."),
) -> None:
    """Store a ViT's residual-stream activations at chosen blocks in a resumable, memory-mappable store.

    Under `torchrun --nproc-per-node N -m saevctl extract ...` (or srun) the shards are split over the
    processes; the store is the same as a one-process run's."""
    from saevctl.config import load_toml, merge_config, parse_int_list
    from saevctl.console import console, progress_bar, say_path
    from saevctl.dist import is_main, shutdown
    from saevctl.extract import Config, run

    given: dict[str, Any] = {
        "model": model,
        "images": images,
        "layers": parse_int_list(layers, "--layers") if layers else None,
        "out": out,
        "tokens": tuple(t.strip() for t in tokens.split(",") if t.strip()) if tokens else None,
        "dtype": dtype,
        "batch_size": batch_size,
        "device": device,
        "max_images": max_images,
        "images_per_shard": images_per_shard,
        "masks": masks,
    }
    cfg = merge_config(Config, load_toml(config) if config else {}, given)
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


def _summary(console: Any, result: Any) -> None:
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
    if cfg.get("masks"):
        from saevctl.store import open_store

        head = open_store(result.out).labels_info() or {}
        t.add_row("labels", f"{head.get('n_labelled_rows', 0):,} images labelled per patch, "
                            f"{len(cfg['masks']['classes']) - 1} classes, from {cfg['masks']['dpath']}")
    t.add_row("size", f"{fmt_bytes(m['bytes'])} in {len(m['shards'])} shards" + (f" ({result.resumed_shards} resumed)" if result.resumed_shards and not result.already_complete else ""))
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
