"""What one explorer server holds, loaded once: the mined index (read-only), the SAE's id, statistics and labels in
it, the Prober (SAE + ViT + head, checked to fit), the store's image table, uploads, and small caches. Index reads
take one lock (a DuckDB connection serves one thread at a time); ViT work is serialised by the caller's queue.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from saevctl import workspace
from saevctl.config import resolve_device
from saevctl.data import open_image
from saevctl.data.preprocess import Preprocess
from saevctl.edit.session import Prober
from saevctl.errors import CheckpointError, IndexError_, InputError
from saevctl.mine.index import Index
from saevctl.serve import commands
from saevctl.serve.config import Config
from saevctl.serve.images import ImageRef, Uploads, check_id, store_refs

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


class Lru(OrderedDict[K, V]):
    """A dict that forgets its least recently used entries past `size` (callers hold their own lock)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: K, value: V) -> V:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value

    def hit(self, key: K) -> V | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


def _open_index(cfg: Config) -> tuple[Index, str]:
    """The index (read-only) and the SAE in it that the server shows; a CLS-only SAE is refused."""
    from saevctl.mine.queries import sae_in_index

    idx = Index.open(workspace.index_or_default(cfg.index), read_only=True)
    try:
        sae_id = sae_in_index(idx, str(cfg.sae) if cfg.sae is not None else None)
        if "patches" not in idx.tokens(sae_id):
            raise IndexError_(f"SAE {sae_id} was mined on {', '.join(idx.tokens(sae_id))} tokens only",
                              "saevctl serve selects patches: pass --sae with an SAE trained on patch tokens")
        return idx, sae_id
    except BaseException:
        idx.close()
        raise


class Explorer:
    """The loaded SAE, ViT, head and index behind one server; every method returns plain data or PNG bytes."""

    def __init__(self, cfg: Config, idx: Index, sae_id: str, sae_path: Path, prober: Prober, workdir: Path) -> None:
        self.cfg, self.idx, self.sae_id, self.sae_path, self.prober = cfg, idx, sae_id, sae_path, prober
        self.workdir = workdir
        self.lock = threading.RLock()  # the index connection and the caches
        self.info = idx.sae_info(sae_id)
        self.grid = (int(self.info["grid_h"]), int(self.info["grid_w"]))
        self.preprocess = Preprocess.from_dict(self.info["model"]["preprocess"])
        self.stats = idx.feature_table(sae_id, "patches")
        level = idx.primary_label_level(sae_id)
        self.labels = ({int(r["feature"]): r for r in idx.feature_labels(sae_id, level) if r["token"] == "patches"}
                       if level else {})
        self.refs = store_refs(idx.images(sae_id))
        self.others = [s for s in idx.sae_ids() if s != sae_id]
        self.uploads = Uploads(workdir / "uploads", cfg.max_upload_bytes, cfg.max_upload_pixels)
        self.codes: Lru[str, np.ndarray] = Lru(cfg.cache_images)
        self.pictures: Lru[tuple[Any, ...], bytes] = Lru(512)
        self.exemplars: Lru[int, list[dict[str, Any]]] = Lru(256)
        self.target = commands.Target(str(idx.fpath), sae_id, str(sae_path), prober.head.name, cfg.classes)

    @classmethod
    def open(cls, cfg: Config, workdir: Path, on_status: Callable[[str], None] | None = None) -> Explorer:
        """Open the index, then load the SAE it names (or --sae), its ViT and the head, and check they match."""
        say = on_status or (lambda _: None)
        idx, sae_id = _open_index(cfg)
        try:
            info = idx.sae_info(sae_id)
            sae_path = workspace.resolve_sae_ref(cfg.sae) if cfg.sae is not None else Path(info["ckpt_path"])
            if not sae_path.exists():
                raise CheckpointError(f"the checkpoint of {sae_id} recorded in the index ({sae_path}) is gone",
                                      "pass --sae PATH to it")
            say(f"SAE {sae_id} ({info['n_latents']:,} features, layer {info['layer']}) and {info['model_spec']}")
            prober = Prober.load(sae_path, cfg.head, cfg.classes, resolve_device(cfg.device))
            if prober.sae.header.get("weights_sha256") != info["weights_sha256"]:
                raise CheckpointError(f"the checkpoint at {sae_path} is not the SAE {sae_id} mined into {idx.fpath}",
                                      "pass the checkpoint that was mined (--sae), or mine this one")
            workdir.mkdir(parents=True, exist_ok=True)
            return cls(cfg, idx, sae_id, sae_path, prober, workdir)
        except BaseException:
            idx.close()
            raise

    def close(self) -> None:
        with self.lock:
            self.idx.close()

    # --- what the page is told once ------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        head = self.prober.head
        return {
            "sae_id": self.sae_id, "sae_path": str(self.sae_path), "index": str(self.idx.fpath),
            "model": self.info["model_spec"], "layer": int(self.info["layer"]),
            "n_latents": int(self.info["n_latents"]), "n_images": len(self.refs), "grid": list(self.grid),
            "size": self.preprocess.size, "labelled": bool(self.labels), "others": self.others,
            "head": {"name": head.name, "task": head.task, "n_classes": len(head.classes)},
            "limits": {"upload_bytes": self.cfg.max_upload_bytes, "upload_pixels": self.cfg.max_upload_pixels},
            "n_features": self.cfg.n_features, "strip": self.cfg.strip, "control_images": self.cfg.control_images,
        }

    # --- images --------------------------------------------------------------------------------
    def ref(self, image_id: str) -> ImageRef:
        """A store image or an upload by id; anything else is refused (ids only, never paths)."""
        check_id(image_id)
        ref = self.uploads.get(image_id) if image_id.startswith("u") else self.refs.get(image_id)
        if ref is None:
            hint = ("upload it again (uploads live as long as the server)" if image_id.startswith("u")
                    else "pick an image from the list")
            raise InputError(f"no image {image_id} on this server", hint)
        return ref

    def list_images(self, query: str, offset: int, limit: int) -> dict[str, Any]:
        """Store images whose id, name or label contains `query` (case-insensitive), a page at a time."""
        q = query.strip().lower()
        hits = [r for r in self.refs.values()
                if not q or q == r.id or q in r.name.lower() or q in (r.label or "").lower()]
        return {"total": len(hits), "offset": offset, "images": [r.public() for r in hits[offset : offset + limit]]}

    def view_u8(self, ref: ImageRef) -> np.ndarray:
        """The image as the model sees it (resized, cropped or padded; not normalised), (size, size, 3) uint8."""
        return self.preprocess.to_uint8(open_image(ref.path))

    def cached_codes(self, image_id: str) -> np.ndarray | None:
        with self.lock:
            return self.codes.hit(image_id)

    def encode(self, image_id: str) -> np.ndarray:
        """The SAE's codes of every patch of the image, (p, s) float32: runs the ViT to the SAE's layer (call it
        through the server's ViT queue)."""
        ref = self.ref(image_id)
        codes = self.cached_codes(image_id)
        if codes is not None:
            return codes
        import torch

        _, x_bchw = self.prober.to_input([open_image(ref.path)])
        with torch.inference_mode():
            codes = self.prober.patch_codes(self.prober.prefix(x_bchw))[0].float().cpu().numpy()
        with self.lock:
            return self.codes.put(image_id, codes)

    # --- the index, under the lock -------------------------------------------------------------
    def top_exemplars(self, feature: int) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.exemplars.hit(feature)
            if rows is None:
                rows = self.exemplars.put(feature, self.idx.top_exemplars(self.sae_id, feature, token="patches"))
            return rows

    def label_of(self, feature: int) -> dict[str, Any] | None:
        """The feature's best class from `features label` (name, AUROC), where the SAE is labelled."""
        row = self.labels.get(feature)
        if row is None or row.get("class_name") is None:
            return None
        return {"name": row["class_name"], "auroc": row["auroc"], "level": row["level"]}

    def feature_row(self, feature: int) -> dict[str, Any]:
        """Id, frequency, max and label of one feature (from the tables loaded at start)."""
        return {"feature": feature, "freq": float(self.stats["freq"][feature]),
                "max": float(self.stats["max"][feature]), "label": self.label_of(feature)}

    def picture(self, key: tuple[Any, ...], draw: Callable[[], bytes]) -> bytes:
        """A PNG from the cache, drawn (outside the lock) on a miss."""
        with self.lock:
            hit = self.pictures.hit(key)
        if hit is not None:
            return hit
        data = draw()
        with self.lock:
            return self.pictures.put(key, data)
