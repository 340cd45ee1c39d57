"""Turn a model spec string into a loaded, frozen `Backbone`, with one clear error for every failure.

Hub names are really fetched when a hub is reachable; offline they fail with a hint to use `local-dir:`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from saevctl.errors import ModelError
from saevctl.vit.backbone import Backbone

log = logging.getLogger(__name__)

SPEC_FORMS = "demo, timm:NAME, local-dir:/path, hf-hub:org/name, open_clip:ARCH/TAG, open_clip:ARCH/path/to/ckpt"
CKPT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
            f"to work offline, copy the checkpoint file here and pass open_clip:{arch}/path/to/checkpoint.safetensors"
        )
    return (
        "to work offline, save the model as a folder with config.json + model.safetensors "
        "(timm's save_for_hf writes them) and pass local-dir:/that/folder"
    )


def _hub_timeout() -> float:
    try:
        return float(os.environ.get("SAEVCTL_HUB_TIMEOUT", "3"))
    except ValueError:
        return 3.0


@functools.lru_cache(maxsize=8)
def _hub_reachable(endpoint: str, timeout: float) -> bool:
    """One bounded probe per process: does the hub answer an HTTP request within `timeout` seconds?

    A plain TCP connect is not enough (intercepting proxies accept every connection), and name lookup
    has no timeout of its own, so the whole request runs in a daemon thread that is abandoned when slow.
    """
    result: list[bool] = []

    def probe() -> None:
        req = urllib.request.Request(endpoint.rstrip("/") + "/", method="HEAD")
        try:
            urllib.request.urlopen(req, timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # it answered, if only with an error status
        except (OSError, ValueError):
            result.append(False)

    t = threading.Thread(target=probe, daemon=True, name="saevctl-hub-probe")
    t.start()
    t.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_access(spec: str, hub_files: tuple[str, list[str]] | None = None) -> Iterator[None]:
    """Reach the hub when it answers; otherwise serve the name from the local Hugging Face cache only.

    Offline, huggingface_hub would retry each file for half a minute; in its offline mode it answers
    from the cache at once, so a model downloaded earlier still loads and a new one fails in seconds.
    """
    from huggingface_hub import constants

    endpoint = str(constants.ENDPOINT)
    offline = bool(constants.HF_HUB_OFFLINE) or not _hub_reachable(endpoint, _hub_timeout())
    if not offline:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set" if old else f"the model hub ({endpoint}) is unreachable"
    error = ModelError(f"cannot download {spec}: {why} and it is not in the local cache", _offline_hint(spec))
    if hub_files is not None and not _any_cached(*hub_files):
        raise error  # before timm spends seconds building a model it cannot fill
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    except Exception as e:
        raise error from e
    finally:
        constants.HF_HUB_OFFLINE = old


def _any_cached(repo_id: str, filenames: list[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except Exception:  # an odd repo id: let the real loader report it
            return True
    return False


def _timm_hub_files(name: str) -> tuple[str, list[str]] | None:
    """(repo, candidate weight files) a timm: or hf-hub: name is loaded from; None when it is not the HF hub."""
    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:").split("@", 1)[0], ["config.json"]
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if cfg is None or not repo:
        return None
    files = [f for f in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if f]
    return repo.split("@", 1)[0], files


def _hub_error(spec: str, e: Exception) -> ModelError:
    """An error from a hub download, reached online: a wrong name or tag, or a flaky network."""
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
    try:
        with _hub_access(spec, _timm_hub_files(name)):
            model = timm.create_model(name, pretrained=True)
    except ModelError:
        raise
    except Exception as e:
        raise _hub_error(spec, e) from e
    return TimmBackbone(model, spec)


def _open_clip_checkpoint(arch: str, pretrained: str) -> Path | None:
    """The local checkpoint file named after `ARCH/`, or None when `pretrained` is a hub tag.

    `open_clip:ARCH/ckpt.safetensors` and `open_clip:ARCH/rel/dir/ckpt.bin` are relative to the working
    folder; an absolute path may be written `open_clip:ARCH//abs/ckpt.bin` or `open_clip:ARCH/abs/ckpt.bin`.
    """
    if "/" not in pretrained and not pretrained.endswith(CKPT_SUFFIXES):
        return None
    fpath = Path(pretrained).expanduser()
    if not fpath.is_absolute() and not fpath.exists() and Path("/" + pretrained).is_file():
        fpath = Path("/" + pretrained)
    if not fpath.is_file():
        raise ModelError(
            f"open_clip checkpoint {fpath} does not exist",
            f"pass open_clip:{arch}/path/to/checkpoint (.safetensors, .bin, .pt) or open_clip:{arch}/TAG",
        )
    return fpath


class _DropOpenClipRootRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and "open_clip" in record.pathname)


@contextlib.contextmanager
def _quiet_open_clip_root_logs() -> Iterator[None]:
    """open_clip reports a failed download with logging.error on the root logger; our error says it once."""
    flt = _DropOpenClipRootRecords()
    logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


def _load_open_clip(rest: str, spec: str) -> Backbone:
    import open_clip

    from saevctl.vit.openclip_backbone import OpenClipBackbone

    arch, _, pretrained = rest.partition("/")
    if arch not in open_clip.list_models():
        raise ModelError(f"unknown open_clip architecture {arch!r}", "see open_clip.list_models() for names")
    if not pretrained:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:4]) or "none known"
        raise ModelError(
            f"{spec} names no weights (a random model is useless here)",
            f"write open_clip:{arch}/TAG (tags: {tags}) or open_clip:{arch}/path/to/checkpoint",
        )
    fpath = _open_clip_checkpoint(arch, pretrained)
    if fpath is not None:
        try:
            clip = open_clip.create_model(arch, pretrained=str(fpath))
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise ModelError(
                f"cannot load {fpath} into open_clip {arch}: {first}",
                f"pass a checkpoint saved from an open_clip {arch} model (its state_dict)",
            ) from e
        return OpenClipBackbone(clip, spec)
    known = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained.lower() not in {t.lower() for t in known}:
        raise ModelError(
            f"open_clip {arch} has no pretrained tag {pretrained!r} (known: {', '.join(known) or 'none'})",
            f"pick a known tag, or pass a checkpoint file as open_clip:{arch}/path/to/checkpoint",
        )
    try:
        with _hub_access(spec), _quiet_open_clip_root_logs():
            clip = open_clip.create_model(arch, pretrained=pretrained)
    except ModelError:
        raise
    except Exception as e:
        raise _hub_error(spec, e) from e
    return OpenClipBackbone(clip, spec)


def load_backbone(spec: str, device: str | torch.device = "cpu") -> Backbone:
    """Load a frozen backbone in eval mode on `device`."""
    kind, rest = parse_spec(spec)
    bb: Backbone
    if kind == "demo":
        from saevctl.vit.demo import load_demo_backbone

        bb = load_demo_backbone()
    elif kind == "open_clip":
        bb = _load_open_clip(rest, spec)
    else:
        bb = _load_timm(kind, rest, spec)
    log.info("loaded %s (%d blocks, width %d)", spec, bb.n_blocks, bb.d_model)
    return bb.to(device).eval()
