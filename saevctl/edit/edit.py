"""The SAE edit at layer L: set chosen features on chosen patches, keep the SAE's reconstruction error.

x' = decode(f') + (x - decode(f)). `edit_reference` does exactly that; `edit_fast` computes the same
x + (f'_i - f_i) W_dec[i] / scale from the chosen features' columns only (parity-tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from saevctl.errors import ProbeError
from saevctl.sae.model import SAE
from saevctl.store.format import TokenLayout

PATCH_FORMS = ("all, fired, r,c;r,c (patch rows/columns), box:x0,y0,x1,y1 (model-input pixels) or mask:CLASS "
               "(mask:SET/CLASS with several mask sets)")


@dataclass(frozen=True)
class Patches:
    """Which patches an edit touches."""

    kind: str
    """all, fired (where each edited feature fires), cells, box or mask (a mask class's patches, per image)."""
    cells: tuple[tuple[int, int], ...] = ()
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    mask_set: str | None = None
    """mask: the mask set named in mask:SET/CLASS (None: whichever set has the class)."""
    mask_class: str = ""

    def describe(self) -> str:
        if self.kind == "mask":
            return "mask:" + (f"{self.mask_set}/" if self.mask_set else "") + self.mask_class
        if self.kind == "cells":
            return ";".join(f"{r},{c}" for r, c in self.cells)
        if self.kind == "box":
            return "box:" + ",".join(str(v) for v in self.box)
        return self.kind


def _ints(text: str, n: int, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise ProbeError(f"bad --patches {what} {text!r}", f"use one of: {PATCH_FORMS}")
    return vals


def parse_patches(text: str) -> Patches:
    text = text.strip()
    if text in ("all", "fired"):
        return Patches(text)
    if text.startswith("mask:"):
        set_name, _, cls = text.removeprefix("mask:").strip().rpartition("/")
        if not cls.strip():
            raise ProbeError(f"bad --patches {text!r}: no class", "write mask:CLASS or mask:SET/CLASS")
        return Patches("mask", mask_set=set_name.strip() or None, mask_class=cls.strip())
    if text.startswith("box:"):
        x0, y0, x1, y1 = _ints(text.removeprefix("box:"), 4, "box")
        return Patches("box", box=(x0, y0, x1, y1))
    cells: list[tuple[int, int]] = []
    for part in text.split(";"):
        if part.strip():
            r, c = _ints(part, 2, "cell")
            cells.append((r, c))
    if not cells:
        raise ProbeError(f"bad --patches {text!r}", f"use one of: {PATCH_FORMS}")
    return Patches("cells", cells=tuple(cells))


def static_mask(patches: Patches, lay: TokenLayout, patch_size: int) -> Bool[Tensor, " p"] | None:
    """The patch mask for all/cells/box (None for fired and mask, which depend on each image)."""
    gh, gw = lay.grid_h, lay.grid_w
    if patches.kind in ("fired", "mask"):
        return None
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    if patches.kind == "all":
        mask[:] = True
    elif patches.kind == "cells":
        for r, c in patches.cells:
            if not (0 <= r < gh and 0 <= c < gw):
                raise ProbeError(
                    f"patch ({r},{c}) is outside the {gh}x{gw} patch grid", f"rows go 0..{gh - 1}, columns 0..{gw - 1}"
                )
            mask[r, c] = True
    else:
        x0, y0, x1, y1 = patches.box
        size_h, size_w = gh * patch_size, gw * patch_size
        if not (0 <= x0 < x1 <= size_w and 0 <= y0 < y1 <= size_h):
            raise ProbeError(
                f"box {x0},{y0},{x1},{y1} is outside the {size_w}x{size_h} model input or empty",
                "give x0<x1, y0<y1 in model-input pixels (the axes of the probe's image panel)",
            )
        r0, r1 = y0 // patch_size, -(-y1 // patch_size)
        c0, c1 = x0 // patch_size, -(-x1 // patch_size)
        mask[r0:r1, c0:c1] = True
    return mask.reshape(-1)


# --- codes and the edit itself ----------------------------------------------------------------------


def feature_codes(sae: SAE, x_npd: Float[Tensor, "n p d"], features: list[int]) -> Float[Tensor, "n p k"]:
    """Codes of the chosen features only; relu/batchtopk need just their encoder columns, topk the full encode."""
    n, p, d = x_npd.shape
    x_nd = x_npd.reshape(-1, d)
    if sae.cfg.activation == "topk":
        return sae.encode(x_nd)[:, features].reshape(n, p, len(features))
    idx = torch.as_tensor(features, device=x_nd.device, dtype=torch.long)
    pre = (sae.normalize(x_nd) - sae.b_dec) @ sae.W_enc[:, idx] + sae.b_enc[idx]
    if sae.cfg.activation == "relu":
        codes = torch.relu(pre)
    else:
        codes = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
    return codes.reshape(n, p, len(features))


def target_codes(codes_npk: Tensor, values_nk: Tensor, mask_npk: Tensor) -> Tensor:
    """f' on the chosen features: the clamp value where the mask is on, the feature's own code elsewhere."""
    return torch.where(mask_npk, values_nk[:, None, :].to(codes_npk.dtype), codes_npk)


def edit_reference(
    sae: SAE, x_npd: Tensor, features: list[int], values_nk: Tensor, mask_npk: Tensor
) -> Float[Tensor, "n p d"]:
    """The issue's definition, literally: full encode, set features, decode(f') + reconstruction error."""
    n, p, d = x_npd.shape
    x_nd = x_npd.reshape(-1, d)
    f_ns = sae.encode(x_nd)
    err_nd = x_nd.to(f_ns.dtype) - sae.decode(f_ns)
    f2 = f_ns.reshape(n, p, -1).clone()
    f2[..., features] = target_codes(f2[..., features], values_nk, mask_npk)
    return (sae.decode(f2.reshape(n * p, -1)) + err_nd).reshape(n, p, d).to(x_npd.dtype)


def delta_from_codes(sae: SAE, features: list[int], dcodes_npk: Tensor) -> Float[Tensor, "n p d"]:
    """decode(f') - decode(f): decode is affine, so only the changed codes' decoder rows matter."""
    idx = torch.as_tensor(features, device=dcodes_npk.device, dtype=torch.long)
    return (dcodes_npk @ sae.W_dec[idx]) / sae.act_scale


def edit_fast(
    sae: SAE, x_npd: Tensor, features: list[int], values_nk: Tensor, mask_npk: Tensor
) -> Float[Tensor, "n p d"]:
    """Same result as `edit_reference`; exactly x where no code changes."""
    codes = feature_codes(sae, x_npd, features)
    delta = delta_from_codes(sae, features, target_codes(codes, values_nk, mask_npk) - codes)
    return x_npd + delta.to(x_npd.dtype)


@dataclass
class EditPlan:
    """One concrete edit for a batch: features, values per image, and the patch mask per feature."""

    features: list[int]
    values_nk: Tensor
    mask_npk: Tensor

    @property
    def edited_np(self) -> Tensor:
        return self.mask_npk.any(-1)


def make_plan(
    sae: SAE, x_npd: Tensor, features: list[int], values_nk: Tensor, patches: Patches, mask_p: Tensor | None
) -> EditPlan:
    """Resolve the patch mask (fired: where each feature's code is > 0) into an EditPlan; `mask_p` is one mask for
    every image (p,) or one per image (n, p)."""
    n, p, _ = x_npd.shape
    if patches.kind == "fired":
        mask = feature_codes(sae, x_npd, features) > 0
    else:
        assert mask_p is not None
        per_image = mask_p.to(x_npd.device) if mask_p.ndim == 2 else mask_p.to(x_npd.device)[None, :]
        mask = per_image[:, :, None].expand(n, p, len(features))
    return EditPlan(features, values_nk.to(x_npd.device), mask)


def apply_edit(
    sae: SAE, x_btd: Tensor, lay: TokenLayout, plan: EditPlan, fast: bool = True
) -> Float[Tensor, "b t d"]:
    """Edit the patch tokens of the residual stream; prefix tokens (CLS, registers) pass unchanged."""
    patches = x_btd[:, lay.n_prefix :]
    fn = edit_fast if fast else edit_reference
    edited = fn(sae, patches, plan.features, plan.values_nk, plan.mask_npk)
    return torch.cat([x_btd[:, : lay.n_prefix], edited], dim=1)
