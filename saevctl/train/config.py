"""The training Config and its expansion into a sweep: one `RunSpec` per SAE, grouped by shape.

Every list-valued option is a sweep axis; the product of the axes is trained in one pass over the data.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saevctl.errors import InputError

ACTIVATIONS = ("relu", "topk", "batchtopk")
TOKENS = ("patches", "cls", "both")
IMPLS = ("fast", "reference")
COMPUTE_DTYPES = ("float32", "bfloat16")


def _tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return (value,)


@dataclass(frozen=True)
class Config:
    store: Path = Path("store")
    """Activation store folder made by `saevctl extract`."""
    layer: int | None = None
    """Block whose activations are used (default: the store's only layer, or its last one)."""
    tokens: str = "patches"
    """Token kind(s) trained on: patches, cls, or both."""
    out: Path = Path("sae")
    """Output folder: one checkpoint folder per SAE, metrics.jsonl, plots/, sweep.json, state/."""
    activation: tuple[str, ...] = ("relu",)
    """Sparsifying activation(s): relu (L1 penalty), topk (AuxK revives dead latents), batchtopk."""
    width: tuple[str, ...] = ("16x",)
    """Dictionary size(s): a multiple of d ('16x') or an absolute count ('8192')."""
    lr: tuple[float, ...] = (3e-4,)
    """Adam peak learning rate(s)."""
    sparsity: tuple[float, ...] = (8e-4,)
    """L1 coefficient(s) for relu SAEs (the paper's lambda); ignored by topk/batchtopk."""
    k: tuple[int, ...] = (32,)
    """Active latents per token for topk/batchtopk; ignored by relu."""
    matryoshka: tuple[float, ...] = ()
    """Nested prefix sizes trained to reconstruct on their own: fractions of the width (<= 1) or counts."""
    aux_coef: float = 1 / 32
    """AuxK loss weight for topk/batchtopk (reconstructs the residual from dead latents)."""
    n_tokens: int | None = None
    """Activations to train on in total (default: one pass over the store's rows)."""
    batch_size: int = 4096
    """Activations per step (each is fed to every SAE of the sweep)."""
    lr_warmup: int = 200
    """Steps of linear learning-rate warmup."""
    lr_decay: str = "cosine"
    """Learning-rate decay after warmup: cosine (to 0), linear (to 0) or constant."""
    sparsity_warmup: int = 500
    """Steps over which the L1 coefficient ramps linearly from 0 (as in the paper)."""
    seed: int = 0
    """Seed for weight init and data order; the same seed gives the same SAEs."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: str = "float32"
    """Matmul precision: float32, or bfloat16 (autocast on AMX CPUs and GPUs; weights stay float32)."""
    impl: str = "fast"
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
    """A latent counts as dead after this many tokens without firing (capped at the run's length)."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs `pip install wandb`; honours WANDB_MODE=offline)."""
    wandb_project: str = "saevctl"
    """Weights & Biases project name."""
    drop_cache: bool | None = None
    """Evict store pages from the page cache once read: None (auto) does so for one process reading a store
    larger than half the machine's memory; several processes on a node share the pages, so auto keeps them."""
    place_sweep: str = "data"
    """Under torchrun: data (every SAE on every rank, each rank a slice of each batch, gradients averaged) or
    ranks (a sweep's SAEs dealt round-robin to ranks, each rank reading every batch whole)."""

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("store", Path(self.store))
        set_("out", Path(self.out))
        for name in ("activation", "width", "lr", "sparsity", "k", "matryoshka"):
            set_(name, _tuple(getattr(self, name)))
        set_("width", tuple(str(w) for w in self.width))
        set_("lr", tuple(float(v) for v in self.lr))
        set_("sparsity", tuple(float(v) for v in self.sparsity))
        set_("k", tuple(int(v) for v in self.k))
        set_("matryoshka", tuple(float(v) for v in self.matryoshka))
        self._check()

    def _check(self) -> None:
        def bad(what: str, hint: str) -> InputError:
            return InputError(what, hint)

        for a in self.activation:
            if a not in ACTIVATIONS:
                raise bad(f"unknown --activation {a!r}", f"use {', '.join(ACTIVATIONS)}")
        if self.tokens not in TOKENS:
            raise bad(f"unknown --tokens {self.tokens!r}", f"use {', '.join(TOKENS)}")
        if self.impl not in IMPLS:
            raise bad(f"unknown --impl {self.impl!r}", f"use {', '.join(IMPLS)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise bad(f"unknown --dtype {self.dtype!r}", f"use {', '.join(COMPUTE_DTYPES)}")
        if self.place_sweep not in ("data", "ranks"):
            raise bad(f"unknown --place-sweep {self.place_sweep!r}", "use data or ranks")
        if self.lr_decay not in ("cosine", "linear", "constant"):
            raise bad(f"unknown --lr-decay {self.lr_decay!r}", "use cosine, linear or constant")
        if not (self.activation and self.width and self.lr):
            raise bad("empty sweep axis", "give at least one --activation, --width and --lr")
        if any(v <= 0 for v in self.lr) or any(v < 0 for v in self.sparsity) or any(v < 1 for v in self.k):
            raise bad("--lr must be > 0, --sparsity >= 0 and --k >= 1", "fix the values")
        for name in ("batch_size", "log_every", "ckpt_every", "buffer_rows", "n_norm_sample", "dead_after"):
            if getattr(self, name) < 1:
                raise bad(f"{name.replace('_', '-')} must be positive", "pass a positive number")
        if self.n_tokens is not None and self.n_tokens < self.batch_size:
            raise bad("--n-tokens is smaller than one batch", "train on at least --batch-size activations")
        for w in self.width:
            parse_width(w, 1)


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
        for width, lr, coef, k in itertools.product(cfg.width, cfg.lr, sparse_axis, k_axis):
            n = parse_width(width, d)
            if act != "relu" and k > n:
                raise InputError(f"--k {k} exceeds the width {n}", "use a smaller k or a wider SAE")
            knob = f"l1-{coef:g}" if act == "relu" else f"k{k}"
            mat = _prefixes(cfg.matryoshka, n)
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
