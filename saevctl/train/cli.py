"""`saevctl train`: parse options (or --config sweep.toml), build the Config, run, print a table and plot paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    from saevctl.errors import InputError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise InputError(f"bad {what} {text!r}", f"write {what} as comma-separated numbers, e.g. 1e-4,3e-4") from e


def _strs(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def train(
    store: Path = typer.Option(None, "--store", "-s", help="Activation store made by saevctl extract (default ./store)."),
    layer: int = typer.Option(None, "--layer", "-l", help="Stored block to train on (default: the store's last layer)."),
    tokens: str = typer.Option(None, "--tokens", help="patches (default), cls, or both."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder: one checkpoint folder per SAE + metrics, plots, sweep.json (default ./sae)."),
    activation: str = typer.Option(None, "--activation", "-a", help="relu (L1, default), topk, batchtopk; a comma list sweeps."),
    width: str = typer.Option(None, "--width", "-w", help="Latents as a multiple of d (16x, default) or a count; comma list sweeps."),
    lr: str = typer.Option(None, "--lr", help="Adam learning rate(s), comma list sweeps (default 3e-4)."),
    sparsity: str = typer.Option(None, "--sparsity", help="L1 coefficient(s) for relu, comma list sweeps (default 8e-4)."),
    k: str = typer.Option(None, "--k", help="Active latents per token for topk/batchtopk, comma list sweeps (default 32)."),
    matryoshka: str = typer.Option(None, "--matryoshka", help="Nested prefix sizes (fractions of the width or counts), e.g. 0.0625,0.25."),
    n_tokens: int = typer.Option(None, "--n-tokens", help="Activations to train on (default: one pass over the store)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Activations per step (default 4096)."),
    lr_warmup: int = typer.Option(None, "--lr-warmup", help="Warmup steps (default 200)."),
    lr_decay: str = typer.Option(None, "--lr-decay", help="cosine (default), linear or constant."),
    sparsity_warmup: int = typer.Option(None, "--sparsity-warmup", help="Steps over which the L1 coefficient ramps up (default 500)."),
    seed: int = typer.Option(None, "--seed", help="Seed for init and data order (default 0)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    dtype: str = typer.Option(None, "--dtype", help="float32 (default) or bfloat16 matmuls."),
    impl: str = typer.Option(None, "--impl", help="fast (default) or reference (plain, for checking)."),
    log_every: int = typer.Option(None, "--log-every", help="Steps between metric records (default 50)."),
    ckpt_every: int = typer.Option(None, "--ckpt-every", help="Steps between resumable checkpoints (default 1000)."),
    aux_coef: float = typer.Option(None, "--aux-coef", help="AuxK loss weight for topk/batchtopk (default 1/32)."),
    dead_after: int = typer.Option(None, "--dead-after", help="Tokens without firing before a latent counts as dead (default 1,000,000)."),
    buffer_rows: int = typer.Option(None, "--buffer-rows", help="Activations in the shuffle buffer (default 131,072)."),
    drop_cache: bool = typer.Option(None, "--drop-cache/--keep-cache", help="Evict store pages from the page cache once read (default: only for one process on a store larger than half the RAM)."),
    place_sweep: str = typer.Option(None, "--place-sweep", help="Under torchrun: data (default; each SAE data-parallel over all processes) or ranks (a sweep's SAEs spread over processes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    wandb: bool = typer.Option(False, "--wandb", help="Also log to Weights & Biases (WANDB_MODE=offline works)."),
    config: Path = typer.Option(None, "--config", help="TOML file with any of these options; lists are sweep axes."),
) -> None:
    """Train sparse autoencoders on a stored layer; every combination of the listed values in one data pass.
    Multi-process: torchrun --nproc-per-node N -m saevctl train ... (see docs/train.md)."""
    from saevctl.config import load_toml, merge_config
    from saevctl.console import say_path
    from saevctl.train import Config

    given: dict[str, Any] = {
        "store": store, "layer": layer, "tokens": tokens, "out": out,
        "activation": _strs(activation), "width": _strs(width), "lr": _floats(lr, "--lr"),
        "sparsity": _floats(sparsity, "--sparsity"), "k": _floats(k, "--k"),
        "matryoshka": _floats(matryoshka, "--matryoshka"), "n_tokens": n_tokens, "batch_size": batch_size,
        "lr_warmup": lr_warmup, "lr_decay": lr_decay, "sparsity_warmup": sparsity_warmup, "seed": seed,
        "device": device, "dtype": dtype, "impl": impl, "log_every": log_every, "ckpt_every": ckpt_every,
        "aux_coef": aux_coef, "dead_after": dead_after, "buffer_rows": buffer_rows,
        "resume": resume or None, "wandb": wandb or None, "place_sweep": place_sweep, "drop_cache": drop_cache,
    }
    if given["k"] is not None:
        given["k"] = tuple(int(v) for v in given["k"])
    cfg = merge_config(Config, load_toml(config) if config else {}, given)
    from saevctl.dist import is_main, shutdown

    if not is_main():  # under torchrun only rank 0 shows the bar and the summary
        from saevctl.train import run

        run(cfg)
        shutdown()
        return
    result = _run_with_bar(cfg)
    shutdown()
    _summary(result)
    for png in result.plots:
        say_path("plot", png)
    say_path("sweep", cfg.out / "sweep.json")
    for r in result.runs:
        say_path("sae", r["path"])


def _run_with_bar(cfg: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from saevctl.console import RateColumn, err_console
    from saevctl.train import run
    from saevctl.train.config import expand
    from saevctl.train.setup import open_data

    data = open_data(cfg)
    n_steps = max(1, (cfg.n_tokens or data.loader.n_rows) // cfg.batch_size)
    n_saes = len(expand(cfg, data.d))
    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), RateColumn("step"),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}")]
    with Progress(*cols, console=err_console) as prog:
        task = prog.add_task("train", total=n_steps, metrics=f"{n_saes} SAE(s)")

        def progress(n: int, records: list[dict[str, Any]] | None) -> None:
            fields = {}
            if records:
                r = records[0]
                more = f" (+{len(records) - 1} more)" if len(records) > 1 else ""
                fields["metrics"] = (f"{r['run']}: fvu {r['fvu']:.3f} L0 {r['l0']:.1f} "
                                     f"dead {r['dead']:.1%} dense {r['dense']:.1%}{more}")
            prog.update(task, advance=n, **fields)

        result = run(cfg, progress=progress)
        if result.resumed_from == result.n_steps:
            prog.update(task, completed=n_steps, metrics="already complete")
    return result


def _summary(result: Any) -> None:
    from rich.table import Table

    from saevctl.console import console

    t = Table(title=f"SAEs trained ({result.n_steps:,} steps" + (
        f", resumed at {result.resumed_from:,})" if result.resumed_from else ")"))
    for col in ("run", "width", "lr", "L1 / k", "MSE", "FVU", "L0", "dead", "dense"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in result.runs:
        f = r.get("final") or {}
        knob = f"{r['sparsity']:g}" if r["activation"] == "relu" else f"k={r['k']}"
        num = lambda key, fmt: format(f[key], fmt) if key in f else "-"  # noqa: E731
        t.add_row(r["name"], f"{r['n_latents']:,}", f"{r['lr']:g}", knob, num("mse", ".4f"), num("fvu", ".4f"),
                  num("l0", ".1f"), num("dead", ".1%"), num("dense", ".1%"))
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
