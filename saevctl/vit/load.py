"""Turn a model spec string into a loaded, frozen `Backbone`, with one clear error for every failure.

Hub names are really fetched when a hub is reachable; offline they fail with a hint to use `local-dir:`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from saevctl.errors import ModelError
from saevctl.vit.backbone import Backbone

log = logging.getLogger(__name__)

SPEC_FORMS = "demo, timm:NAME, local-dir:/path, hf-hub:org/name, open_clip:ARCH/PRETRAINED"


def parse_spec(spec: str) -> tuple[str, str]:
    """Split 'kind:rest' into (kind, rest); 'demo' has no rest."""
    if spec == "demo":
        return "demo", ""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("timm", "local-dir", "hf-hub", "open_clip") or not rest:
        raise ModelError(f"unknown model name {spec!r}", f"use one of: {SPEC_FORMS}")
    return kind, rest


def _offline_hint(spec: str) -> str:
    if spec.startswith("open_clip:"):
        arch = spec.removeprefix("open_clip:").split("/", 1)[0]
        return (
            "no model hub is reachable from here; copy the checkpoint file here and pass "
            f"open_clip:{arch}/path/to/checkpoint.safetensors"
        )
    return (
        "no model hub is reachable from here; save the model as a folder with config.json + "
        f"model.safetensors and pass local-dir:/that/folder (asked for {spec})"
    )


def _check_hub_reachable(spec: str) -> None:
    """Fail in seconds, not after minutes of download retries, when the hub cannot be reached."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"cannot download {spec}: HF_HUB_OFFLINE=1 is set", _offline_hint(spec))
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise ModelError(f"cannot download {spec}: the model hub ({host}) is unreachable", _offline_hint(spec)) from e


def _hub_error(spec: str, e: Exception) -> ModelError:
    text = f"{type(e).__name__}: {e}".lower()
    offline_words = ("connect", "offline", "resolve", "network", "timed out", "max retries", "localentrynotfound")
    if any(w in text for w in offline_words):
        return ModelError(f"cannot download {spec}: the model hub is unreachable", _offline_hint(spec))
    return ModelError(f"cannot load {spec}: {str(e).splitlines()[0][:200]}", f"check the name; forms: {SPEC_FORMS}")


def _load_timm(kind: str, rest: str, spec: str) -> Backbone:
    import timm

    from saevctl.vit.timm_backbone import TimmBackbone

    if kind == "local-dir":
        dpath = Path(rest).expanduser()
        missing = [n for n in ("config.json", "model.safetensors") if not (dpath / n).is_file()]
        if missing:
            raise ModelError(
                f"{dpath} is not a timm model folder (missing {', '.join(missing)})",
                "a local-dir: model needs config.json and model.safetensors, as timm's save_for_hf writes",
            )
        try:
            cfg = json.loads((dpath / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"{dpath / 'config.json'} is not valid JSON", "re-save the model folder") from e
        if "architecture" not in cfg:
            raise ModelError(f"{dpath / 'config.json'} names no architecture", "re-save it with timm's save_for_hf")
        name = f"local-dir:{dpath.resolve()}"
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:
            raise ModelError(f"cannot load {spec}: {str(e).splitlines()[0][:200]}", "re-save the folder") from e
        return TimmBackbone(model, spec)
    if kind == "timm":
        base = rest.split(".", 1)[0]
        if not timm.list_models(base) and not timm.list_models(rest):
            raise ModelError(
                f"unknown timm model {rest!r}", "see timm.list_models('vit_*') for names, or use local-dir:/path"
            )
        name = rest
    else:
        name = f"hf-hub:{rest}"
    _check_hub_reachable(spec)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise _hub_error(spec, e) from e
    return TimmBackbone(model, spec)


def _load_open_clip(rest: str, spec: str) -> Backbone:
    import open_clip

    from saevctl.vit.openclip_backbone import OpenClipBackbone

    arch, _, pretrained = rest.partition("/")
    if arch not in open_clip.list_models():
        raise ModelError(f"unknown open_clip architecture {arch!r}", "see open_clip.list_models() for names")
    if pretrained and ("/" in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth"))):
        fpath = Path(pretrained).expanduser()
        if not fpath.is_file():
            raise ModelError(f"open_clip checkpoint {fpath} does not exist", "give the path of a checkpoint file")
        pretrained = str(fpath)
    elif pretrained:
        _check_hub_reachable(spec)
    try:
        clip = open_clip.create_model(arch, pretrained=pretrained or None)
    except Exception as e:
        raise _hub_error(spec, e) from e
    return OpenClipBackbone(clip, spec)


def load_backbone(spec: str, device: str | torch.device = "cpu") -> Backbone:
    """Load a frozen backbone in eval mode on `device`."""
    kind, rest = parse_spec(spec)
    if kind == "demo":
        from saevctl.vit.demo import load_demo_backbone

        bb = load_demo_backbone()
    elif kind == "open_clip":
        bb = _load_open_clip(rest, spec)
    else:
        bb = _load_timm(kind, rest, spec)
    log.info("loaded %s (%d blocks, width %d)", spec, bb.n_blocks, bb.d_model)
    return bb.to(device).eval()
