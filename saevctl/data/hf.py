"""Hugging Face datasets as an image source: `hf:NAME[:split]` from the hub, `hf:/dir[:split]` saved to disk.

Needs the optional `datasets` library (pip install 'saevctl[hf]'); rows are read by index from Arrow files.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from saevctl.errors import InputError

log = logging.getLogger(__name__)

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
PROBE_TIMEOUT_S = 3.0
"""How long to wait for the hub's TCP port before calling it unreachable (huggingface_hub itself retries)."""

_LOCK = threading.Lock()
_OPEN: dict[tuple[str, str | None], Any] = {}


def parse(spec: str) -> tuple[str, str | None, bool]:
    """`hf:SOURCE[:SPLIT]` -> (source, split or None, is a local folder). The first colon separates the split,
    so hub slices such as `train[:1000]` pass through."""
    rest = spec.removeprefix(PREFIX)
    source, sep, split = rest.partition(":")
    if not source:
        raise InputError(f"no dataset named in {spec!r}", "write hf:ORG/NAME[:split] or hf:/saved/folder[:split]")
    local = source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()
    if local:
        source = str(Path(source).expanduser().resolve())
    return source, (split if sep else None), local


def normalize(spec: str) -> str:
    """The spec with a local folder made absolute, so that a resume from another folder matches."""
    source, split, _ = parse(spec)
    return f"{PREFIX}{source}" + (f":{split}" if split is not None else "")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise InputError("--images hf:... needs the datasets library", "pip install 'saevctl[hf]'") from e
    return datasets


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds, not after the hub client's retries, when the hub cannot be reached."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise InputError(
            f"cannot reach the Hugging Face hub at {url.hostname} to load {name} ({type(e).__name__})",
            f"on a machine with access run datasets.load_dataset('{name}').save_to_disk(DIR) and pass "
            "--images hf:DIR[:split], or set HF_HUB_OFFLINE=1 to use a copy in the local HF cache",
        ) from e


def _pick_split(dd: Any, source: str, split: str | None) -> Any:
    names = list(dd.keys())
    if split is None:
        split = DEFAULT_SPLIT if DEFAULT_SPLIT in names or len(names) != 1 else names[0]
    if split not in names:
        raise InputError(
            f"{source} has no split {split!r} (it has {', '.join(names)})", f"write hf:{source}:{names[0]}"
        )
    return dd[split]


def _load(source: str, split: str | None, local: bool) -> Any:
    ds_lib = _datasets()
    if local:
        try:
            loaded = ds_lib.load_from_disk(source)
        except FileNotFoundError as e:
            raise InputError(
                f"{source} is not a dataset saved with save_to_disk", "pass the folder that save_to_disk wrote"
            ) from e
        if isinstance(loaded, ds_lib.DatasetDict):
            return _pick_split(loaded, source, split)
        return loaded  # a single Dataset has no splits; a given split name is ignored
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not _offline() and not proxied:  # through a proxy a direct TCP probe proves nothing
        _check_hub_reachable(source)
    try:
        return ds_lib.load_dataset(source, split=split or DEFAULT_SPLIT)
    except Exception as e:  # the hub client raises many kinds; all mean "cannot load it"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(
            f"cannot load {source} from the Hugging Face hub ({first})",
            "check the name, split and access token (gated datasets need `huggingface-cli login`), "
            "or pass a folder saved with save_to_disk as hf:DIR[:split]",
        ) from e


def _columns(ds: Any, source: str) -> tuple[str, str | None]:
    """The first Image column, and the first ClassLabel column (or None)."""
    ds_lib = _datasets()
    image = next((k for k, f in ds.features.items() if isinstance(f, ds_lib.Image)), None)
    if image is None:
        raise InputError(f"{source} has no image column (columns: {', '.join(ds.features)})",
                         "pick a dataset with an Image feature")
    label = next((k for k, f in ds.features.items() if isinstance(f, ds_lib.ClassLabel)), None)
    return image, label


def _images_only(source: str, split: str | None, local: bool, ds: Any = None) -> Any:
    """The dataset reduced to its image column, undecoded (we decode with PIL like every other source);
    cached per process, as decoding threads open rows one by one."""
    key = (source, split)
    with _LOCK:
        if key not in _OPEN:
            ds = _load(source, split, local) if ds is None else ds
            image, _ = _columns(ds, source)
            _OPEN[key] = ds.select_columns([image]).cast_column(image, _datasets().Image(decode=False))
        return _OPEN[key]


def list_rows(spec: str) -> list[tuple[str, str | None]]:
    """(record path, label) of every row in order; the label is the ClassLabel's name."""
    source, split, local = parse(spec)
    ds = _load(source, split, local)
    _, label_col = _columns(ds, source)
    if not len(ds):
        raise InputError(f"{spec} has no rows", "pick another split")
    _images_only(source, split, local, ds)  # the decoding threads reuse this load
    names = ds.features[label_col].names if label_col else None
    # to_dict honours a selection's index mapping (ds.data would give the unselected table)
    labels = ds.select_columns([label_col]).to_dict()[label_col] if label_col else [None] * len(ds)
    base = normalize(spec)
    return [(f"{base}#{i}", names[v] if names is not None and v is not None and v >= 0 else None)
            for i, v in enumerate(labels)]


@functools.lru_cache(maxsize=64)
def _parse_record_head(head: str) -> tuple[str, str | None, bool]:
    """parse() for record paths, which are absolute: cached, as it runs once per image."""
    return parse(head)


def open_bytes(path: str) -> tuple[bytes, str]:
    """Encoded image bytes of the row named by an `hf:SOURCE[:SPLIT]#ROW` record path."""
    head, sep, row = path.rpartition("#")
    if not sep or not row.isdigit():
        raise InputError(f"bad Hugging Face image path {path!r}", "expected hf:NAME[:split]#ROW")
    source, split, local = _parse_record_head(head)
    ds = _images_only(source, split, local)
    if int(row) >= len(ds):
        raise InputError(f"{head} has no row {row}", "the dataset changed since the store was made; re-extract")
    cell = ds[int(row)][ds.column_names[0]]
    if cell is None:
        raise InputError(f"row {row} of {head} has no image", "the row is empty")
    if cell.get("bytes"):
        return cell["bytes"], path
    try:
        return Path(cell["path"]).read_bytes(), path
    except (OSError, TypeError) as e:
        raise InputError(f"cannot read the image file of row {row} of {head}", "the dataset's files moved") from e
