"""`saevctl heads train|list` and `saevctl probe`: parse options (or --config x.toml), run, print rich tables."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from pathlib import Path

    from saevctl.probe.config import BatchConfig, Config, HeadsQuery, HeadTrainConfig, ProbeConfig

app = typer.Typer()
heads_app = typer.Typer(name="heads", help="Task heads a probe reads: train linear heads, list ready and trained ones.",
                        no_args_is_help=True)


def _configs() -> ModuleType:
    """The stage's Config module, imported only when one of its commands is built (see saevctl.cliconfig)."""
    from saevctl.probe import config

    return config


@config_command(heads_app, "train", lambda: _configs().HeadTrainConfig)
def heads_train(cfg: HeadTrainConfig) -> None:
    """Train a linear head on a frozen ViT's final tokens; prints validation accuracy (classify) or mIoU (segment)."""
    from rich.table import Table

    from saevctl.console import console, progress_bar, say_path
    from saevctl.probe.train_head import train_head

    with progress_bar("features", None, "img") as advance:
        res = train_head(cfg, progress=advance, on_total=advance.set_total)
    if res.unchanged:
        console.print("unchanged: the head was trained from the same model, images, masks and options (--force "
                      "trains it again)")
    t = Table(title=f"{res.task} head", show_header=False)
    t.add_row("classes", f"{len(res.classes)}: {', '.join(res.classes[:8])}{' ...' if len(res.classes) > 8 else ''}")
    t.add_row("images", f"{res.n_train} train, {res.n_val} validation")
    for k, v in res.metrics.items():
        t.add_row(k.replace("_", " "), f"{v:.3f}")
    t.add_row("time", f"{res.seconds:.1f} s")
    console.print(t)
    say_path("head", res.out)


@config_command(heads_app, "list", lambda: _configs().HeadsQuery)
def heads_list(cfg: HeadsQuery) -> None:
    """List the ready heads and the trained heads in ./heads (or --dir)."""
    from rich.table import Table

    from saevctl import layout
    from saevctl.console import console
    from saevctl.edit.heads import READY_HEADS, list_heads

    t = Table(title="ready heads (--head NAME)")
    t.add_column("name")
    t.add_column("what")
    for name, what in READY_HEADS.items():
        t.add_row(name, what)
    console.print(t)
    root = cfg.dir or layout.heads_dpath()
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


@config_command(app, "probe", lambda: _configs().ProbeConfig)
def probe(cfg: ProbeConfig) -> None:
    """Clamp SAE features on chosen patches at the SAE's layer, run the rest of the ViT, and compare a head's output."""
    from saevctl import rerun
    from saevctl.edit.clamps import check_clamp_ids
    from saevctl.probe import fresh
    from saevctl.probe.config import BatchConfig  # at run time too: isinstance needs the class

    check_clamp_ids(cfg.clamps, cfg.sae)  # a wrong id fails before the SAE, the ViT and torch load
    one = cfg.pick()
    inputs = fresh.probe_inputs(cfg)
    if isinstance(one, BatchConfig):
        from saevctl.probe.batch import figure_fpath

        figure = figure_fpath(one)
    else:
        from saevctl.probe.probe import default_figure_fpath

        figure = one.out or default_figure_fpath(one.image, one.clamps)
    summary = fresh.single_summary_fpath(figure)  # a batch probe's JSON summary sits there too
    kept = None if cfg.force else rerun.kept(summary, inputs)
    if kept is not None and figure.is_file() and isinstance(kept.get("printed"), str):
        _say_kept(kept["printed"], figure, summary)
        return
    printed = _batch(one) if isinstance(one, BatchConfig) else _single(one, summary)
    rerun.record_extra(summary, {rerun.KEY: inputs, "printed": printed})


def _say_kept(printed: str, figure: Path, summary: Path) -> None:
    from saevctl.console import console, say_path

    console.print("unchanged: this probe ran on the same SAE, head, index, image(s) and edit; its recorded result "
                  "(--force probes again):")
    console.print(printed, markup=False, highlight=False, end="")
    say_path("figure", figure)
    say_path("summary", summary)


def _shown(items: list[Any]) -> str:
    """Print the result's tables and lines; return them as plain text (what a rerun with unchanged inputs shows)."""
    import io

    from rich.console import Console

    from saevctl.console import console

    rec = Console(file=io.StringIO(), width=console.width, record=True)
    for item in items:
        console.print(item)
        rec.print(item)
    return rec.export_text()


def _single(cfg: Config, summary: Path) -> str:
    from saevctl import atomic
    from saevctl.console import say_path
    from saevctl.probe.probe import run

    res = run(cfg)
    printed = _shown(single_tables(res))
    atomic.write_json(summary, {"format": "saevctl-probe", "image": cfg.image, "clamps": list(cfg.clamps),
                                "features": [int(f) for f in res.features], "values": [float(v) for v in res.values],
                                "head": res.head, "task": res.task, "figure": str(res.figure)})
    say_path("figure", res.figure)
    say_path("summary", summary)
    return printed


def _batch(cfg: BatchConfig) -> str:
    from saevctl.console import progress_bar, say_path
    from saevctl.probe.batch import run_batch

    with progress_bar("probe", None, "img") as advance:
        res = run_batch(cfg, progress=advance, on_total=advance.set_total)
    printed = _shown(batch_tables(res))
    say_path("figure", res.figure)
    say_path("summary", res.summary)
    return printed


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
        moved = ("stays at rank 1" if s["top_rank_after"] == 1
                 else f"drops to rank {s['top_rank_after']} (new top: {s['new_top_class']})")
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


def _ci(c: dict[str, Any]) -> str:  # a CI row also names its condition or control
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
        cells = [(c["condition"], c) for c in r["conditions"]]
        cells += [(f"feature − {v['control'].replace('random', 'rand.')}", v) for v in r["vs_controls"]]
        for i, (name, c) in enumerate(cells):
            label = (r["label"] + (" *" if r["magnitude"] else "")) if i == 0 else ""
            t.add_row(label, name, f"{c['mean']:+.4f}", _ci(c), end_section=i == len(cells) - 1)
    out.append(t)
    if res.verdict is not None:
        out += verdict_lines(res.verdict)
    return out


def verdict_lines(v: dict[str, Any]) -> list[str]:
    """The verdict (saevctl.edit.effects.verdict) in colour, with the numbers behind it, and the test it applied."""
    from rich.markup import escape

    from saevctl.edit.effects import verdict_text

    color = {"specific": "green", "too small": "yellow"}.get(v["result"], "red")
    word, _, rest = verdict_text(v).partition(":")
    return [f"[bold {color}]{word}:[/]{escape(rest)}", f"[dim]test: {escape(v['test'])}[/]"]


def register(root: typer.Typer) -> None:
    root.add_typer(heads_app, name="heads")
    root.registered_commands += app.registered_commands
