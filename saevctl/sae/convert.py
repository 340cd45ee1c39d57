"""Convert SAEs made elsewhere into saevctl checkpoints: the reference `saev` project's sae.pt (a JSON header line
then a torch-saved state dict, read with weights_only=True) and SAELens / sparsify folders (cfg.json + safetensors)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from saevctl.errors import CheckpointError, InputError
from saevctl.sae.model import SAE, SAEConfig

log = logging.getLogger(__name__)


def _bad(src: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot import {src}: {why}", "pass a saev sae.pt file or a SAELens/sparsify folder")


def read_saev(fpath: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Header and tensors of a saev sae.pt; unpickling is limited to tensors (torch.load weights_only=True)."""
    with open(fpath, "rb") as f:
        first = f.readline()
        rest = f.read()
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(fpath, "its first line is not a JSON header") from e
    try:
        state = torch.load(io.BytesIO(rest), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for anything but plain tensors
        raise _bad(fpath, f"its tensors cannot be read safely ({type(e).__name__})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise _bad(fpath, "it does not hold a plain dict of tensors")
    return header, state


def _saev_activation(header: dict[str, Any]) -> tuple[str, int]:
    cfg = header.get("cfg", header)
    act = cfg.get("activation")
    if isinstance(act, dict):
        name, params = act.get("cls", "Relu"), act.get("params", {})
    else:  # schema 1A kept the activation class name at the top level
        name, params = header.get("cls", "Relu"), cfg
    k = int(params.get("top_k", 0) or 0)
    if name in ("TopK", "BatchTopK"):  # saev's BatchTopK selects per sample at inference
        return "topk", k
    return "relu", 0


def _split_weights(src: Path, state: dict[str, Tensor], W_enc: Tensor, W_dec: Tensor) -> tuple[int, int]:
    if W_dec.dim() != 2 or W_enc.shape != W_dec.t().shape:
        raise _bad(src, f"encoder {tuple(W_enc.shape)} and decoder {tuple(W_dec.shape)} do not fit together")
    return int(W_dec.shape[1]), int(W_dec.shape[0])


def _build(W_enc_ds: Tensor, b_enc: Tensor, W_dec_sd: Tensor, b_dec: Tensor, act: str, k: int,
           subtracts_b_dec: bool, train: dict[str, Any]) -> SAE:
    d, s = W_enc_ds.shape
    sae = SAE(SAEConfig(d=d, n_latents=s, activation=act, k=k, train=train))
    with torch.no_grad():
        # ours always encodes (x - b_dec); fold b_dec into b_enc when the source did not subtract it
        b = b_enc.float() if subtracts_b_dec else b_enc.float() + b_dec.float() @ W_enc_ds.float()
        sae.W_enc.copy_(W_enc_ds)
        sae.b_enc.copy_(b)
        sae.W_dec.copy_(W_dec_sd)
        sae.b_dec.copy_(b_dec)
    return sae.eval()


def from_saev(fpath: Path) -> SAE:
    header, st = read_saev(fpath)
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(st)
    if missing:
        raise _bad(fpath, f"its state dict lacks {sorted(missing)}")
    _split_weights(fpath, st, st["W_enc"], st["W_dec"])
    act, k = _saev_activation(header)
    train = {"imported_from": str(fpath), "source_format": "saev", "source_header": header}
    return _build(st["W_enc"], st["b_enc"], st["W_dec"], st["b_dec"], act, k, False, train)


def _safetensors_in(dpath: Path) -> Path:
    for name in ("sae_weights.safetensors", "sae.safetensors"):
        if (dpath / name).is_file():
            return dpath / name
    found = sorted(dpath.glob("*.safetensors"))
    if len(found) != 1:
        raise _bad(dpath, "expected exactly one .safetensors file beside cfg.json")
    return found[0]


def from_cfg_folder(dpath: Path) -> SAE:
    """SAELens (W_enc (d, s), W_dec, b_enc, b_dec) or sparsify (encoder.weight (s, d), encoder.bias, W_dec, b_dec)."""
    try:
        cfg = json.loads((dpath / "cfg.json").read_text())
    except json.JSONDecodeError as e:
        raise _bad(dpath, "cfg.json is not valid JSON") from e
    st = load_file(str(_safetensors_in(dpath)))
    train = {"imported_from": str(dpath), "source_config": cfg}
    if "encoder.weight" in st:
        W_enc, b_enc = st["encoder.weight"].t(), st["encoder.bias"]
        _split_weights(dpath, st, W_enc, st["W_dec"])
        k = int(cfg.get("k", 0))
        return _build(W_enc, b_enc, st["W_dec"], st["b_dec"], "topk" if k else "relu", k, True,
                      train | {"source_format": "sparsify"})
    if not {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(st):
        raise _bad(dpath, f"unknown tensor names {sorted(st)[:6]}")
    _split_weights(dpath, st, st["W_enc"], st["W_dec"])
    arch = cfg.get("architecture", "standard")
    act_name = cfg.get("activation_fn_str") or cfg.get("activation_fn") or ("topk" if arch == "topk" else "relu")
    if arch not in ("standard", "topk") or act_name not in ("relu", "topk"):
        raise _bad(dpath, f"architecture {arch!r} with activation {act_name!r} is not supported (relu or topk only)")
    k = int((cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k", 0)) or 0)
    act = "topk" if act_name == "topk" or arch == "topk" else "relu"
    if act == "topk" and k < 1:
        raise _bad(dpath, "a topk SAE without k in cfg.json")
    if cfg.get("normalize_activations") not in (None, "none"):
        log.warning("%s normalises activations (%s); its statistics are not in the folder and are not applied",
                    dpath, cfg["normalize_activations"])
    sub = bool(cfg.get("apply_b_dec_to_input", True))
    return _build(st["W_enc"], st["b_enc"], st["W_dec"], st["b_dec"], act, k, sub, train | {"source_format": "saelens"})


def import_sae(src: str | Path, out: str | Path, layer: int | None = None) -> Path:
    """Convert `src` and save it as a saevctl checkpoint folder at `out`."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InputError(f"{src} does not exist", "pass a saev sae.pt file or a SAELens/sparsify folder")
    if src.is_dir() and (src / "sae.pt").is_file():
        src = src / "sae.pt"
    if src.is_file():
        sae = from_saev(src)
    elif (src / "cfg.json").is_file():
        sae = from_cfg_folder(src)
    else:
        raise _bad(src, "no sae.pt and no cfg.json in the folder")
    if layer is not None:
        sae.cfg = SAEConfig.from_dict(sae.cfg.to_dict() | {"layer": layer})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} already exists and is not empty", "choose a new folder")
    return sae.save(out)
