"""`saevctl heads train|list` and `saevctl probe`: parse options (or --config x.toml), run, print rich tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

heads_app = typer.Typer(help="Task heads a probe reads: train linear heads, list ready and trained ones.", no_args_is_help=True)


@heads_app.command("train")
def heads_train(
    task: str = typer.Option(None, "--task", "-t", help="classify (labels from ImageFolder subfolders) or segment (PNG masks)."),
    images: str = typer.Option(None, "--images", "-i", help="Image folder (ImageFolder for classify), .txt list of paths, or demo[:N]."),
    model: str = typer.Option(None, "--model", "-m", help="Model spec the head reads (default demo)."),
    masks: Path = typer.Option(None, "--masks", help="segment: folder of PNG masks of class indices, named like the images."),
    class_names: Path = typer.Option(None, "--class-names", help="segment: one class name per line (line i = mask value i), or ADE20K's objectInfo150.csv (default: the mask folder's classes.txt or objectInfo150.csv, as extract --masks reads it)."),
    out: Path = typer.Option(None, "--out", "-o", help="Head folder (default heads/<task>)."),
    layer: int = typer.Option(None, "--layer", "-l", help="Block the head reads; -1 = the final tokens after the model's norm (default)."),
    pool: str = typer.Option(None, "--pool", help="classify: cls, mean or auto (default auto: cls when the model has one)."),
    val_fraction: float = typer.Option(None, "--val-fraction", help="Share of images held out for validation (default 0.2)."),
    epochs: int = typer.Option(None, "--epochs", help="AdamW passes over the cached features (default 300)."),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default 0.01)."),
    ignore_index: int = typer.Option(None, "--ignore-index", help="segment: mask value of unlabelled pixels (default 255)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per forward pass (default 32)."),
    max_images: int = typer.Option(None, "--max-images", help="Use only the first N images."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    seed: int = typer.Option(None, "--seed", help="Seed for the split and the initialisation (default 0)."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options (command-line values win)."),
) -> None:
    """Train a linear head on a frozen ViT's final tokens; prints validation accuracy (classify) or mIoU (segment)."""
    from saevctl.config import load_toml, merge_config
    from saevctl.console import console, progress_bar, say_path
    from saevctl.data import resolve_images
    from saevctl.probe.train_head import HeadTrainConfig, train_head

    given: dict[str, Any] = dict(task=task, images=images, model=model, masks=masks, class_names=class_names, out=out,
                                 layer=layer, pool=pool, val_fraction=val_fraction, epochs=epochs, lr=lr,
                                 ignore_index=ignore_index, batch_size=batch_size, max_images=max_images, device=device,
                                 seed=seed)
    file_values = load_toml(config) if config else {}
    _require(file_values, given, "task", "--task classify or --task segment")
    _require(file_values, given, "images", "--images DIR")
    cfg = merge_config(HeadTrainConfig, file_values, given)
    total = len(resolve_images(cfg.images, cfg.max_images).records)
    with progress_bar("features", total, "img") as advance:
        res = train_head(cfg, progress=advance)
    from rich.table import Table

    t = Table(title=f"{res.task} head", show_header=False)
    t.add_row("classes", f"{len(res.classes)}: {', '.join(res.classes[:8])}{' ...' if len(res.classes) > 8 else ''}")
    t.add_row("images", f"{res.n_train} train, {res.n_val} validation")
    for k, v in res.metrics.items():
        t.add_row(k.replace("_", " "), f"{v:.3f}")
    t.add_row("time", f"{res.seconds:.1f} s")
    console.print(t)
    say_path("head", res.out)


def _require(file_values: dict[str, Any], given: dict[str, Any], key: str, hint: str) -> None:
    from saevctl.errors import InputError

    if given.get(key) is None and key not in file_values:
        raise InputError(f"missing --{key}", f"pass {hint}")


@heads_app.command("list")
def heads_list(
    dir: Path = typer.Option(None, "--dir", help="Folder of trained heads (default ./heads)."),
) -> None:
    """List the ready heads and the trained heads in ./heads (or --dir)."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console
    from saevctl.probe.heads import READY_HEADS, list_heads

    t = Table(title="ready heads (--head NAME)")
    t.add_column("name")
    t.add_column("what")
    for name, what in READY_HEADS.items():
        t.add_row(name, what)
    console.print(t)
    root = dir or layout.heads_dpath()
    found = list_heads(root)
    if not found:
        console.print(f"no trained heads in {root} (make one with saevctl heads train)")
        return
    t = Table(title=f"trained heads in {root} (--head PATH)")
    for col in ("path", "task", "model", "layer", "classes", "metric"):
        t.add_column(col)
    for dpath, h in found:
        metric = ", ".join(f"{k} {v:.3f}" for k, v in h.get("metrics", {}).items() if k.startswith("val"))
        t.add_row(str(dpath), h["task"], h["model"].get("spec", "?"), str(h["layer"]), str(len(h["classes"])), metric)
    console.print(t)


def probe(
    sae: Path = typer.Option(None, "--sae", "-s", help="SAE checkpoint folder (default: the workspace's SAE)."),
    image: str = typer.Option(None, "--image", help="One image file (or skimage:NAME): before/after tables and a PNG."),
    images: str = typer.Option(None, "--images", "-i", help="Batch mode: image folder, .txt list or demo[:N]; effect sizes with controls and CIs."),
    clamp: list[str] = typer.Option(None, "--clamp", "-c", help="FEATURE=VALUE, repeatable or comma-separated: 6909=0 ablates, 6909=3.5 sets, 6909=2x sets twice its max (needs a mined index), top=V edits the image's strongest feature."),
    head: str = typer.Option(None, "--head", help="saliency (demo model), timm (the model's classifier), clip (with --classes), or a trained head folder (default: saliency on demo, else timm)."),
    classes: str = typer.Option(None, "--classes", help='Prompts for --head clip: "a photo of a cat,a photo of a dog".'),
    patches: str = typer.Option(None, "--patches", "-p", help="all, fired (default: where each edited feature fires), r,c;r,c (grid row,column), box:x0,y0,x1,y1 (model-input pixels)."),
    index: Path = typer.Option(None, "--index", help="Mined index for Nx values and control frequencies (default: the workspace's)."),
    out: Path = typer.Option(None, "--out", "-o", help="PNG path (default probes/...); batch mode writes a .json beside it."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Batch mode: images per pass (default 16)."),
    max_images: int = typer.Option(None, "--max-images", help="Batch mode: use only the first N images."),
    controls: bool = typer.Option(None, "--controls/--no-controls", help="Batch mode: run the two controls (default on)."),
    n_boot: int = typer.Option(None, "--n-boot", help="Batch mode: bootstrap resamples (default 1000)."),
    seed: int = typer.Option(None, "--seed", help="Batch mode: seed for controls and bootstrap (default 0)."),
    freq_images: int = typer.Option(None, "--freq-images", help="Batch mode without a mined index: measure firing frequencies on this many images first (default 128)."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options (command-line values win)."),
) -> None:
    """Clamp SAE features on chosen patches at the SAE's layer, run the rest of the ViT, and compare a head's output."""
    from saevctl.config import load_toml, merge_config
    from saevctl.errors import ProbeError

    file_values = load_toml(config) if config else {}
    clamps = tuple(c.strip() for item in (clamp or []) for c in item.split(",") if c.strip()) or None
    common: dict[str, Any] = dict(sae=sae, clamps=clamps, head=head, classes=classes, patches=patches, index=index,
                                  out=out, device=device)
    image = image or file_values.pop("image", None)
    images = images or file_values.pop("images", None)
    if bool(image) == bool(images):
        raise ProbeError("give exactly one of --image (one picture) and --images (batch mode)", "e.g. --image cat.jpg")
    if image:
        from saevctl.probe.probe import Config

        _single(merge_config(Config, file_values, {**common, "image": image}))
    else:
        from saevctl.probe.batch import BatchConfig

        extra = dict(batch_size=batch_size, max_images=max_images, controls=controls, n_boot=n_boot, seed=seed,
                     freq_images=freq_images)
        _batch(merge_config(BatchConfig, file_values, {**common, **extra, "images": images}))


def _single(cfg: Any) -> None:
    from saevctl.console import console, say_path
    from saevctl.probe.probe import run

    res = run(cfg)
    for item in single_tables(res):
        console.print(item)
    say_path("figure", res.figure)


def _batch(cfg: Any) -> None:
    from saevctl.console import console, progress_bar, say_path
    from saevctl.data import resolve_images
    from saevctl.probe.batch import run_batch

    total = len(resolve_images(cfg.images, cfg.max_images).records)
    with progress_bar("probe", total, "img") as advance:
        res = run_batch(cfg, progress=advance)
    for item in batch_tables(res):
        console.print(item)
    say_path("figure", res.figure)
    say_path("summary", res.summary)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def single_tables(res: Any) -> list[Any]:
    """Rich tables for one probe: top-5 before/after (classify) or per-class pixel shares (dense)."""
    from rich.table import Table

    s = res.summary
    edits = ", ".join(f"{f}={v:.4g}" for f, v in zip(res.features, res.values, strict=True))
    head = f"clamp {edits} on {int(res.edited_hw.sum())} patches; head {res.head} ({res.task})"
    out: list[Any] = [head, *[f"[yellow]note:[/] {n}" for n in res.notes]]
    if res.task == "classify":
        for key, title in (("top_before", "top-5 before"), ("top_after", "top-5 after")):
            t = Table(title=title)
            for col in ("class", "before", "after", "Δ", "rank before → after"):
                t.add_column(col, justify="left" if col == "class" else "right")
            for r in s[key]:
                t.add_row(r["class"][:48], _prob(r["before"]), _prob(r["after"]), _signed(r["delta"]),
                          f"{r['rank_before']} → {r['rank_after']}")
            out.append(t)
        moved = "stays at rank 1" if s["top_rank_after"] == 1 else f"drops to rank {s['top_rank_after']} (new top: {s['new_top_class']})"
        out.append(f"top class [bold]{s['top_class']}[/] {moved}; total variation {s['tv']:.3f}")
        return out
    t = Table(title="pixel share per class" if res.task == "segment" else "saliency (p > 0.5)")
    for col in ("class", "before", "after", "Δ"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in s["rows"]:
        t.add_row(r["class"][:48], _pct(r["before"]), _pct(r["after"]), _signed(100 * r["delta"], "%"))
    out.append(t)
    line = f"pixels that changed class: [bold]{_pct(s['changed'])}[/]"
    if res.task == "saliency":
        line += f"; mean saliency {s['mean_before']:.3f} → {s['mean_after']:.3f}; mean |Δ| {s['mad']:.4f}"
    out.append(line)
    return out


def _prob(p: float) -> str:
    return f"{p:.1e}" if 0 < p < 1e-3 else f"{p:.3f}"


def _signed(v: float, unit: str = "") -> str:
    color = "green" if v > 0 else "red" if v < 0 else "white"
    text = f"{v:+.1e}" if 0 < abs(v) < 1e-3 else f"{v:+.3f}"
    return f"[{color}]{text}{unit}[/]"


def _ci(c: dict[str, float]) -> str:
    return f"[{c['lo']:+.4f}, {c['hi']:+.4f}]"


def batch_tables(res: Any) -> list[Any]:
    """Rich table of effect sizes (mean and 95% bootstrap CI) per condition, and the specificity verdict."""
    from rich.table import Table

    edits = ", ".join(f"{f}={v:.4g}" for f, v in zip(res.features, res.values, strict=True))
    out: list[Any] = [f"{res.n_images} images ({res.n_failed} unreadable); the edit touched patches in {res.n_fired}"]
    if res.control_features:
        ctrl = ", ".join(f"{f}={v:.4g}" for f, v in zip(res.control_features, res.control_values, strict=True))
        out.append(f"controls: random feature(s) of similar frequency {ctrl} (frequencies from {res.freq_source}); "
                   "a random direction of the same norm on the same patches")
    out += [f"[yellow]note:[/] {n}" for n in res.notes]
    t = Table(title=f"effect of clamping {edits}")
    t.add_column("metric", ratio=1)
    for col in ("condition", "mean", "95% bootstrap CI"):
        t.add_column(col, justify="left" if col == "condition" else "right", no_wrap=True)
    for r in res.rows:
        cells = [(c["condition"], c) for c in r["conditions"]] + [(f"feature − {v['control'].replace('random', 'rand.')}", v) for v in r["vs_controls"]]
        for i, (name, c) in enumerate(cells):
            label = (r["label"] + (" *" if r["magnitude"] else "")) if i == 0 else ""
            t.add_row(label, name, f"{c['mean']:+.4f}", _ci(c), end_section=i == len(cells) - 1)
    out.append(t)
    if res.specific is True:
        out.append("[bold green]specific:[/] the * effect is larger than both controls' (paired CIs above 0)")
    elif res.specific is False:
        out.append("[bold red]not specific:[/] the * effect is not larger than both controls' (a paired CI reaches 0)")
    return out


def register(app: typer.Typer) -> None:
    app.add_typer(heads_app, name="heads")
    app.command("probe")(probe)
