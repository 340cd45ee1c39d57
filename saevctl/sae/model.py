"""A sparse autoencoder over one layer's ViT activations, with its normalisation statistics built in.

Public `encode`/`decode` take and return raw activations; checkpoints are safetensors + config.json (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saevctl import atomic, layout
from saevctl.errors import CheckpointError
from saevctl.sae.topk import row_topk
from saevctl.workspace import resolve_ckpt

ACTIVATIONS = ("relu", "topk", "batchtopk")
# A latent is dense when it fires on more than this share of tokens: one definition for training and eval.
DENSE_RATE = 0.01


@dataclass(frozen=True)
class SAEConfig:
    d: int
    """Input width (the ViT's residual width)."""
    n_latents: int
    """Dictionary size."""
    activation: str = "relu"
    """relu (with an L1 penalty in training), topk, or batchtopk (a learned threshold at inference)."""
    k: int = 0
    """Active latents per token for topk/batchtopk."""
    matryoshka: tuple[int, ...] = ()
    """Nested prefix sizes each trained to reconstruct (empty: off)."""
    model: dict[str, Any] = field(default_factory=dict)
    """The ViT it reads: spec, arch, weights_sha256 (from the store manifest)."""
    layer: int | None = None
    """The block whose output it encodes, >= 0; None when unknown (imported without --layer), read as the last block."""
    tokens: tuple[str, ...] = ("patches",)
    """Token kinds it was trained on."""
    train: dict[str, Any] = field(default_factory=dict)
    """Training provenance: hyperparameters, steps, store, final metrics."""

    def __post_init__(self) -> None:
        assert self.activation in ACTIVATIONS, self.activation
        assert self.activation == "relu" or self.k > 0, "topk/batchtopk need k > 0"
        object.__setattr__(self, "matryoshka", tuple(self.matryoshka))
        object.__setattr__(self, "tokens", tuple(self.tokens))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["matryoshka"], d["tokens"] = list(self.matryoshka), list(self.tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """From config.json, where the tuples are JSON lists."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("matryoshka", "tokens"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


class SAEOutput(NamedTuple):
    x_hat: Tensor
    """Reconstruction in raw activation space."""
    codes: Tensor
    """Latent activations (b, s)."""


class SAE(nn.Module):
    """x_norm = (x - mean) * scale; f = act((x_norm - b_dec) W_enc + b_enc);
    x_hat = (f W_dec + b_dec) / scale + mean."""

    # Buffers (saved with the weights); declared so that type checkers see tensors, not Module attributes.
    act_mean: Tensor
    act_scale: Tensor
    threshold: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, s = cfg.d, cfg.n_latents
        w = torch.randn(s, d)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())  # (s, d), unit-norm rows
        self.W_enc = nn.Parameter(w.t().clone())  # (d, s), tied at init
        self.b_enc = nn.Parameter(torch.zeros(s))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("act_mean", torch.zeros(d))
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("threshold", torch.zeros(()))
        self.header: dict[str, Any] = {}  # config.json of a loaded checkpoint

    # --- normalisation (statistics live in the checkpoint) ---
    def normalize(self, x_bd: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
        return (x_bd.to(self.W_enc.dtype) - self.act_mean) * self.act_scale

    def denormalize(self, x_bd: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
        return x_bd / self.act_scale + self.act_mean

    @torch.no_grad()
    def set_normalization(self, sample_nd: Float[Tensor, "n d"]) -> None:
        """Mean and a scale such that E[||x_norm||^2] = d on the sample."""
        sample = sample_nd.float()
        mean = sample.mean(0)
        msq = (sample - mean).pow(2).sum(-1).mean()
        self.act_mean.copy_(mean.to(self.act_mean.dtype))
        self.act_scale.copy_((self.cfg.d / msq.clamp_min(1e-12)).sqrt().to(self.act_scale.dtype))

    # --- codes ---
    def pre_acts(self, x_norm_bd: Tensor) -> Float[Tensor, "b s"]:
        return (x_norm_bd - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre_bs: Tensor) -> Float[Tensor, "b s"]:
        """The sparsifying nonlinearity at inference (batchtopk uses its estimated threshold)."""
        a = self.cfg.activation
        if a == "relu":
            return torch.relu(pre_bs)
        if a == "batchtopk":
            return torch.where(pre_bs > self.threshold, pre_bs, torch.zeros_like(pre_bs))
        vals, idx = row_topk(pre_bs, self.cfg.k)
        return torch.zeros_like(pre_bs).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x_bd: Float[Tensor, "b d"]) -> Float[Tensor, "b s"]:
        """Raw activations to latent codes."""
        return self.activate(self.pre_acts(self.normalize(x_bd)))

    @torch.no_grad()
    def encoder(self) -> Callable[..., Tensor]:
        """The inference fast path of `encode`, equal to it bit for bit (no gradients): `enc(x_bd, out=buf)`.

        The same operations in the same order, but the (b, s) ones write into `out` (pass a reused buffer: a fresh
        one per batch costs a page fault per 4 KiB, as much as the matmul) and the bias and nonlinearity run in
        place. Only the (b, d) input side allocates. Folding the normalisation into the weights (as mining does)
        would save nothing more here, and topk's choice would then differ from `encode` at near-ties."""
        activation, k = self.cfg.activation, self.cfg.k

        @torch.no_grad()
        def encode(x_bd: Float[Tensor, "b d"], out: Tensor | None = None) -> Float[Tensor, "b s"]:
            x_in = self.normalize(x_bd) - self.b_dec
            pre_bs = x_in @ self.W_enc if out is None else torch.matmul(x_in, self.W_enc, out=out)
            pre_bs += self.b_enc
            # Every nonlinearity in place, as `activate` computes it.
            if activation == "relu":
                return pre_bs.relu_()
            if activation == "batchtopk":
                return torch.threshold_(pre_bs, float(self.threshold), 0.0)
            vals_bk, idx_bk = row_topk(pre_bs, k)
            return pre_bs.zero_().scatter_(-1, idx_bk, vals_bk.relu_())

        return encode

    def decode(self, f_bs: Float[Tensor, "b s"]) -> Float[Tensor, "b d"]:
        """Latent codes to raw-space reconstructions."""
        return self.denormalize(f_bs.to(self.W_dec.dtype) @ self.W_dec + self.b_dec)

    def forward(self, x_bd: Float[Tensor, "b d"]) -> SAEOutput:
        f = self.encode(x_bd)
        return SAEOutput(self.decode(f), f)

    # --- checkpoints ---
    def save(self, dpath: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Atomically write sae.safetensors and config.json into `dpath`."""
        dpath = Path(dpath)
        dpath.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        wpath = layout.sae_weights_fpath(dpath)
        tmp = wpath.with_name(f".{wpath.name}.tmp")
        with atomic.translate_os_errors(wpath):
            try:
                save_file(tensors, str(tmp), metadata={"format": "saevctl-sae"})
                tmp.replace(wpath)
            finally:
                tmp.unlink(missing_ok=True)  # a disk that filled up mid-write gets its space back
        header = {"schema_version": layout.SAE_SCHEMA, "format": "saevctl-sae", **self.cfg.to_dict(), **(extra or {})}
        header["weights_sha256"] = atomic.sha256_file(wpath)
        atomic.write_json(layout.sae_config_fpath(dpath), header)
        return dpath

    @classmethod
    def load(cls, dpath: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load a checkpoint folder (or its sae.safetensors / config.json path)."""
        given = Path(dpath)
        dpath = resolve_ckpt(given)
        cpath, wpath = layout.sae_config_fpath(dpath), layout.sae_weights_fpath(dpath)
        if not cpath.is_file() or not wpath.is_file():
            # Name what the user passed: a stray file (some.pt) resolves to its folder, which they did not name.
            named = given if given.is_file() and given.name not in (cpath.name, wpath.name) else dpath
            raise CheckpointError(
                f"{named} is not an SAE checkpoint (needs config.json and sae.safetensors)",
                "pass the folder saevctl train wrote, or convert one with saevctl sae import",
            )
        try:
            header = json.loads(cpath.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cpath} is corrupt", "re-save or re-train the SAE") from e
        if header.get("schema_version") != layout.SAE_SCHEMA:
            raise CheckpointError(
                f"{dpath} has SAE schema {header.get('schema_version')}, this saevctl reads {layout.SAE_SCHEMA}",
                "convert it with saevctl sae import, or use the saevctl version that wrote it",
            )
        sae = cls(SAEConfig.from_dict(header))
        try:
            state = load_file(str(wpath))
            sae.load_state_dict(state)
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{wpath} cannot be read ({type(e).__name__})", "re-train or re-save it") from e
        sae.header = header
        return sae.to(device).eval()
