"""`saevctl eval splice|edits|recon|all|card|stability`: options from each evaluation's Config (or --config
x.toml), run, print rich tables. Totals for the progress bars come from the library as it learns them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from saevctl.eval.config import AllConfig, CardQuery, EditsConfig, ReconConfig, SpliceConfig, StabilityConfig

eval_app = typer.Typer(
    name="eval",
    help="Evaluate an SAE: behaviour kept when spliced in, specificity of class edits, reconstruction, report card; "
         "features shared across seeds and widths.",
    no_args_is_help=True,
)


class _Bars:
    """Progress bars opened as the library announces each stage's total (the previous one closed); a bar shows
    from its first advance, and vanishes on an error so the error line stands alone."""

    def __init__(self) -> None:
        self.cur: contextlib.ExitStack | None = None
        self.advance: Callable[[int], None] | None = None

    def stage(self, name: str, total: int | None) -> None:
        from saevctl.console import progress_bar

        self.close(None, None, None)
        self.cur = contextlib.ExitStack()
        self.advance = self.cur.enter_context(progress_bar(name, total, "img"))

    def total(self, name: str) -> Callable[[int], None]:
        """An `on_total` callback that opens the bar `name` sized to the total it is told."""
        return lambda n: self.stage(name, n)

    def __call__(self, n: int) -> None:
        if self.advance is not None:
            self.advance(n)

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(*exc)

    def close(self, *exc: Any) -> None:
        if self.cur is not None:
            self.cur.__exit__(*exc)
            self.cur, self.advance = None, None


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
                      f"{kinds_text(res.kinds)} tokens at layer {res.layer} spliced; "
                      f"ablation mean from {res.mean_source}"]
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


def _configs() -> ModuleType:
    """The stage's Config module, imported only when one of its commands is built (see saevctl.cliconfig)."""
    from saevctl.eval import config

    return config


@config_command(eval_app, "splice", lambda: _configs().SpliceConfig)
def splice_cmd(cfg: SpliceConfig) -> None:
    """Run the head with the SAE's reconstruction in place of its layer's tokens, next to the original and a mean
    ablation."""
    from saevctl.console import console, say_path
    from saevctl.eval.splice import run_splice

    with _Bars() as bars:
        res = run_splice(cfg, progress=bars, on_total=bars.total("splice"))
    for item in splice_tables(res):
        console.print(item)
    say_path("summary", res.summary)


def edits_tables(res: Any, limit: int = 30) -> list[Any]:
    """A rich table: per class, target and other change rates for the feature and the two controls."""
    from rich.table import Table

    out: list[Any] = [f"{res.n_images} masked images ({res.n_unmasked} without a mask skipped, "
                      f"{res.n_failed} unreadable); feature max/frequency from {res.freq_source}"]
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
               "controls: a random feature of similar frequency, and a random direction of the edit's norm, "
               "on the same patches")
    return out


@config_command(eval_app, "edits", lambda: _configs().EditsConfig)
def edits_cmd(cfg: EditsConfig) -> None:
    """Suppress each labelled class's feature on its patches; share of the class's and of other patches that change.

    Needs a segment head (saevctl heads train --task segment) and --masks.
    Each class's feature comes from the index's labels (saevctl features label) unless --feature names it."""
    from saevctl.console import console, say_path
    from saevctl.eval.edits import run_edits

    with _Bars() as bars:
        res = run_edits(cfg, progress=bars, on_total=bars.total("edits"))
    for item in edits_tables(res):
        console.print(item)
    say_path("summary", res.summary)


def recon_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [("MSE (normalised, per element)", _fmt(r["mse"])), ("normalised MSE (FVU)", _fmt(r["nmse"])),
            ("L0", _fmt(r["l0"])), ("dead", _fmt(r["dead"], pct=True)),
            ("dense (> 1% of tokens)", _fmt(r["dense"], pct=True))]


@config_command(eval_app, "recon", lambda: _configs().ReconConfig)
def recon_cmd(cfg: ReconConfig) -> None:
    """Reconstruction over a store, streamed: MSE, normalised MSE, L0, dead and dense latents."""
    from rich.table import Table

    from saevctl.console import console, say_path
    from saevctl.eval.recon import run_recon

    with _Bars() as bars:
        res = run_recon(cfg, progress=bars, on_total=bars.total("reconstruction"))
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


@config_command(eval_app, "all", lambda: _configs().AllConfig)
def all_cmd(cfg: AllConfig) -> None:
    """Run every evaluation the inputs allow and write the report card (HTML + JSON); says why any part was skipped."""
    from saevctl.console import console, say_path
    from saevctl.eval.suite import run_all

    with _Bars() as bars:
        res = run_all(cfg, progress=bars, on_stage=bars.stage)
    for item in card_table(res.figures):
        console.print(item)
    say_path("card", res.card)
    say_path("card data", res.card_json)


@config_command(eval_app, "card", lambda: _configs().CardQuery)
def card_cmd(cfg: CardQuery) -> None:
    """Print the report card that eval all last wrote for an SAE (no computation)."""
    from saevctl import layout
    from saevctl.console import console, say_path
    from saevctl.eval.card import find_card

    dpath, figures = find_card(cfg)
    for item in card_table(figures):
        console.print(item)
    say_path("card", layout.eval_card_fpath(dpath))


def stability_tables(res: Any) -> list[Any]:
    """Two matrix tables (decoder, encoder): per pair, the share of the narrower SAE's features whose one-to-one
    partner exceeds each threshold; then a line per pair of different widths for the nested (split) view."""
    from rich.table import Table

    from saevctl.eval.stability import THRESHOLDS

    keys = [f">{t:g}" for t in THRESHOLDS]
    out: list[Any] = []
    for kind, attr in (("decoder", "dec"), ("encoder", "enc")):
        t = Table(title=f"{kind} directions: features with a partner at cosine {' / '.join(keys)}")
        t.add_column("SAE (latents)")
        for name in res.names:
            t.add_column(name, justify="right")
        for i, (name, width) in enumerate(zip(res.names, res.widths, strict=True)):
            cells = ["-" if i == j else " / ".join(_fmt(getattr(res.pair(i, j), attr)[k], pct=True) for k in keys)
                     for j in range(len(res.names))]
            t.add_row(f"{name} ({width:,})", *cells)
        out.append(t)
    for p in res.pairs:
        if p.nested:
            n = p.nested
            hist = ", ".join(f"{k}: {v}" for k, v in n["histogram"].items())
            out.append(f"nested {n['narrow']} in {n['wide']}: {n['mean']:.2f} wide features per narrow one at "
                       f"cosine > {n['threshold']:g} ({_fmt(n['split'], pct=True)} split into 2+; counts {hist})")
    return out


@config_command(eval_app, "stability", lambda: _configs().StabilityConfig)
def stability_cmd(cfg: StabilityConfig) -> None:
    """Match the features of two or more SAEs (other seeds or widths) one to one by direction; share of features
    with a partner, decoder and encoder, and how wider SAEs split the narrower one's features."""
    from saevctl.console import console, say_path
    from saevctl.eval.stability import run_stability

    res = run_stability(cfg)
    for item in stability_tables(res):
        console.print(item)
    say_path("summary", res.summary)
    say_path("plot", res.plot)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
