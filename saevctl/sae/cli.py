"""`saevctl sae import` (saev sae.pt, SAELens/sparsify folders -> our checkpoint) and `saevctl sae info CKPT`."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer

from saevctl.cliconfig import config_command

if TYPE_CHECKING:
    from saevctl.sae.config import ImportConfig

sae_app = typer.Typer(help="Inspect SAE checkpoints and import SAEs made by other tools.", no_args_is_help=True)


def _configs() -> ModuleType:
    """The stage's Config module, imported only when one of its commands is built (see saevctl.cliconfig)."""
    from saevctl.sae import config

    return config


@config_command(sae_app, "import", lambda: _configs().ImportConfig)
def import_(cfg: ImportConfig) -> None:
    """Convert an SAE from the reference saev project or SAELens/sparsify into a saevctl checkpoint."""
    from saevctl.console import say_path
    from saevctl.sae.convert import import_sae

    dpath = import_sae(cfg.src, cfg.out, cfg.layer)
    _info_table(dpath)
    say_path("sae", dpath)


# `info` takes one path and no settings, so it needs no Config.
@sae_app.command("info")
def info(ckpt: Path = typer.Argument(..., help="Checkpoint folder (or a one-SAE saevctl train --out folder).")) -> None:
    """Print an SAE's architecture, shapes, normalisation and training provenance."""
    _info_table(ckpt)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _info_table(ckpt: Path) -> None:
    from rich.table import Table

    from saevctl.console import console
    from saevctl.sae import SAE

    sae = SAE.load(ckpt)
    cfg, h = sae.cfg, sae.header
    t = Table(title=f"SAE {ckpt}", show_header=False)
    act = cfg.activation + (f" (k={cfg.k})" if cfg.k else "")
    if cfg.activation == "batchtopk":
        act += f", inference threshold {float(sae.threshold):.4g}"
    t.add_row("architecture", act + (f", matryoshka prefixes {list(cfg.matryoshka)}" if cfg.matryoshka else ""))
    t.add_row("shapes", f"d={cfg.d}, latents={cfg.n_latents:,} ({cfg.n_latents / cfg.d:g}x); "
              f"W_enc {tuple(sae.W_enc.shape)}, W_dec {tuple(sae.W_dec.shape)}")
    identity = bool((sae.act_mean == 0).all()) and float(sae.act_scale) == 1.0
    t.add_row("normalisation", "none (identity)" if identity else
              f"x_norm = (x - mean) * {float(sae.act_scale):.4g}; |mean| = {float(sae.act_mean.norm()):.4g}")
    m = cfg.model
    t.add_row("model", f"{m.get('spec', '?')} ({m.get('arch', '?')}, sha256 {str(m.get('weights_sha256', '?'))[:12]})"
              if m else "unknown (imported or hand-made)")
    t.add_row("layer / tokens", f"{'?' if cfg.layer is None or cfg.layer < 0 else cfg.layer} / {', '.join(cfg.tokens)}")
    tr = cfg.train
    if "imported_from" in tr:
        t.add_row("imported", f"{tr.get('source_format')} from {tr['imported_from']}")
        t.add_row("source version", str(tr.get("source_version", "not recorded")))
    elif tr:
        t.add_row("training", f"{tr.get('steps', '?')}/{tr.get('n_steps', '?')} steps x {tr.get('batch_size', '?')} "
                  f"tokens, lr {_fmt(tr.get('lr'))}, L1 {_fmt(tr.get('sparsity'))}, seed {tr.get('seed')}, "
                  f"store {tr.get('store')}")
        final = tr.get("final") or {}
        if final:
            shown = [f"{k} {_fmt(final[k])}" for k in ("mse", "fvu", "l0", "dead", "dense") if k in final]
            t.add_row("final metrics", ", ".join(shown))
    t.add_row("weights sha256", str(h.get("weights_sha256", "?")))
    console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(sae_app, name="sae")
