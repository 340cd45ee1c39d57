"""`saevctl eval splice|edits|recon|baselines|all|card|stability|...`: options from each evaluation's Config (or
--config x.toml), run, print rich tables. Totals for the progress bars come from the library as it learns them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer

from saevctl.cliconfig import config_command
from saevctl.eval.cli.tables import (
    _recon_table,
    baselines_tables,
    card_table,
    edits_tables,
    splice_tables,
    stability_tables,
    vision_tables,
)

if TYPE_CHECKING:
    from saevctl.eval.config import (
        AbsorptionConfig,
        AllConfig,
        BaselinesConfig,
        CardQuery,
        EditsConfig,
        ReconConfig,
        SparseProbeConfig,
        SpatialConfig,
        SpliceConfig,
        StabilityConfig,
    )

eval_app = typer.Typer(
    name="eval",
    help="Evaluate an SAE: behaviour kept when spliced in, specificity of class edits, reconstruction, margins over "
         "null baselines, spatial coherence, sparse probes, absorption, report card; features shared across seeds "
         "and widths.",
    no_args_is_help=True,
)


class _Bars:
    """Progress bars opened as the library announces each stage's total (the previous one closed); a bar shows
    from its first advance, and vanishes on an error so the error line stands alone."""

    def __init__(self) -> None:
        self.cur: contextlib.ExitStack | None = None
        self.advance: Callable[[int], None] | None = None

    def stage(self, name: str, total: int | None, unit: str = "img") -> None:
        from saevctl.console import progress_bar

        self.close(None, None, None)
        self.cur = contextlib.ExitStack()
        self.advance = self.cur.enter_context(progress_bar(name, total, unit))

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


def _configs() -> ModuleType:
    """The stage's Config module, imported only when one of its commands is built (see saevctl.cliconfig)."""
    from saevctl.eval import config

    return config


@config_command(eval_app, "splice", lambda: _configs().SpliceConfig)
def splice_cmd(cfg: SpliceConfig) -> None:
    """Run the head with the SAE's reconstruction in place of its layer's tokens, next to the original and a mean
    ablation."""
    from saevctl.eval.splice import run_splice

    _one_eval(cfg, "splice", "splice", run_splice, splice_tables)


def _one_eval(cfg: Any, kind: str, bar: str, run: Callable[..., Any], tables: Callable[[Any], list[Any]]) -> None:
    """One evaluation command: say so and stop when its summary was made from the same inputs; else run it under
    progress bars, print its tables, record its inputs' fingerprint in the summary and say where it is."""
    from saevctl import rerun
    from saevctl.console import console, say_path

    if (inputs := _kept_or_inputs(cfg, kind)) is None:
        return
    with _Bars() as bars:
        res = run(cfg, progress=bars, on_total=bars.total(bar))
    for item in tables(res):
        console.print(item)
    rerun.record(res.summary, inputs)
    say_path("summary", res.summary)


def _kept_or_inputs(cfg: Any, kind: str) -> str | None:
    """The fingerprint of the evaluation's inputs, or None when its summary already holds their result (then
    printed: the recorded figures for recon, the summary's path for the others)."""
    from saevctl import rerun
    from saevctl.console import console, say_path
    from saevctl.eval import fresh

    inputs = fresh.inputs(cfg)
    fpath = fresh.summary_fpath(cfg, kind)
    data = rerun.kept(fpath, inputs, cfg.force)
    if data is None:
        return inputs
    console.print(f"unchanged: the {kind} summary was made from the same inputs (--force evaluates again)")
    if kind == "recon":
        console.print(_recon_table(data))
    say_path("summary", fpath)
    return None


@config_command(eval_app, "edits", lambda: _configs().EditsConfig)
def edits_cmd(cfg: EditsConfig) -> None:
    """Suppress each labelled class's feature on its patches; share of the class's and of other patches that change.

    Needs --masks and a segment head (saevctl heads train --task segment), or with --level image a classify head
    (e.g. --head timm, the model's own classifier), whose prediction per image is measured.
    Each class's feature comes from the index's labels (saevctl features label) unless --feature names it."""
    from saevctl.eval.edits import run_edits

    _one_eval(cfg, "edits", "edits", run_edits, edits_tables)


@config_command(eval_app, "recon", lambda: _configs().ReconConfig)
def recon_cmd(cfg: ReconConfig) -> None:
    """Reconstruction over a store, streamed: MSE, normalised MSE, L0, dead and dense latents."""
    from saevctl.eval.recon import run_recon

    _one_eval(cfg, "recon", "reconstruction", run_recon, lambda res: [_recon_table(res.figures())])


@config_command(eval_app, "baselines", lambda: _configs().BaselinesConfig)
def baselines_cmd(cfg: BaselinesConfig) -> None:
    """Score null baselines of the SAE's width and L0 (untrained, random decoder, PCA, k-means; built once, cached
    beside the SAE) on every evaluation the inputs allow, and the SAE's margin over the best of them per metric."""
    from saevctl.console import console, say_path
    from saevctl.eval.baselines import run_baselines

    with _Bars() as bars:
        res = run_baselines(cfg, progress=bars, on_stage=bars.stage)
    for item in baselines_tables(res.section):
        console.print(item)
    for name, why in res.skipped.items():
        console.print(f"[yellow]skipped {name}:[/] {why}")
    say_path("summary", res.summary)


@config_command(eval_app, "all", lambda: _configs().AllConfig)
def all_cmd(cfg: AllConfig) -> None:
    """Run every evaluation the inputs allow and write the report card (HTML + JSON); says why any part was skipped."""
    from saevctl.console import console, say_path
    from saevctl.eval.suite import run_all

    with _Bars() as bars:
        res = run_all(cfg, progress=bars, on_stage=bars.stage)
    if res.unchanged:
        console.print("unchanged: the card was made from the same SAE, store, images, masks, head, index and "
                      "options (--force evaluates again)")
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


# --- vision metrics: spatial coherence, sparse probing, absorption ----------------------------------------------


def _vision_cmd(cfg: Any, part: str, title: str) -> None:
    from saevctl.console import console, say_path
    from saevctl.eval.vision import run_part, sections

    with _Bars() as bars:
        res = run_part(cfg, part, progress=bars, on_total=bars.total(part.replace("_", " ")))
    fig, codes = sections(res.scores)[part], res.scores.codes
    head = f"{codes.n_images:,} stored images, layer {codes.layer}, {codes.grid[0]}x{codes.grid[1]} patches"
    if part == "sparse_probe":
        head += (f"; {fig['labels']} labels, {len(fig['classes'])} classes, one against the rest; "
                 f"{fig['n_train']:,} training / {fig['n_test']:,} held-out images; chance 0.5")
    elif part == "absorption":
        head += (f"; {fig['labels']} labels; {fig['n_tested']} of {fig['n_classes']} classes have a feature of "
                 f"image-level AUROC >= {fig['min_auroc']:g}")
    console.print(head)
    for item in vision_tables(part, fig, title):
        console.print(item)
    for note in fig.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    for name, fpath in res.written.items():
        say_path("plot" if name.endswith("plot") else "summary", fpath)


@config_command(eval_app, "spatial", lambda: _configs().SpatialConfig)
def spatial_cmd(cfg: SpatialConfig) -> None:
    """Spatial coherence: each feature's Moran's I on the patch grid, averaged over the images where it fires; the
    distribution over features and a histogram."""
    _vision_cmd(cfg, "spatial", "spatial coherence of the features (1: smooth regions; about 0: scattered)")


@config_command(eval_app, "sparse-probe", lambda: _configs().SparseProbeConfig)
def sparse_probe_cmd(cfg: SparseProbeConfig) -> None:
    """k-sparse probes for image labels (ImageFolder or mask classes) on the SAE's image-level codes, against the same
    probes on the raw activations; held-out balanced accuracy per k (chance 0.5)."""
    _vision_cmd(cfg, "sparse_probe", "k-sparse probes, held-out balanced accuracy (mean [95% bootstrap CI])")


@config_command(eval_app, "absorption", lambda: _configs().AbsorptionConfig)
def absorption_cmd(cfg: AbsorptionConfig) -> None:
    """Feature absorption: how often each class's best feature is silent on its images while a feature with a close
    decoder fires instead."""
    _vision_cmd(cfg, "absorption", "feature absorption (share of a class's images, mean [95% bootstrap CI])")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
