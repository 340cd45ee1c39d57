"""The forward pass's precision during extraction, and its measured cost: with bfloat16 autocast, the first batch
of a run is also run in float32 and the relative error of every stored layer is recorded beside the store
(`compute.json`), so a store says how far its activations sit from a float32 forward."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from saevctl import atomic
from saevctl.hardware import bf16_if_fast, cpu_has_fast_bf16
from saevctl.vit import Backbone

COMPUTE_FILE = "compute.json"
# Images of the first batch run twice (float32 and bfloat16) to measure the error: a few, so that the extra
# float32 forward costs little even on a CPU, where it is about 3x a bfloat16 one.
MEASURE_IMAGES = 4


def resolve_compute(compute: str, device: str, dtype: str) -> str:
    """auto: bfloat16 autocast on a GPU for a 16-bit store (the store rounds more than bfloat16 does), float32
    on a CPU (pass --compute bfloat16 there for AMX speed). bfloat16 where it would be emulated (a CPU without fast
    bfloat16) is float32, with a warning, as for train --dtype."""
    if compute == "bfloat16" and not bf16_if_fast("--compute bfloat16", device, "computing"):
        return "float32"
    if compute != "auto":
        return compute
    return "bfloat16" if device.startswith("cuda") and dtype != "float32" else "float32"


def autocast(device: str, compute: str) -> contextlib.AbstractContextManager[Any]:
    if compute == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def measure(bb: Backbone, x_bchw: torch.Tensor, layers: list[int], device: str) -> dict[str, Any]:
    """Relative error ||bf16 - fp32|| / ||fp32|| of each layer's residual stream on one batch."""
    ref = bb.forward_to(x_bchw, layers)
    with autocast(device, "bfloat16"):
        low = bb.forward_to(x_bchw, layers)
    err = {str(layer): float((low[layer].float() - ref[layer]).norm() / ref[layer].norm().clamp_min(1e-30))
           for layer in layers}
    return {"compute": "bfloat16", "device": device, "fast_bf16_cpu": cpu_has_fast_bf16() if device == "cpu" else None,
            "images_measured": int(x_bchw.shape[0]), "rel_error_vs_float32": err}


def record(store: Path, figures: dict[str, Any]) -> None:
    atomic.write_json(store / COMPUTE_FILE, figures)


def read(store: Path) -> dict[str, Any] | None:
    import json

    fpath = store / COMPUTE_FILE
    return json.loads(fpath.read_text()) if fpath.exists() else None
