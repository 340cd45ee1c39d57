"""What each `saevctl features` query and `saevctl sql` asks of a mined index, and the one way they open it.

Torch- and duckdb-free at import (the CLI builds its options from these); `open_query` imports the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from saevctl import workspace
from saevctl.config import IndexOpt, IndexQuery, check_finite, opt
from saevctl.errors import IndexError_

if TYPE_CHECKING:
    from saevctl.mine.index import Index

Token = Literal["patches", "cls"]


def sae_in_index(idx: Index, sae: str | None) -> str:
    """The SAE id a query means: `sae` (a checkpoint path, id or id prefix) when given, else the workspace's SAE
    when it was mined into this index, else the index's last mined SAE."""
    if sae is not None:
        return idx.resolve_sae(sae)
    try:
        return idx.resolve_sae(workspace.get_default("sae"))
    except IndexError_:
        return idx.resolve_sae(None)


def open_index(q: IndexOpt, read_only: bool = True) -> Index:
    """The query's index, opened: `q.index`, else the one last mined in this workspace."""
    from saevctl.mine.index import Index

    return Index.open(workspace.index_or_default(q.index), read_only=read_only)


def open_query(q: IndexQuery, read_only: bool = True) -> tuple[Index, str]:
    """The query's index (see `open_index`), opened, and the id of its SAE (see `sae_in_index`)."""
    idx = open_index(q, read_only)
    try:
        return idx, sae_in_index(idx, q.sae)
    except BaseException:
        idx.close()
        raise


@dataclass(frozen=True, kw_only=True)
class FeatureQuery(IndexQuery):
    """One feature of one mined SAE."""

    id: int
    """Feature id."""

    def check(self) -> None:
        super().check()
        check_finite("id", self.id, low=0)


@dataclass(frozen=True, kw_only=True)
class TopQuery(FeatureQuery):
    """`features top`: the feature's top images, as a table and a PNG grid."""

    k: int | None = None
    """How many images (default: all stored, --top-k at mining)."""
    token: Token | None = None
    """patches or cls (default: the SAE's first token kind)."""
    out: Path | None = None
    """PNG to write (default: beside the index, in INDEX.figures/)."""

    def check(self) -> None:
        super().check()
        check_finite("k", self.k, low=1)


@dataclass(frozen=True, kw_only=True)
class ShowQuery(FeatureQuery):
    """`features show`: statistics, histogram and nearest features of one feature."""

    token: Token | None = None
    """patches or cls (default: the SAE's first token kind)."""
    n_similar: int = opt(5, flag="--similar")
    """How many similar features to list."""

    def check(self) -> None:
        super().check()
        check_finite("similar", self.n_similar, low=0)


@dataclass(frozen=True, kw_only=True)
class SimilarQuery(FeatureQuery):
    """`features similar`: the nearest features of the same SAE by decoder cosine."""

    n: int = 10
    """How many neighbours."""

    def check(self) -> None:
        super().check()
        check_finite("n", self.n, low=1)


@dataclass(frozen=True, kw_only=True)
class ListQuery(IndexQuery):
    """`features list`: features sorted by a statistic, optionally filtered."""

    sort: str = "freq"
    """freq, img_freq, mean, mean_all, max, img_mean, n_fired or feature; auroc or f1 once labelled (features
    label)."""
    where: str | None = None
    """SQL condition on those columns, e.g. "freq > 1e-4 AND max > 2"."""
    limit: int = 20
    """Rows to show."""
    ascending: bool = opt(False, flag="--asc")
    """Smallest first."""
    token: Token | None = None
    """patches or cls (default: the SAE's first token kind)."""
    label: str | None = None
    """Only features whose best class (from features label) is this name, case-insensitive."""

    def check(self) -> None:
        super().check()
        check_finite("limit", self.limit, low=1)


@dataclass(frozen=True, kw_only=True)
class PickQuery(IndexQuery):
    """`features pick`: features that look like concepts (patch tokens), by a rule stated in the output."""

    max_freq: float = 0.01
    """Sparse: fires on at most this share of patch tokens."""
    min_img_freq: float = 0.005
    """Fires on at least this share of images (not a one-off)."""
    max_img_freq: float = 0.25
    """Fires on at most this share of images (not everywhere)."""
    min_coherence: float = 0.6
    """Spatially coherent: on its median top image, at least this share of its firing patches have a firing
    4-neighbour."""
    max_border: float = 0.35
    """At most this share of its activation on the outer ring of the patch grid (a 16x16 grid's ring is 23% of it)."""
    max_padding: float = 0.05
    """At most this share of its activation on patches that are mostly letterbox padding."""
    min_sources: int = 5
    """Its top images come from at least this many source photos (the demo's crops of a photo share one)."""
    limit: int = 5
    """Features to show (most coherent first)."""
    plain: bool = False
    """Print only FEATURE, PRESENT and ABSENT images (tab-separated), one picked feature a line (for scripts)."""

    def check(self) -> None:
        super().check()
        for name in ("max_freq", "min_img_freq", "max_img_freq", "min_coherence", "max_border", "max_padding"):
            check_finite(name, getattr(self, name), low=0, high=1)
        check_finite("min_sources", self.min_sources, low=1)
        check_finite("limit", self.limit, low=1)


@dataclass(frozen=True, kw_only=True)
class MatchQuery(FeatureQuery):
    """`features match`: the closest features of another SAE to one feature of this one."""

    sae: str | None = opt(None, flag="--from")
    """SAE the feature belongs to, an id or checkpoint path (default: the workspace's SAE)."""
    to: str
    """SAE to search in (id or checkpoint path)."""
    n: int = 10
    """How many matches."""

    def check(self) -> None:
        super().check()
        check_finite("n", self.n, low=1)


@dataclass(frozen=True, kw_only=True)
class SearchQuery(IndexQuery):
    """`features search`: which features fire on (part of) a new image."""

    image: Path
    """Image file to run through the model and the SAE."""
    patches: str | None = None
    """Patches to sum over as row,col pairs: "3,4;3,5" (default: all)."""
    box: str | None = None
    """Box x0,y0,x1,y1 in pixels of the model's square input (see the PNG)."""
    n: int = 8
    """How many features."""

    def check(self) -> None:
        super().check()
        check_finite("n", self.n, low=1)


@dataclass(frozen=True, kw_only=True)
class SqlQuery(IndexOpt):
    """`saevctl sql`: one read-only statement over the index."""

    query: str = opt(argument=True)
    """One SELECT statement over the index's tables (see docs/disk-layout.md)."""
    max_rows: int = 100
    """Rows to print."""

    def check(self) -> None:
        super().check()
        check_finite("max_rows", self.max_rows, low=1)
