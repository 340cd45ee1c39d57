"""The edit view as plain data: one clamp runs `saevctl probe`'s own `run` with the loaded models (so its numbers
are the CLI's for the same arguments), and the controls button runs the probe's batch mode (`run_batch`) with the
random-feature and random-direction controls on images of the same class. Both run the ViT: call them through the
server's queue.
"""

from __future__ import annotations

import hashlib
from typing import Any

from saevctl.errors import InputError
from saevctl.serve import commands, pictures
from saevctl.serve.images import ImageRef
from saevctl.serve.state import Explorer

PATCH_CHOICES = ("fired", "all", "selected")
"""Where an edit applies: where each feature fires (the probe's default), every patch, or the selected ones."""
MAX_CLASSES_SENT = 1000
"""A classifier's whole before/after distribution is sent when it has at most this many classes."""


def probe_patches(patches: str, cells: str) -> str:
    """The probe's --patches for the page's choice of where to edit."""
    if patches not in PATCH_CHOICES:
        raise InputError(f"unknown patch choice {patches[:20]!r}", f"use one of {', '.join(PATCH_CHOICES)}")
    if patches != "selected":
        return patches
    if not cells.strip():
        raise InputError("no patches are selected to edit", "select patches on the image, or edit where it fires")
    return cells.strip()


def _base(ex: Explorer, clamps: list[str], patches: str) -> dict[str, Any]:
    if not clamps:
        raise InputError("no clamp is set", "set a listed feature's clamp to 0, a multiple of its max, or a value")
    return {"clamps": tuple(clamps), "patches": patches, "sae": ex.sae_path, "index": ex.idx.fpath,
            "head": ex.prober.head.name, "classes": ex.cfg.classes, "device": ex.cfg.device}


def clamp(ex: Explorer, image_id: str, clamps: list[str], patches: str) -> dict[str, Any]:
    """Before/after of the head for one edit of one image: `probe.run`, less its matplotlib figure."""
    from saevctl.probe import Config, run

    ref = ex.ref(image_id)
    cfg = Config(image=ref.path, out=ex.workdir / "probe.png", **_base(ex, clamps, patches))
    res = run(cfg, ex.prober, figure=False)
    rows, cols = res.edited_hw.nonzero()
    out: dict[str, Any] = {
        "image": ref.public(), "task": res.task, "head": res.head, "features": res.features, "values": res.values,
        "clamps": res.clamps, "patches": patches, "notes": res.notes, "summary": res.summary,
        "edited": [[int(r), int(c)] for r, c in zip(rows, cols, strict=True)],
        "cli": commands.probe(ex.target, ref.path, res.clamps, patches),
    }
    if res.task == "classify":
        if len(res.classes) <= MAX_CLASSES_SENT:
            out |= {"classes": res.classes, "before": res.before.tolist(), "after": res.after.tolist()}
    else:
        out["maps"] = pictures.dense_panels(res.task, ex.view_u8(ref), res.before, res.after, len(res.classes))
    return out


def control_images(ex: Explorer, ref: ImageRef, n: int) -> tuple[list[ImageRef], str]:
    """Up to n store images of the image's class (its own first), or, for an upload or an unlabelled store, n
    images spread evenly over the store; and a sentence saying which."""
    usable = [r for r in ex.refs.values() if "\n" not in r.path and "\t" not in r.path]  # one line each in a list
    if ref.label is not None and not ref.upload:
        same = [r for r in usable if r.label == ref.label and r.id != ref.id]
        members = ([ref] if ref in usable else []) + same
        return members[:n], f"the first {min(n, len(members))} store images of class {ref.label!r}"
    step = max(1, len(usable) // n)
    why = "an upload has no class" if ref.upload else "the store has no class labels"
    return usable[::step][:n], f"{min(n, len(usable))} images spread over the store ({why})"


def controls(ex: Explorer, image_id: str, clamps: list[str], patches: str) -> dict[str, Any]:
    """The edit on images of the same class next to the two controls, with bootstrap CIs (`probe.run_batch`)."""
    from saevctl.probe import BatchConfig, run_batch

    ref = ex.ref(image_id)
    members, how = control_images(ex, ref, ex.cfg.control_images)
    base = _base(ex, clamps, patches)
    text = "".join(f"{r.path}\t{r.label or ''}\n" for r in members)
    key = hashlib.sha256((text + repr(sorted(base.items(), key=str))).encode()).hexdigest()[:16]
    list_fpath = ex.workdir / "lists" / f"controls-{key}.txt"
    list_fpath.parent.mkdir(parents=True, exist_ok=True)
    list_fpath.write_text(text, encoding="utf-8")
    cfg = BatchConfig(images=str(list_fpath), out=ex.workdir / "controls" / f"{key}.png", n_boot=ex.cfg.n_boot,
                      seed=ex.cfg.seed, batch_size=min(16, len(members)), **base)
    res = run_batch(cfg, prober=ex.prober)
    verdict = getattr(res, "verdict", None)
    return {
        "image": ref.public(), "task": res.task, "how": how, "n_images": res.n_images, "n_failed": res.n_failed,
        "n_fired": res.n_fired, "features": res.features, "values": res.values,
        "control_features": res.control_features, "control_values": res.control_values,
        "freq_source": res.freq_source, "rows": res.rows, "specific": res.specific,
        "verdict": verdict if isinstance(verdict, dict) else None, "notes": res.notes,
        "cli": commands.probe_batch(ex.target, str(list_fpath), list(clamps), patches, ex.cfg.n_boot, ex.cfg.seed),
    }
