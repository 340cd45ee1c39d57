"""Read an activation store without loading it: each (layer, kind) is a `ShardedArray` over memory maps.

`open_store(dir).layer(6).patches[10:20]` reads only those rows from disk. Imports no torch (`.torch()` loads it).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saevctl import layout
from saevctl.errors import LayerError, StoreError
from saevctl.store.format import (
    NP_DTYPES,
    TokenLayout,
    bfloat16_to_float32,
    from_numpy,
    kind_shape,
    read_manifest,
)

if TYPE_CHECKING:
    import torch


class ShardedArray:
    """Rows (images) split over shard files, indexed as one array of shape (n, ...)."""

    def __init__(self, parts: list[np.ndarray], dtype: str) -> None:
        assert parts, "a sharded array needs at least one part"
        self.parts = parts
        self.dtype = dtype
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
        self.shape: tuple[int, ...] = (self.offsets[-1], *parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _row_index(self, idx: Any) -> np.ndarray:
        """Any 1-d row index (int list/array, boolean mask) as non-negative int64 positions."""
        n = len(self)
        rows = np.asarray(idx)
        if rows.dtype == np.bool_:
            if rows.shape != (n,):
                raise IndexError(f"boolean mask of shape {rows.shape} does not fit {n} rows")
            return np.flatnonzero(rows)
        if rows.size == 0:
            return np.zeros(0, dtype=np.int64)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows must be an int, a slice, a 1-d int array or a boolean mask, not {idx!r}")
        rows = rows.astype(np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.min() < 0 or rows.max() >= n:
            raise IndexError(f"row index out of range for {n} rows")
        return rows

    def _rows(self, idx: Any) -> np.ndarray:
        if isinstance(idx, tuple):
            # (rows, rest...): pick rows from the shards, then index the remaining axes in memory.
            # A fancy first index becomes arange over the picked rows, so numpy's broadcasting rules
            # for several advanced indices give the same result as on the whole array.
            head, rest = (idx[0], idx[1:]) if idx else (slice(None), ())
            rows = self._rows(head)
            if isinstance(head, (int, np.integer)):
                return np.asarray(rows[rest])
            first = slice(None) if isinstance(head, slice) else np.arange(len(rows))
            return np.asarray(rows[(first, *rest)])
        n = len(self)
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + n if idx < 0 else int(idx)
            if not 0 <= i < n:
                raise IndexError(f"row {idx} out of range for {n} rows")
            s = bisect.bisect_right(self.offsets, i) - 1
            return np.array(self.parts[s][i - self.offsets[s]])
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                return self._rows(np.arange(start, stop, step))
            chunks = []
            for s, part in enumerate(self.parts):
                lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
                if lo < hi:
                    chunks.append(part[lo - self.offsets[s] : hi - self.offsets[s]])
            if not chunks:
                return np.empty((0, *self.shape[1:]), dtype=self.parts[0].dtype)
            return np.concatenate(chunks) if len(chunks) > 1 else np.array(chunks[0])
        rows = self._row_index(idx)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.parts[0].dtype)
        shard_of = np.searchsorted(np.asarray(self.offsets), rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self.parts[s][rows[sel] - self.offsets[s]]
        return out

    def torch(self, idx: Any = slice(None)) -> torch.Tensor:
        """Rows as a torch tensor in the stored dtype (bfloat16 stays bfloat16)."""
        return from_numpy(self._rows(idx), self.dtype)

    def __getitem__(self, idx: Any) -> np.ndarray:
        """Rows as numpy; bfloat16 stores come back as float32 (numpy has no bfloat16)."""
        rows = self._rows(idx)
        return bfloat16_to_float32(rows) if self.dtype == "bfloat16" else rows

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:]
        return a.astype(dtype) if dtype is not None else a


@dataclass
class LayerView:
    """The token kinds stored for one layer."""

    layer: int
    arrays: dict[str, ShardedArray]
    store_dpath: Path | None = None
    """The store, named when `kind` refuses it."""

    def __getattr__(self, kind: str) -> ShardedArray:
        arrays: dict[str, ShardedArray] = self.__dict__.get("arrays", {})
        if kind in arrays:
            return arrays[kind]
        raise AttributeError(f"layer {self.__dict__.get('layer')} stores no {kind!r} tokens (has {sorted(arrays)})")

    def kind(self, kind: str) -> ShardedArray:
        """The rows of one token kind, as every stage reads them: a store with no rows (none of its images could be
        read) is refused here, in one line, rather than dividing by zero later (attribute access stays lenient)."""
        if kind not in self.arrays:
            raise StoreError(
                f"the store holds no {kind!r} tokens for layer {self.layer} (it has {', '.join(self.arrays)})",
                "re-extract with --tokens including it",
            )
        if not len(self.arrays[kind]):
            where = f"the store at {self.store_dpath}" if self.store_dpath is not None else "the store"
            raise StoreError(f"{where} holds no activations: none of its images could be read "
                             "(each is listed with its error in images.jsonl)",
                             "extract again from readable images, into a new --out")
        return self.arrays[kind]


class Store:
    """An opened, complete activation store."""

    def __init__(self, dpath: Path, manifest: dict[str, Any]) -> None:
        self.dpath = dpath
        self.manifest = manifest
        cfg = manifest["config"]
        self.layers: list[int] = list(cfg["layers"])
        self.kinds: list[str] = list(cfg["tokens"])
        self.dtype: str = cfg["dtype"]
        self.model: dict[str, Any] = cfg["model"]
        self.layout = TokenLayout(**self.model["layout"])
        self.d: int = int(self.model["d_model"])
        self._views: dict[int, LayerView] = {}
        self._images: list[dict[str, Any]] | None = None

    @property
    def n_images(self) -> int:
        """Stored rows: readable images (unreadable ones are listed but have no row)."""
        return int(self.manifest["n_rows"])

    @property
    def shard_rows(self) -> list[int]:
        return [int(s["n_rows"]) for s in self.manifest["shards"]]

    def layer(self, layer: int) -> LayerView:
        if layer not in self.layers:
            raise LayerError(
                f"the store at {self.dpath} holds layers {self.layers}, not {layer}",
                f"pick one of {self.layers}, or extract layer {layer}",
            )
        if layer not in self._views:
            arrays = {}
            for kind in self.kinds:
                shards = [sh for sh in self.manifest["shards"] if sh["n_rows"] > 0] or self.manifest["shards"][:1]
                parts = [self._load_part(layer, kind, sh) for sh in shards]
                if parts:
                    arrays[kind] = ShardedArray(parts, self.dtype)
            self._views[layer] = LayerView(layer, arrays, self.dpath)
        return self._views[layer]

    def _load_part(self, layer: int, kind: str, shard: dict[str, Any]) -> np.ndarray:
        """Memory-map one shard file, checking it is the file the manifest describes."""
        fpath = layout.store_shard_dpath(self.dpath, shard["index"]) / layout.shard_array_name(layer, kind)
        hint = "delete the store and run saevctl extract again"
        try:
            part: np.ndarray = np.load(fpath, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as e:
            raise StoreError(f"the store at {self.dpath} is damaged: {fpath} is missing", hint) from e
        except (ValueError, OSError) as e:
            raise StoreError(f"the store at {self.dpath} is damaged: {fpath} is unreadable ({e})", hint) from e
        lay = self.layout
        want = (int(shard["n_rows"]), *kind_shape(kind, lay.n_patches, lay.n_reg, self.d))
        if part.dtype != NP_DTYPES[self.dtype] or part.shape != want:
            raise StoreError(
                f"the store at {self.dpath} is damaged: {fpath} holds {part.dtype} {part.shape}, "
                f"the manifest says {NP_DTYPES[self.dtype]} {want}",
                hint,
            )
        return part

    @property
    def images(self) -> list[dict[str, Any]]:
        """The image table: id, path, label, width, height, status, row (-1 when unreadable)."""
        if self._images is None:
            fpath = layout.store_images_fpath(self.dpath)
            try:
                lines = fpath.read_text().splitlines()
            except FileNotFoundError as e:
                raise StoreError(
                    f"the store at {self.dpath} is damaged: {fpath} is missing",
                    "delete the store and run saevctl extract again",
                ) from e
            self._images = [json.loads(line) for line in lines if line]
        return self._images

    def row_image_ids(self) -> np.ndarray:
        """Image id of every stored row."""
        return np.array([im["id"] for im in self.images if im["row"] >= 0], dtype=np.int64)

    # --- class labels (extract --masks; ImageFolder) -------------------------------------------------
    def labels_info(self, extra: str | None = None) -> dict[str, Any] | None:
        """labels/classes.json (schema, name, classes, source, n_labelled_rows, ...) of the default mask set, or of
        the further set in labels/<extra>/; None when that set's labels are not there (complete)."""
        fpath = layout.store_classes_fpath(self.dpath, extra)
        if not fpath.is_file():
            return None
        try:
            head = json.loads(fpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{fpath} is not valid JSON", "run the same saevctl extract --masks command again") from e
        if not isinstance(head, dict) or head.get("schema") != layout.LABELS_SCHEMA:
            raise StoreError(f"{fpath} has labels schema {head.get('schema') if isinstance(head, dict) else None}, "
                             f"this saevctl reads {layout.LABELS_SCHEMA}",
                             "re-run saevctl extract --masks into a new --out")
        return head

    def mask_sets(self) -> dict[str, str | None]:
        """The store's complete mask sets, the default (first) first: name -> labels subfolder (None: labels/ itself).
        A store of one unnamed set (older stores too) names it after its mask folder. Empty without --masks."""
        out: dict[str, str | None] = {}
        head = self.labels_info()
        if head is not None:
            out[str(head.get("name") or Path(str(head.get("source") or "masks")).name)] = None
        for entry in self.manifest["config"].get("mask_sets") or []:
            if self.labels_info(entry["name"]) is not None:
                out[entry["name"]] = entry["name"]
        return out

    def mask_set(self, name: str | None) -> str | None:
        """The labels subfolder of mask set `name` (None: the default set); a StoreError naming the sets when the
        store has no set of that name."""
        sets = self.mask_sets()
        if name is None or (name in sets and sets[name] is None):
            return None
        if name not in sets:
            have = ", ".join(sets) or "none"
            raise StoreError(f"the store {self.dpath} has no mask set {name!r} (its sets: {have})",
                             "pick one of its sets, or extract with --masks NAME=DIR")
        return sets[name]

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names of the per-patch labels by id (classes[0] is the ignored class); None without --masks."""
        return self.classes_of(None)

    def classes_of(self, extra: str | None) -> tuple[str, ...] | None:
        """`classes` of the default set (None) or of the further set in labels/<extra>/."""
        head = self.labels_info(extra)
        return tuple(head["classes"]) if head else None

    @property
    def patch_labels(self) -> np.ndarray | None:
        """Memory-mapped int16 (n_images, n_patches): class id of each patch of each stored row (aligned with the
        activations' rows), -1 unlabelled; None when the store was extracted without --masks (default set)."""
        return self.patch_labels_of(None)

    def patch_labels_of(self, extra: str | None) -> np.ndarray | None:
        """`patch_labels` of the default set (None) or of the further set in labels/<extra>/."""
        if self.labels_info(extra) is None:
            return None
        fpath = layout.store_patch_labels_fpath(self.dpath, extra)
        try:
            arr: np.ndarray = np.load(fpath, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StoreError(f"the labels of {self.dpath} are damaged: {fpath} is unreadable",
                             "run the same saevctl extract --masks command again") from e
        if arr.dtype != np.int16 or arr.shape != (self.n_images, self.layout.n_patches):
            raise StoreError(f"the labels of {self.dpath} are damaged: {fpath} holds {arr.dtype} {arr.shape}",
                             "run the same saevctl extract --masks command again")
        return arr

    @property
    def image_classes(self) -> tuple[str, ...] | None:
        """Sorted image-label names (ImageFolder subfolders or a list file's labels); None when rows carry none."""
        names = sorted({str(im["label"]) for im in self.images if im["row"] >= 0 and im.get("label") is not None})
        return tuple(names) or None

    @property
    def image_labels(self) -> np.ndarray | None:
        """int16 (n_images,): index into `image_classes` of each stored row's label, -1 none; None without labels."""
        classes = self.image_classes
        if classes is None:
            return None
        ids = {c: i for i, c in enumerate(classes)}
        rows = [im for im in self.images if im["row"] >= 0]
        out = np.full(self.n_images, -1, dtype=np.int16)
        for im in rows:
            if im.get("label") is not None:
                out[im["row"]] = ids[str(im["label"])]
        return out


def open_store(dpath: str | Path) -> Store:
    dpath = Path(dpath)
    if not dpath.is_dir():
        raise StoreError(f"activation store {dpath} does not exist", "run saevctl extract --out to make one")
    manifest = read_manifest(dpath)
    if not manifest.get("complete"):
        raise StoreError(
            f"the store at {dpath} is incomplete (extraction was interrupted)",
            "run the same saevctl extract command again to resume it",
        )
    return Store(dpath, manifest)
