"""WebDataset tar shards as an image source: `wds:/data/{000000..001023}.tar`, read member by member.

The tars are listed once (member offsets indexed); each image is then one positioned read, no tar scan.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from saevctl.errors import InputError

log = logging.getLogger(__name__)

PREFIX = "wds:"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions, in order of preference when a sample has several."""
LABEL_EXTS = ("cls", "txt")
MAX_OPEN_PER_THREAD = 16
LIST_THREADS = 8
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `{000..012}` (zero padding kept, as wide as the wider end) and `{a,b}`,
    left to right, several groups allowed; the order is the order written."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = max(len(lo), len(hi)) if (lo.startswith("0") or hi.startswith("0")) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise InputError(f"cannot expand {{{body}}} in {pattern!r}", "write {000000..001023} or {a,b,c}")
    return [out for item in items for out in expand_braces(head + item + tail)]


@dataclass(frozen=True, slots=True)  # one per tar member: ImageNet has 2.5M of them
class Member:
    offset: int
    """Byte offset of the member's data in the tar."""
    size: int


@dataclass(frozen=True)
class Sample:
    tar: str
    member: str
    """Name of the image member inside the tar."""
    label: str | None


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _TarIndex:
    """Member offsets of each tar, built once per process (the listing builds it; open_image reuses it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, dict[str, Member]] = {}
        self._scanning: dict[str, threading.Lock] = {}

    def members(self, tar: str) -> dict[str, Member]:
        with self._lock:
            got = self._members.get(tar)
            if got is not None:
                return got
            tar_lock = self._scanning.setdefault(tar, threading.Lock())
        with tar_lock:  # decoding threads that ask for the same new tar wait for one scan of it
            with self._lock:
                got = self._members.get(tar)
            if got is None:
                got = _scan(tar)
                with self._lock:
                    self._members[tar] = got
        return got


def _scan(tar: str) -> dict[str, Member]:
    try:
        # "r:" refuses compressed tars: offsets into a gzip stream cannot be read by seeking.
        with tarfile.open(tar, "r:") as tf:
            return {m.name: Member(m.offset_data, m.size) for m in tf if m.isfile()}
    except FileNotFoundError as e:
        raise InputError(f"WebDataset shard {tar} does not exist", "check the path and the {a..b} range") from e
    except tarfile.ReadError as e:
        raise InputError(
            f"{tar} is not an uncompressed tar ({e})",
            "WebDataset shards must be plain .tar files (recompress .tar.gz as .tar)",
        ) from e
    except OSError as e:
        raise InputError(f"cannot read {tar} ({type(e).__name__})", "check the file and its permissions") from e


_INDEX = _TarIndex()
_LOCAL = threading.local()


def _read_text(tar: str, member: Member) -> str:
    return read_member(tar, member).decode("utf-8", errors="replace").strip()


def normalize(spec: str) -> str:
    """The spec with an absolute path (braces kept), so that a resume from another folder matches."""
    return PREFIX + os.path.abspath(os.path.expanduser(spec.removeprefix(PREFIX)))


def _samples_of(tar: str) -> tuple[list[Sample], int]:
    """One tar's samples in member order, and how many keys had no image member."""
    members = _INDEX.members(tar)
    groups: dict[str, dict[str, str]] = {}
    for name in members:  # dicts keep tar order
        key, ext = _split_key(name)
        groups.setdefault(key, {})[ext] = name
    samples, n_skipped = [], 0
    for exts in groups.values():
        image = next((exts[e] for e in IMAGE_EXTS if e in exts), None)
        if image is None:
            n_skipped += 1
            continue
        lab = next((exts[e] for e in LABEL_EXTS if e in exts), None)
        label = _read_text(tar, members[lab]) if lab else None
        samples.append(Sample(tar, image, label or None))
    return samples, n_skipped


def list_samples(spec: str) -> list[Sample]:
    """Samples in tar order, then member order; a sample without an image member is skipped (logged).
    Tars are indexed by a few threads: on a network filesystem listing is latency-bound."""
    tars = [str(Path(p).resolve()) for p in expand_braces(normalize(spec).removeprefix(PREFIX))]
    with ThreadPoolExecutor(min(LIST_THREADS, len(tars))) as pool:
        per_tar = list(pool.map(_samples_of, tars))  # map keeps the tars' order
    samples = [s for found, _ in per_tar for s in found]
    n_skipped = sum(n for _, n in per_tar)
    if n_skipped:
        log.info("%d samples in %s have no %s member and are skipped", n_skipped, spec, "/".join(IMAGE_EXTS))
    if not samples:
        raise InputError(f"no images in the WebDataset shards {spec}", f"members must end in .{', .'.join(IMAGE_EXTS)}")
    return samples


def record_path(sample: Sample) -> str:
    return f"{PREFIX}{sample.tar}#{sample.member}"


def _handle(tar: str) -> io.BufferedReader:
    """This thread's open file for `tar` (a few kept open per thread, least recently used closed first)."""
    handles: OrderedDict[str, io.BufferedReader] | None = getattr(_LOCAL, "handles", None)
    if handles is None:
        handles = _LOCAL.handles = OrderedDict()
    f = handles.get(tar)
    if f is None:
        f = open(tar, "rb")  # noqa: SIM115 - kept open across calls on purpose
        handles[tar] = f
        if len(handles) > MAX_OPEN_PER_THREAD:
            handles.popitem(last=False)[1].close()
    handles.move_to_end(tar)
    return f


def read_member(tar: str, member: Member) -> bytes:
    f = _handle(tar)
    f.seek(member.offset)
    data = f.read(member.size)
    if len(data) != member.size:
        raise InputError(f"{tar} ended inside a member (truncated tar)", "re-copy that shard")
    return data


def open_bytes(path: str) -> tuple[bytes, str]:
    """Bytes of the member named by a `wds:TAR#MEMBER` record path, and a name for messages."""
    tar, sep, name = path.removeprefix(PREFIX).rpartition("#")
    if not sep:
        raise InputError(f"bad WebDataset image path {path!r}", "expected wds:/path/shard.tar#member.jpg")
    member = _INDEX.members(tar).get(name)
    if member is None:
        raise InputError(f"{tar} has no member {name}", "the shard changed since the store was made; re-extract")
    return read_member(tar, member), f"{tar}#{name}"
