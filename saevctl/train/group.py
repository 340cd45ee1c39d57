"""Same-shape SAEs of a sweep trained together: stacked weights (first axis = SAE), Adam moments, and the
per-latent firing trackers behind the dead/dense metrics and AuxK. Exports each member as an `SAE`."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saevctl.sae.model import SAE, SAEConfig
from saevctl.train import optim, optim_cpu, step_fast, step_ref
from saevctl.train.config import RunSpec
from saevctl.train.step_ref import Hyper, StepOut

if TYPE_CHECKING:
    from saevctl.train.distributed import Comm

THRESHOLD_EMA = 0.99


def _init_rows(spec: RunSpec, d: int, seed: int) -> Tensor:
    """Unit-norm random decoder rows, seeded by the run's name so a sweep's members do not depend on each other."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    w = torch.randn(spec.n_latents, d, generator=gen)
    norm: Tensor = w.norm(dim=1, keepdim=True)  # Tensor.norm is not annotated
    return w / norm


class SAEGroup:
    """SAEs sharing (activation, width, k, matryoshka prefixes); each step feeds them the same batch."""

    def __init__(self, specs: list[RunSpec], d: int, seed: int, aux_coef: float, device: str | torch.device,
                 freeze_decoder: bool = False) -> None:
        assert specs and len({s.shape_key for s in specs}) == 1, "a group holds same-shape SAEs only"
        self.specs = specs
        self.d = d
        self.freeze_decoder = freeze_decoder
        first = specs[0]
        s = first.n_latents
        rows = first.activation != "relu"
        self.hp = Hyper(first.activation, first.k, first.matryoshka or (s,), aux_coef, max(1, min(d // 2, s)), rows)
        W_dec = torch.stack([_init_rows(sp, d, seed) for sp in specs])
        self.params: dict[str, Tensor] = {
            # tied init: the encoder starts as the decoder transposed; layout per Hyper.enc_rows
            "W_enc": W_dec.clone() if rows else W_dec.transpose(1, 2).contiguous(),
            "b_enc": torch.zeros(len(specs), s),
            "W_dec": W_dec,
            "b_dec": torch.zeros(len(specs), d),
        }
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.moments = optim.init_moments(self.params)
        self.trackers: dict[str, Tensor] = {
            "since_fired": torch.zeros(len(specs), s, dtype=torch.int64, device=device),
            "threshold": torch.zeros(len(specs), device=device),
            "window_fired": torch.zeros(len(specs), s, device=device),
            "window_counted": torch.zeros((), dtype=torch.int64, device=device),
            "counted": torch.zeros((), dtype=torch.int64, device=device),
        }

    @property
    def n(self) -> int:
        return len(self.specs)

    @property
    def n_latents(self) -> int:
        return self.specs[0].n_latents

    def dead(self, dead_after: int, capped: bool = False) -> Tensor:
        """Latents silent for `dead_after` counted tokens; `capped`: or for the whole run so far, if shorter."""
        if not capped:
            return self.trackers["since_fired"] >= dead_after
        limit = torch.clamp(self.trackers["counted"], min=1, max=dead_after)
        return self.trackers["since_fired"] >= limit

    def compute(self, x_bd: Tensor, coef_scale: float, dead_after: int, impl: str, bf16: bool,
                comm: Comm | None = None) -> StepOut:
        """Losses and gradients for this batch (this rank's slice under data parallelism: `comm` makes BatchTopK
        and AuxK see the global batch); nothing is updated yet (so a bad batch leaves no trace)."""
        coef_m = torch.tensor([sp.sparsity * coef_scale for sp in self.specs], device=x_bd.device)
        dead = None if self.hp.activation == "relu" else self.dead(dead_after)
        if impl == "reference":
            return step_ref.step(self.params, x_bd, coef_m, dead, self.hp, comm)
        return step_fast.step(self.params, x_bd, coef_m, dead, self.hp, bf16=bf16, comm=comm)

    @torch.no_grad()
    def apply(self, out: StepOut, step: int, lr_scale: float, fused: bool = True) -> None:
        """Adam on the gradients, with the unit-norm decoder constraint (or a frozen decoder), then the trackers."""
        params = self.params
        if self.freeze_decoder:  # left out of the update: its Adam moments stay zero, its rows their random init
            params = {k: v for k, v in self.params.items() if k != "W_dec"}
        lrs = [sp.lr * lr_scale for sp in self.specs]
        if fused and self.params["W_dec"].device.type == "cpu":  # one compiled pass, the constraint inside it
            optim_cpu.adam_step(params, out.grads, self.moments, lrs, step,
                                frozenset() if self.freeze_decoder else frozenset({"W_dec"}))
        else:
            if not self.freeze_decoder:
                optim.remove_parallel_grads(self.params["W_dec"], out.grads["W_dec"])
            update = optim.adam_update_fused if fused else optim.adam_update
            update(params, out.grads, self.moments, lrs, step)
            if not self.freeze_decoder:
                optim.normalize_rows(self.params["W_dec"])
        fired = out.fired_ms > 0
        since = self.trackers["since_fired"]
        since.add_(out.n_counted).masked_fill_(fired, 0)
        self.trackers["window_fired"].add_(out.fired_ms)
        self.trackers["window_counted"].add_(out.n_counted)
        self.trackers["counted"].add_(out.n_counted)
        if self.hp.activation == "batchtopk":
            thr = self.trackers["threshold"]
            new = torch.where(thr > 0, THRESHOLD_EMA * thr + (1 - THRESHOLD_EMA) * out.min_act_m, out.min_act_m)
            thr.copy_(new)

    # --- export and state ---
    def to_sae(self, i: int, mean_d: Tensor, scale: Tensor, provenance: dict[str, Any]) -> SAE:
        spec = self.specs[i]
        cfg = SAEConfig(
            d=self.d,
            n_latents=spec.n_latents,
            activation=spec.activation,
            k=spec.k,
            matryoshka=spec.matryoshka,
            **provenance,
        )
        sae = SAE(cfg)
        with torch.no_grad():
            W_enc = self.params["W_enc"][i]
            sae.W_enc.copy_(W_enc.t() if self.hp.enc_rows else W_enc)
            sae.b_enc.copy_(self.params["b_enc"][i])
            sae.W_dec.copy_(self.params["W_dec"][i])
            sae.b_dec.copy_(self.params["b_dec"][i])
            sae.act_mean.copy_(mean_d)
            sae.act_scale.copy_(scale)
            sae.threshold.copy_(self.trackers["threshold"][i])
        return sae.eval()

    def state_tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {**self.params, **self.moments, **self.trackers}
        return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], prefix: str) -> None:
        for store in (self.params, self.moments, self.trackers):
            for k, v in store.items():
                src = tensors[f"{prefix}{k}"]
                assert src.shape == v.shape, (k, src.shape, v.shape)
                v.copy_(src.to(v.device))
