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

from saevctl import lock
from saevctl.errors import CheckpointError, InputError
from saevctl.layers import resolve_layer
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


# saev header schemas checked against saev's own code (github.com/OSU-NLP-Group/saev, nn/modeling.py SCHEMA_VERSION);
# a newer one may encode differently, so it is refused rather than guessed.
SAEV_SCHEMAS = (1, 2, 3, 4, 5)
# saev commits (all 2025-07-31) whose SAE wrote schema-1 headers but no longer encoded (x - b_dec); every other
# schema-1 saev and every saev without a schema (PyPI saev 0.1.0) subtracts b_dec, schema 2 and later never do.
_SAEV_SCHEMA1_NO_BDEC = ("e7ca004660a3", "9f39cf867fc2", "f5d892c65a1b", "65c5a2b55e11", "8aecac1833f6",
                         "ea2c9f59a179", "5fee417720e4", "6845bc22bdfe", "5056de48451e", "795479bf1f82",
                         "fad99298d145", "ab690dc03fe9")


def _saev_subtracts_b_dec(fpath: Path, header: dict[str, Any]) -> bool:
    """Whether the saev that wrote `header` encoded (x - b_dec) W_enc + b_enc rather than x W_enc + b_enc."""
    schema = header.get("schema")
    if schema is None:
        return True
    if schema not in SAEV_SCHEMAS:
        raise _bad(fpath, f"saev header schema {schema!r} is not one this saevctl knows ({SAEV_SCHEMAS})")
    if schema == 1:  # saev writes `git rev-parse --short HEAD`, or "unknown"
        commit = str(header.get("commit", ""))[:12]
        return not (len(commit) >= 7 and any(c.startswith(commit) for c in _SAEV_SCHEMA1_NO_BDEC))
    return False


def _saev_version(header: dict[str, Any]) -> str:
    if "schema" not in header:
        return "saev 0.1.0 (no header schema)"
    commit = header.get("commit")
    return f"schema {header['schema']}, lib {header.get('lib', '?')}" + (
        f", commit {commit}" if commit and commit != "unknown" else "")


def _saev_activation(fpath: Path, header: dict[str, Any], state: dict[str, Tensor]) -> tuple[str, int, float]:
    """Our activation, k and inference threshold for saev's Relu / TopK / BatchTopK."""
    cfg = header.get("cfg", header)
    act = cfg.get("activation")
    if isinstance(act, dict):
        name, params = act.get("cls", "Relu"), act.get("params", {})
    else:  # schema 1A kept the activation class name at the top level
        name, params = header.get("cls", "Relu"), cfg
    k = int(params.get("top_k", 0) or 0)
    if name == "BatchTopK" and "activation.threshold" in state:
        # since schema 4 saev's eval keeps pre-acts above this running threshold (all positive ones while it is 0)
        return "batchtopk", k, max(float(state["activation.threshold"]), 0.0)
    if name in ("TopK", "BatchTopK"):  # an older BatchTopK stored no threshold: per-sample top-k is the closest
        return "topk", k, 0.0
    if name != "Relu":
        raise _bad(fpath, f"saev activation {name!r} is not supported (Relu, TopK, BatchTopK)")
    return "relu", 0, 0.0


def _split_weights(src: Path, state: dict[str, Tensor], W_enc: Tensor, W_dec: Tensor) -> tuple[int, int]:
    if W_dec.dim() != 2 or W_enc.shape != W_dec.t().shape:
        raise _bad(src, f"encoder {tuple(W_enc.shape)} and decoder {tuple(W_dec.shape)} do not fit together")
    return int(W_dec.shape[1]), int(W_dec.shape[0])


def _build(W_enc_ds: Tensor, b_enc: Tensor, W_dec_sd: Tensor, b_dec: Tensor, act: str, k: int,
           subtracts_b_dec: bool, train: dict[str, Any], threshold: float = 0.0) -> SAE:
    d, s = W_enc_ds.shape
    k = min(k, s)  # saev and sparsify select min(k, width) latents
    sae = SAE(SAEConfig(d=d, n_latents=s, activation=act, k=k, train=train))
    with torch.no_grad():
        # ours always encodes (x - b_dec); fold b_dec into b_enc (in float64) when the source did not subtract it
        b = b_enc.double() if subtracts_b_dec else b_enc.double() + b_dec.double() @ W_enc_ds.double()
        sae.W_enc.copy_(W_enc_ds)
        sae.b_enc.copy_(b)
        sae.W_dec.copy_(W_dec_sd)
        sae.b_dec.copy_(b_dec)
        # every source encodes the raw activations it is given (any scaler of theirs lives outside the file),
        # so ours must not normalise: identity statistics
        sae.act_mean.zero_()
        sae.act_scale.fill_(1.0)
        sae.threshold.fill_(threshold)
    return sae.eval()


def from_saev(fpath: Path) -> SAE:
    header, st = read_saev(fpath)
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(st)
    if missing:
        raise _bad(fpath, f"its state dict lacks {sorted(missing)}")
    _split_weights(fpath, st, st["W_enc"], st["W_dec"])
    act, k, threshold = _saev_activation(fpath, header, st)
    train = {"imported_from": str(fpath), "source_format": "saev", "source_version": _saev_version(header),
             "source_header": header}
    return _build(st["W_enc"], st["b_enc"], st["W_dec"], st["b_dec"], act, k, _saev_subtracts_b_dec(fpath, header),
                  train, threshold)


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
        return _from_sparsify(dpath, cfg, st, train)
    return _from_saelens(dpath, cfg, st, train)


def _from_sparsify(dpath: Path, cfg: dict[str, Any], st: dict[str, Tensor], train: dict[str, Any]) -> SAE:
    """sparsify's SparseCoder: codes = top-k of relu((x - b_dec) encoder.weight^T + encoder.bias)."""
    if "W_dec" not in st or "b_dec" not in st:
        raise _bad(dpath, "a sparsify folder without a decoder (W_dec, b_dec)")
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in st:
        raise _bad(dpath, "only sparsify top-k autoencoders are supported (no groupmax, transcoder or skip connection)")
    W_enc, b_enc = st["encoder.weight"].t(), st["encoder.bias"]
    _split_weights(dpath, st, W_enc, st["W_dec"])
    k = int(cfg.get("k", 32))  # sparsify's SparseCoderConfig default
    train |= {"source_format": "sparsify", "source_version": "unknown"}  # its cfg.json records no package version
    return _build(W_enc, b_enc, st["W_dec"], st["b_dec"], "topk", k, True, train)


def _saelens_norm(dpath: Path, cfg: dict[str, Any]) -> None:
    norm = cfg.get("normalize_activations")
    if norm in ("constant_norm_rescale", "layer_norm"):  # applied per token by SAELens's SAE: not one mean and scale
        raise _bad(dpath, f"normalize_activations {norm!r} rescales each token; only 'none' can be imported exactly")
    if norm not in (None, "none"):  # SAELens's own SAE.encode applies none of these either
        log.warning("%s normalises activations (%s); its statistics are not in the folder and are not applied",
                    dpath, norm)


def _from_saelens(dpath: Path, cfg: dict[str, Any], st: dict[str, Tensor], train: dict[str, Any]) -> SAE:
    """SAELens standard (ReLU) and topk SAEs: codes = act((x - b_dec * apply_b_dec_to_input) W_enc + b_enc)."""
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
    _saelens_norm(dpath, cfg)
    W_enc, b_enc, W_dec = st["W_enc"].double(), st["b_enc"].double(), st["W_dec"].double()
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scales pre-acts by each decoder row's norm and divides codes by it before decoding: fold both in
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    sub = bool(cfg.get("apply_b_dec_to_input", True))
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version") or "unknown"
    train |= {"source_format": "saelens", "source_version": str(version)}
    return _build(W_enc, b_enc, W_dec, st["b_dec"], act, k, sub, train)


def import_sae(src: str | Path, out: str | Path, layer: int | None = None) -> Path:
    """Convert `src` and save it as a saevctl checkpoint folder at `out`; `layer` (>= 0) is the block it reads,
    None when unknown."""
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
        # the source records no model, so only a block number from 0 can be stored (None stays "unknown")
        layer = resolve_layer(layer, None, what="the imported SAE's model")
        sae.cfg = SAEConfig.from_dict(sae.cfg.to_dict() | {"layer": layer})
    with lock.exclusive(out, "the imported SAE"):  # two imports into one --out: the second is one line
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InputError(f"--out {out} already exists and is not empty", "choose a new folder")
        return sae.save(out)
