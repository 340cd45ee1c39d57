"""`saevctl eval splice|edits|recon|all`: parse options (or --config x.toml), run, print rich tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

eval_app = typer.Typer(
    help="Evaluate an SAE: behaviour kept when spliced in, specificity of class edits, reconstruction, report card.",
    no_args_is_help=True,
)

SAE_HELP = "SAE checkpoint folder (default: the workspace's SAE)."
HEAD_HELP = "saliency (demo model), timm, clip (with --classes), or a trained head folder (default: saliency on demo, else timm)."
IMAGES_HELP = "Image folder (ImageFolder labels give classify accuracy), .txt list of paths, or demo[:N]."
MASKS_HELP = "Mask folder with its class-name file (see saevctl extract --masks)."
INDEX_HELP = "Mined index holding the SAE (default: the workspace's); outputs go beside it so saevctl report links them."
CONFIG_HELP = "TOML file with any of these options (command-line values win)."


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def _ci(c: dict[str, Any], pct: bool = False) -> str:
    return f"{_fmt(c['mean'], pct)} [{_fmt(c['lo'], pct)}, {_fmt(c['hi'], pct)}]"


def splice_tables(res: Any) -> list[Any]:
    """A rich table: each metric for the original, spliced and ablated model, and the fraction recovered."""
    from rich.table import Table

    from saevctl.eval.common import kinds_text

    out: list[Any] = [f"{res.n_images} images ({res.n_failed} unreadable); head {res.head} ({res.task}); "
                      f"{kinds_text(res.kinds)} tokens at layer {res.layer} spliced; ablation mean from {res.mean_source}"]
    out += [f"[yellow]note:[/] {n}" for n in res.notes]
    t = Table(title="behaviour kept with the SAE spliced in (mean [95% bootstrap CI])")
    t.add_column("metric", ratio=1)
    for col in ("original", "spliced", "ablated", "recovered"):
        t.add_column(col, justify="right")
    for r in res.rows:
        t.add_row(r["label"], *(_ci(r[v]) for v in ("original", "spliced", "ablated")), _ci(r["recovery"], pct=True))
    out.append(t)
    out.append(f"[bold]fraction of performance recovered: {_fmt(res.recovery, pct=True)}[/] "
               "((spliced - ablated) / (original - ablated), first metric)")
    return out


@eval_app.command("splice")
def splice_cmd(
    images: str = typer.Option(None, "--images", "-i", help=IMAGES_HELP),
    sae: Path = typer.Option(None, "--sae", "-s", help=SAE_HELP),
    head: str = typer.Option(None, "--head", help=HEAD_HELP),
    classes: str = typer.Option(None, "--classes", help='Prompts for --head clip: "a photo of a cat,a photo of a dog".'),
    masks: Path = typer.Option(None, "--masks", help="Segment heads: " + MASKS_HELP + " Gives mIoU; without it, agreement with the original."),
    store: Path = typer.Option(None, "--store", help="Store of the SAE's model: the ablation mean comes from it (default: a first pass over the images)."),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="JSON summary path (default: splice.json in the SAE's eval folder)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per pass (default 16)."),
    max_images: int = typer.Option(None, "--max-images", help="Use only the first N images."),
    n_boot: int = typer.Option(None, "--n-boot", help="Bootstrap resamples (default 1000)."),
    seed: int = typer.Option(None, "--seed", help="Bootstrap seed (default 0)."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Run the head with the SAE's reconstruction in place of its layer's tokens, next to the original and a mean ablation."""
    from saevctl.eval.splice import SpliceConfig

    given = dict(images=images, sae=sae, head=head, classes=classes, masks=masks, store=store, index=index, out=out,
                 device=device, batch_size=batch_size, max_images=max_images, n_boot=n_boot, seed=seed)
    cfg = _build(SpliceConfig, config, given, ("images", "--images DIR"))
    run_splice_cli(cfg)


def run_splice_cli(cfg: Any) -> Any:
    from saevctl.console import console, progress_bar, say_path
    from saevctl.data import resolve_images
    from saevctl.eval.splice import run_splice

    n = len(resolve_images(cfg.images, cfg.max_images).records)
    with progress_bar("splice", n if cfg.store else 2 * n, "img") as advance:
        res = run_splice(cfg, progress=advance)
    for item in splice_tables(res):
        console.print(item)
    say_path("summary", res.summary)
    return res


def edits_tables(res: Any, limit: int = 30) -> list[Any]:
    """A rich table: per class, target and other change rates for the feature and the two controls."""
    from rich.table import Table

    out: list[Any] = [f"{res.n_images} masked images ({res.n_unmasked} without a mask skipped, {res.n_failed} unreadable); "
                      f"feature max/frequency from {res.freq_source}"]
    out += [f"[yellow]note:[/] {n}" for n in res.notes]
    conds = list(res.overall["conditions"])
    t = Table(title="edit specificity: share of patches whose predicted class changes (mean [95% bootstrap CI])")
    t.add_column("class (feature, AUROC, set to)", ratio=1)
    for col in ("condition", "target", "other"):
        t.add_column(col, justify="left" if col == "condition" else "right", no_wrap=True)
    shown = sorted(res.rows[:-1], key=lambda r: -r["n_target"])[:limit]
    for r in [*shown, res.overall]:
        if r is res.overall:
            label = f"all {r['n_classes']} classes"
        else:
            auroc = f", AUROC {r['auroc']:.3f}" if r.get("auroc") is not None else ""
            label = f"{r['class']} ({r['feature']}{auroc}, {r['value']:.3g})"
        for i, c in enumerate(conds):
            t.add_row(label if i == 0 else "", c, _ci(r["conditions"][c]["target"], pct=True),
                      _ci(r["conditions"][c]["other"], pct=True), end_section=i == len(conds) - 1)
    out.append(t)
    if len(res.rows) - 1 > limit:
        out.append(f"{len(res.rows) - 1 - limit} more classes in the JSON summary")
    out.append("target: patches predicted as the class before the edit; other: all other patches of those images. "
               "controls: a random feature of similar frequency, and a random direction of the edit's norm, on the same patches")
    return out


@eval_app.command("edits")
def edits_cmd(
    images: str = typer.Option(None, "--images", "-i", help="Image folder, .txt list of paths, or demo[:N] (images without a mask are skipped)."),
    masks: Path = typer.Option(None, "--masks", help=MASKS_HELP),
    sae: Path = typer.Option(None, "--sae", "-s", help=SAE_HELP),
    head: str = typer.Option(None, "--head", help="A segment head folder (saevctl heads train --task segment)."),
    index: Path = typer.Option(None, "--index", help="Mined index labelled by saevctl features label (default: the workspace's): each class's best feature, feature max and frequency."),
    feature: list[str] = typer.Option(None, "--feature", "-f", help="CLASS=FEATURE (class name or mask id), repeatable: test these pairs instead of the index's labels."),
    min_auroc: float = typer.Option(None, "--min-auroc", help="Test classes whose best patch feature reaches this AUROC (default 0.8)."),
    value: str = typer.Option(None, "--value", help="What the feature is set to on the class's patches: Nx (times its max) or a number (default -2x)."),
    controls: bool = typer.Option(None, "--controls/--no-controls", help="Run the two controls (default on)."),
    out: Path = typer.Option(None, "--out", "-o", help="JSON summary path (default: edits.json in the SAE's eval folder)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per pass (default 16)."),
    max_images: int = typer.Option(None, "--max-images", help="Use only the first N images."),
    n_boot: int = typer.Option(None, "--n-boot", help="Bootstrap resamples (default 1000)."),
    seed: int = typer.Option(None, "--seed", help="Seed for controls and bootstrap (default 0)."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Suppress each labelled class's feature on its patches; share of the class's and of other patches that change."""
    from saevctl.eval.edits import EditsConfig

    feats = tuple(x.strip() for item in (feature or []) for x in item.split(",") if x.strip()) or None
    given = dict(images=images, masks=masks, sae=sae, head=head, index=index, features=feats, min_auroc=min_auroc,
                 value=value, controls=controls, out=out, device=device, batch_size=batch_size, max_images=max_images,
                 n_boot=n_boot, seed=seed)
    cfg = _build(EditsConfig, config, given, ("images", "--images DIR"), ("masks", "--masks DIR"))
    run_edits_cli(cfg)


def run_edits_cli(cfg: Any) -> Any:
    from saevctl.console import console, progress_bar, say_path
    from saevctl.data import resolve_images
    from saevctl.eval.edits import run_edits

    n = len(resolve_images(cfg.images, cfg.max_images).records)
    with progress_bar("edits", n, "img") as advance:
        res = run_edits(cfg, progress=advance)
    for item in edits_tables(res):
        console.print(item)
    say_path("summary", res.summary)
    return res


def recon_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [("MSE (normalised, per element)", _fmt(r["mse"])), ("normalised MSE (FVU)", _fmt(r["nmse"])),
            ("L0", _fmt(r["l0"])), ("dead", _fmt(r["dead"], pct=True)), ("dense (> 1% of tokens)", _fmt(r["dense"], pct=True))]


@eval_app.command("recon")
def recon_cmd(
    sae: Path = typer.Option(None, "--sae", "-s", help=SAE_HELP),
    store: Path = typer.Option(None, "--store", help="Activation store of the SAE's model and layer (default: the store it was trained on)."),
    index: Path = typer.Option(None, "--index", help=INDEX_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="JSON summary path (default: recon.json in the SAE's eval folder)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Tokens encoded at once (default 4096)."),
    max_images: int = typer.Option(None, "--max-images", help="Use only the first N stored images."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Reconstruction over a store, streamed: MSE, normalised MSE, L0, dead and dense latents."""
    from rich.table import Table

    from saevctl.console import console, progress_bar, say_path
    from saevctl.eval.recon import ReconConfig, run_recon

    given = dict(sae=sae, store=store, index=index, out=out, device=device, batch_tokens=batch_tokens, max_images=max_images)
    cfg = _build(ReconConfig, config, given)
    with progress_bar("reconstruction", None, "img") as advance:
        res = run_recon(cfg, progress=advance, on_total=advance.set_total)  # type: ignore[attr-defined]
    t = Table(title=f"reconstruction on {res.n_tokens:,} tokens of {res.n_images:,} images", show_header=False)
    for k, v in recon_rows(res.figures()):
        t.add_row(k, v)
    console.print(t)
    say_path("summary", res.summary)


def card_table(card: dict[str, Any]) -> list[Any]:
    """The report card (card.json's content) as one rich table of what ran, then a line per skipped part."""
    from rich.table import Table

    t = Table(title=f"SAE report card: {card['sae']['name']}")
    for col in ("part", "figure", "value"):
        t.add_column(col, justify="right" if col == "value" else "left")
    sec = card["sections"]
    if sec.get("recon"):
        for i, (k, v) in enumerate(recon_rows(sec["recon"])):
            t.add_row("reconstruction" if i == 0 else "", k, v, end_section=i == 4)
    if sec.get("splice"):
        sp, first = sec["splice"], sec["splice"]["metrics"][0]
        t.add_row("splice", f"{first['label']}: original / spliced / ablated",
                  " / ".join(_fmt(first[v]["mean"]) for v in ("original", "spliced", "ablated")))
        t.add_row("", f"recovered ({sp['head']})", _ci(first["recovery"], pct=True), end_section=True)
    if sec.get("coverage"):
        c = sec["coverage"]
        t.add_row("label coverage", f"classes with a feature of AUROC >= {c['min_auroc']:g}",
                  f"{_fmt(c['coverage'], pct=True)} ({c['n_covered']}/{c['n_classes']})", end_section=True)
    if sec.get("edits"):
        overall = sec["edits"]["classes"][-1]
        for i, (cond, v) in enumerate(overall["conditions"].items()):
            t.add_row("edits" if i == 0 else "", f"{cond}: target / other change",
                      f"{_fmt(v['target']['mean'], pct=True)} / {_fmt(v['other']['mean'], pct=True)}")
    out: list[Any] = [t]
    out += [f"[yellow]skipped {name}:[/] {why}" for name, why in card["skipped"].items()]
    return out


class _StageBars:
    """One progress bar per stage of `eval all`, opened when the stage announces its image count."""

    def __init__(self) -> None:
        import contextlib

        self.cur: contextlib.ExitStack | None = None
        self.advance: Any = None

    def stage(self, name: str, total: int | None) -> None:
        import contextlib

        from saevctl.console import progress_bar

        self.close()
        self.cur = contextlib.ExitStack()
        self.advance = self.cur.enter_context(progress_bar(name, total, "img"))

    def __call__(self, n: int) -> None:
        if self.advance is not None:
            self.advance(n)

    def close(self, *exc: Any) -> None:
        if self.cur is not None:
            self.cur.__exit__(*(exc or (None, None, None)))
            self.cur = None


@eval_app.command("all")
def all_cmd(
    sae: Path = typer.Option(None, "--sae", "-s", help=SAE_HELP),
    store: Path = typer.Option(None, "--store", help="Store for reconstruction and the ablation mean (default: the SAE's training store)."),
    head: str = typer.Option(None, "--head", help=HEAD_HELP + " A segment head also runs the edits."),
    classes: str = typer.Option(None, "--classes", help="Prompts for --head clip."),
    images: str = typer.Option(None, "--images", "-i", help="Images for the splice and the edits (without: both skipped)."),
    masks: Path = typer.Option(None, "--masks", help=MASKS_HELP + " Segment heads: mIoU and the edits."),
    index: Path = typer.Option(None, "--index", help="Mined index holding the SAE (default: the workspace's): label coverage, the edits' features; the card goes beside it."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder of the card and summaries (default: beside the index, else ./eval/<name>)."),
    min_auroc: float = typer.Option(None, "--min-auroc", help="A class is covered when its best patch feature reaches this AUROC (default 0.8)."),
    value: str = typer.Option(None, "--value", help="Edits: value of each class's feature on its patches (default -2x)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per pass (default 16)."),
    max_images: int = typer.Option(None, "--max-images", help="Splice and edits: use only the first N images."),
    recon_max_images: int = typer.Option(None, "--recon-max-images", help="Reconstruction: use only the first N stored images."),
    n_boot: int = typer.Option(None, "--n-boot", help="Bootstrap resamples (default 1000)."),
    seed: int = typer.Option(None, "--seed", help="Seed for controls and bootstraps (default 0)."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Run every evaluation the inputs allow and write the report card (HTML + JSON); says why any part was skipped."""
    import sys

    from saevctl.console import console, say_path
    from saevctl.eval.suite import AllConfig, run_all

    given = dict(sae=sae, store=store, head=head, classes=classes, images=images, masks=masks, index=index, out=out,
                 min_auroc=min_auroc, value=value, device=device, batch_size=batch_size, max_images=max_images,
                 recon_max_images=recon_max_images, n_boot=n_boot, seed=seed)
    cfg = _build(AllConfig, config, given)
    bars = _StageBars()
    try:
        res = run_all(cfg, progress=bars, on_stage=bars.stage)
    except BaseException:
        bars.close(*sys.exc_info())
        raise
    bars.close()
    for item in card_table(res.figures):
        console.print(item)
    say_path("card", res.card)
    say_path("card data", res.card_json)


@eval_app.command("card")
def card_cmd(
    sae: Path = typer.Option(None, "--sae", "-s", help=SAE_HELP),
    index: Path = typer.Option(None, "--index", help="Mined index the card was written beside (default: the workspace's)."),
    out: Path = typer.Option(None, "--out", "-o", help="The folder eval all wrote to, when it was given --out."),
) -> None:
    """Print the report card that eval all last wrote for an SAE (no computation)."""
    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.eval import card, common
    from saevctl.probe.session import resolve_sae_path

    dpath = out if out is not None else common.out_dpath(resolve_sae_path(sae), index)
    figures = card.read_card(dpath)
    for item in card_table(figures):
        console.print(item)
    say_path("card", layout.eval_card_fpath(dpath))


def _build(cls: Any, config: Path | None, given: dict[str, Any], *required: tuple[str, str]) -> Any:
    from saevctl.config import load_toml, merge_config
    from saevctl.errors import InputError

    file_values = load_toml(config) if config else {}
    for key, hint in required:
        if given.get(key) is None and key not in file_values:
            raise InputError(f"missing --{key.replace('_', '-')}", f"pass {hint}")
    return merge_config(cls, file_values, given)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
