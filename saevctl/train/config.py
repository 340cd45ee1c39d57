"""The training Config and its expansion into a sweep: one `RunSpec` per SAE, grouped by shape.

Every list-valued option is a sweep axis; the product of the axes is trained in one pass over the data.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from saevctl.config import MAX_SEED, DeviceOpts, check_finite, opt
from saevctl.errors import InputError

Activation = Literal["relu", "topk", "batchtopk"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)


@dataclass(frozen=True)
class Config(DeviceOpts):
    store: Path = opt(Path("store"), short="-s")
    """Activation store folder made by `saevctl extract`."""
    layer: int | None = opt(None, short="-l")
    """Block whose activations are used (default: the store's only layer, or its last one)."""
    tokens: Literal["patches", "cls", "both"] = "patches"
    """Token kind(s) trained on: patches, cls, or both."""
    out: Path = opt(Path("sae"), short="-o")
    """Output folder: one checkpoint folder per SAE, metrics.jsonl, plots/, sweep.json, state/."""
    activation: tuple[Activation, ...] = opt(("relu",), short="-a")
    """Sparsifying activation(s), a comma list sweeps: relu (L1 penalty), topk (AuxK revives dead latents),
    batchtopk."""
    width: tuple[str, ...] = opt(("16x",), short="-w")
    """Dictionary size(s), a comma list sweeps: a multiple of d ('16x') or an absolute count ('8192')."""
    lr: tuple[float, ...] = (3e-4,)
    """Adam peak learning rate(s), a comma list sweeps."""
    sparsity: tuple[float, ...] = (8e-4,)
    """L1 coefficient(s) for relu SAEs (the paper's lambda), a comma list sweeps; ignored by topk/batchtopk."""
    k: tuple[int, ...] = (32,)
    """Active latents per token for topk/batchtopk, a comma list sweeps; ignored by relu."""
    matryoshka: tuple[Literal["off", "on"], ...] = ("off",)
    """Matryoshka SAEs, a sweep axis: off, on (nested --prefixes each reconstruct on their own), or off,on to train
    both in one pass, a pair per combination of the other axes."""
    prefixes: tuple[float, ...] = (0.0625, 0.25)
    """Nested prefix sizes where --matryoshka is on: fractions of the width (<= 1) or counts; the full width is
    always added."""
    freeze_decoder: bool = opt(False, flag="--freeze-decoder/--train-decoder")
    """Keep every decoder at its random unit-norm initialisation and train only the encoder and the biases (the
    random-decoder null baseline of saevctl eval baselines)."""
    aux_coef: float = opt(1 / 32, default_text="1/32")
    """AuxK loss weight for topk/batchtopk (reconstructs the residual from dead latents)."""
    n_tokens: int | None = None
    """Activations to train on in total (default: one pass over the store's rows)."""
    batch_size: int = opt(4096, short="-b")
    """Activations per step (each is fed to every SAE of the sweep)."""
    lr_warmup: int = 200
    """Steps of linear learning-rate warmup."""
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup: cosine (to 0), linear (to 0) or constant."""
    sparsity_warmup: int = 500
    """Steps over which the L1 coefficient ramps linearly from 0 (as in the paper)."""
    seed: int = 0
    """Seed for weight init and data order; the same seed gives the same SAEs."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Matmul precision: float32, or bfloat16 (autocast on AMX CPUs and GPUs; weights stay float32)."""
    impl: Literal["fast", "reference"] = "fast"
    """fast (stacked, fused, sparse TopK decoder) or reference (plain per-SAE autograd, for checking)."""
    log_every: int = 50
    """Steps between metric records (JSONL, progress bar, wandb)."""
    ckpt_every: int = 1000
    """Steps between periodic checkpoints (train state for --resume plus every SAE)."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint (same settings required)."""
    buffer_rows: int = 131072
    """Activations held in the shuffle buffer (bigger shuffles better, costs memory)."""
    n_norm_sample: int = 65536
    """Activations sampled to estimate the normalisation mean and scale."""
    dead_after: int = 1_000_000
    """A latent counts as dead after this many tokens without firing, for the dead fraction and for the AuxK loss
    (capped at a tenth of the run's tokens, so that short runs revive dead latents too)."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs `pip install wandb`; honours WANDB_MODE=offline)."""
    wandb_project: str = "saevctl"
    """Weights & Biases project name."""
    drop_cache: bool | None = opt(None, flag="--drop-cache/--keep-cache")
    """Evict store pages from the page cache once read (default: only for one process reading a store larger than
    half the machine's memory; several processes on a node share the pages, so then they are kept)."""
    place_sweep: Literal["data", "ranks"] = "data"
    """Under torchrun: data (every SAE on every rank, each rank a slice of each batch, gradients averaged) or
    ranks (a sweep's SAEs dealt round-robin to ranks, each rank reading every batch whole)."""

    def __post_init__(self) -> None:
        # before the generic "unknown --matryoshka '0.25'": the old spelling (prefix sizes) gets its fix
        raw = self.matryoshka
        items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, (list, tuple)) else [raw]
        if any(_is_number(v) for v in items):
            raise InputError("--matryoshka takes off, on or off,on",
                             "give prefix sizes with --prefixes 0.0625,0.25")
        super().__post_init__()

    def check(self) -> None:
        super().check()
        if not (self.activation and self.width and self.lr):
            raise InputError("empty sweep axis", "give at least one --activation, --width and --lr")
        if not self.matryoshka:
            raise InputError("empty sweep axis --matryoshka", "give off, on or off,on")
        if "on" in self.matryoshka and not self.prefixes:
            raise InputError("--matryoshka on needs --prefixes sizes", "give them, e.g. --prefixes 0.0625,0.25")
        for v in self.lr:
            check_finite("lr", v, low=0, low_open=True)
        for v in self.sparsity:
            check_finite("sparsity", v, low=0)
        for v in self.prefixes:
            check_finite("prefixes", v, low=0, low_open=True)
        check_finite("aux_coef", self.aux_coef, low=0)
        for v in self.k:
            check_finite("k", v, low=1)
        for name in ("batch_size", "log_every", "ckpt_every", "buffer_rows", "n_norm_sample", "dead_after"):
            check_finite(name, getattr(self, name), low=1)
        check_finite("lr_warmup", self.lr_warmup, low=0)
        check_finite("sparsity_warmup", self.sparsity_warmup, low=0)
        check_finite("seed", self.seed, low=0, high=MAX_SEED)
        if self.n_tokens is not None and self.n_tokens < self.batch_size:
            raise InputError("--n-tokens is smaller than one batch", "train on at least --batch-size activations")
        for w in self.width:
            parse_width(w, 1)


    def dead_after_tokens(self, n_steps: int) -> int:
        """The dead threshold in tokens for a run of `n_steps`: --dead-after, capped at a tenth of the run (at least
        one batch), the same for the reported dead fraction and for the AuxK loss."""
        return max(self.batch_size, min(self.dead_after, n_steps * self.batch_size // 10))


def _is_number(v: Any) -> bool:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return True
    try:
        float(str(v).strip())
    except ValueError:
        return False
    return True


def parse_width(text: str, d: int) -> int:
    """'16x' -> 16 * d; '8192' -> 8192."""
    t = str(text).strip().lower()
    try:
        n = round(float(t[:-1]) * d) if t.endswith("x") else int(t)
    except ValueError as e:
        raise InputError(f"bad --width {text!r}", "write a multiple of d like 16x or a count like 8192") from e
    if n < 1:
        raise InputError(f"--width {text!r} gives no latents", "use a positive width")
    return n


@dataclass(frozen=True)
class RunSpec:
    """One SAE of the sweep: its shape and hyperparameters."""

    name: str
    activation: str
    n_latents: int
    lr: float
    sparsity: float
    k: int
    matryoshka: tuple[int, ...]

    @property
    def shape_key(self) -> tuple[Any, ...]:
        """SAEs with the same key train stacked in one batched matmul."""
        return (self.activation, self.n_latents, self.k, self.matryoshka)

    def hyper(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"matryoshka": list(self.matryoshka)}


def _prefixes(fracs: tuple[float, ...], n: int) -> tuple[int, ...]:
    if not fracs:
        return ()
    sizes = sorted({min(n, max(1, round(f * n) if f <= 1 else int(f))) for f in fracs} | {n})
    return tuple(sizes)


def expand(cfg: Config, d: int) -> list[RunSpec]:
    """Every combination of the sweep axes, with readable unique names."""
    specs: list[RunSpec] = []
    for act in cfg.activation:
        sparse_axis = cfg.sparsity if act == "relu" else (0.0,)
        k_axis = cfg.k if act != "relu" else (0,)
        # matryoshka is the innermost axis, so an off/on pair sits side by side in sweep.json
        for width, lr, coef, k, mode in itertools.product(cfg.width, cfg.lr, sparse_axis, k_axis, cfg.matryoshka):
            n = parse_width(width, d)
            if act != "relu" and k > n:
                raise InputError(f"--k {k} exceeds the width {n}", "use a smaller k or a wider SAE")
            knob = f"l1-{coef:g}" if act == "relu" else f"k{k}"
            mat = _prefixes(cfg.prefixes, n) if mode == "on" else ()
            name = f"{act}{'-mat' if mat else ''}-w{n}-lr{lr:g}-{knob}"
            specs.append(RunSpec(name, act, n, lr, coef, k, mat))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputError("the sweep lists the same SAE twice", "remove repeated values from the sweep lists")
    return specs


def group_specs(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """Same-shape SAEs together, in a stable order."""
    groups: dict[tuple[Any, ...], list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(s.shape_key, []).append(s)
    return list(groups.values())
