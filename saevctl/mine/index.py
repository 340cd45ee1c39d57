"""Read (and migrate) a mined index: one DuckDB file holding features, exemplars and image -> feature rows.

`Index.open(path)` is the one way in for every reader (features commands, probe, report); SQL uses bound
parameters only. The schema and its meaning live in schema.py and docs/disk-layout.md; bulk reads in index_reads.py.
Imports no torch, so the report and other readers of the index run without it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from saevctl import layout
from saevctl.errors import IndexError_
from saevctl.mine import index_reads
from saevctl.mine.index_reads import dict_rows as _rows
from saevctl.mine.schema import FORMAT, MIGRATIONS, hist_edges
from saevctl.workspace import resolve_ckpt

log = logging.getLogger(__name__)
assert len(MIGRATIONS) == layout.INDEX_SCHEMA, "bump layout.INDEX_SCHEMA with each migration"

SORTABLE = ("feature", "freq", "img_freq", "mean", "mean_all", "max", "img_mean", "n_fired")
LABEL_SORTABLE = index_reads.LABEL_SORTABLE
LABEL_LEVELS = ("patch", "image")


# Every connection: an index needs no extension, and a query naming one (sqlite_scan, st_point) must not make
# DuckDB download and load code from the network.
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def _connect(fpath: Path, read_only: bool, config: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """The one place an index file is opened (every reader and writer)."""
    if read_only and not fpath.is_file():
        raise IndexError_(f"no index at {fpath}", "run saevctl mine --sae CKPT --store DIR first, or pass --index")
    try:
        return duckdb.connect(str(fpath), read_only=read_only, config={**NO_EXTENSIONS, **(config or {})})
    except duckdb.Error as e:
        text = str(e)
        if "conflicting lock" in text.lower() or "could not set lock" in text.lower():
            raise IndexError_(
                f"the index {fpath} is locked by another process",
                "wait for that process (a running saevctl mine or a duckdb shell) to finish, then retry",
            ) from e
        raise IndexError_(
            f"the index {fpath} is corrupt or not a DuckDB file ({text.splitlines()[0][:120]})",
            "delete it and run saevctl mine again",
        ) from e


class Index:
    """An opened index file. Use as a context manager or call close()."""

    def __init__(self, fpath: Path, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        self.fpath = fpath
        self.con = con
        self.read_only = read_only
        self._info: dict[str, dict[str, Any]] = {}  # sae_info per SAE; a read-only file cannot change

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, read_only: bool = True) -> Index:
        """Open an existing index; a missing, locked, corrupt or newer-schema file is a one-line IndexError_."""
        fpath = Path(path)
        # Readers take user text (--where, saevctl sql): with no file access, it cannot read or write elsewhere.
        con = _connect(fpath, read_only, {"enable_external_access": False} if read_only else None)
        idx = cls(fpath, con, read_only)
        try:
            idx._check_schema()
        except BaseException:
            con.close()
            raise
        return idx

    @classmethod
    def create(cls, path: str | Path) -> Index:
        """A new, empty index at `path` (the writer's temporary file)."""
        fpath = Path(path)
        assert not fpath.exists(), fpath
        idx = cls(fpath, _connect(fpath, read_only=False), read_only=False)
        idx._migrate(0)
        idx.con.execute("INSERT INTO meta VALUES ('format', ?)", [FORMAT])
        return idx

    def _version(self) -> int:
        try:
            row = self.con.execute("SELECT max(version) FROM schema_migrations").fetchone()
        except duckdb.CatalogException as e:
            raise IndexError_(
                f"{self.fpath} is a DuckDB file but not a saevctl index", "pass the index saevctl mine wrote"
            ) from e
        return int(row[0] or 0) if row else 0

    def _check_schema(self) -> None:
        version = self._version()
        if version > len(MIGRATIONS):
            raise IndexError_(
                f"the index {self.fpath} has schema {version}, this saevctl reads up to {len(MIGRATIONS)}",
                "upgrade saevctl, or mine again into a new --index",
            )
        if version < len(MIGRATIONS):
            if self.read_only:
                raise IndexError_(
                    f"the index {self.fpath} has the older schema {version}",
                    "run saevctl mine (or saevctl features label) once on it to upgrade it",
                )
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER, applied_at TIMESTAMP)")
        for v in range(version, len(MIGRATIONS)):
            self.con.execute("BEGIN TRANSACTION")
            for stmt in MIGRATIONS[v]:
                self.con.execute(stmt)
            self.con.execute("INSERT INTO schema_migrations VALUES (?, now())", [v + 1])
            self.con.execute("COMMIT")
            log.info("migrated %s to index schema %d", self.fpath, v + 1)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- SAEs ------------------------------------------------------------------------------------
    def sae_ids(self) -> list[str]:
        """Every mined SAE, oldest first."""
        return [r[0] for r in self.con.execute("SELECT sae_id FROM saes ORDER BY seq").fetchall()]

    def sae_info(self, sae_id: str) -> dict[str, Any]:
        """The saes row plus its store's model description (spec, preprocess, layout...) as `model`."""
        if sae_id in self._info:
            return dict(self._info[sae_id])
        rows = _rows(self.con.execute(
            "SELECT s.*, st.model AS store_model, st.path AS store_path FROM saes s "
            "LEFT JOIN stores st USING (store_id) WHERE sae_id = ?", [sae_id]))
        if not rows:
            raise IndexError_(
                f"the index {self.fpath} has no SAE {sae_id!r}", f"mined SAEs: {', '.join(self.sae_ids()) or 'none'}"
            )
        info = rows[0]
        info["model"] = json.loads(info.pop("store_model") or "{}")
        info["config"] = json.loads(info["config"] or "{}")
        info["tokens"] = tuple(json.loads(info["tokens"]))
        if self.read_only:
            self._info[sae_id] = info
        return dict(info)

    def resolve_sae(self, ref: str | Path | None) -> str:
        """An SAE id from a checkpoint path, an id (or unique prefix of one), or None for the last mined."""
        ids = self.sae_ids()
        if not ids:
            raise IndexError_(f"the index {self.fpath} holds no mined SAE", "run saevctl mine --sae CKPT --store DIR")
        if ref is None or str(ref) == "":
            return ids[-1]
        ref = str(ref)
        if ref in ids:
            return ref
        p = Path(ref).expanduser()
        if p.exists():
            p = resolve_ckpt(p)  # a one-SAE `train --out` folder names its only checkpoint
        cfg_fpath = layout.sae_config_fpath(p if p.is_dir() else p.parent)
        if p.exists() and cfg_fpath.is_file():
            try:
                sha = json.loads(cfg_fpath.read_text()).get("weights_sha256")
            except json.JSONDecodeError:
                sha = None
            row = self.con.execute(
                "SELECT sae_id FROM saes WHERE weights_sha256 = ? ORDER BY seq DESC LIMIT 1", [sha]).fetchone()
            if row:
                return str(row[0])
            raise IndexError_(
                f"the SAE at {p} has not been mined into {self.fpath}", f"run saevctl mine --sae {p} --store DIR"
            )
        matches = [i for i in ids if i.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise IndexError_(
            f"no SAE {ref!r} in {self.fpath}" + (" (ambiguous prefix)" if matches else ""),
            f"use one of: {', '.join(ids)}",
        )

    def n_features(self, sae_id: str) -> int:
        return int(self.sae_info(sae_id)["n_latents"])

    def tokens(self, sae_id: str) -> tuple[str, ...]:
        """Token kinds mined for this SAE; the first is the default for every query."""
        kinds: tuple[str, ...] = self.sae_info(sae_id)["tokens"]
        return kinds

    def _token(self, sae_id: str, token: str | None) -> str:
        kinds = self.tokens(sae_id)
        if token is None:
            return kinds[0]
        if token not in kinds:
            raise IndexError_(
                f"SAE {sae_id} was mined on {', '.join(kinds)} tokens, not {token}", "drop --token or pick one of those"
            )
        return token

    def check_feature(self, sae_id: str, feature: int) -> int:
        from saevctl.edit.clamps import check_features

        check_features([int(feature)], self.n_features(sae_id))
        return int(feature)

    # --- features --------------------------------------------------------------------------------
    def feature_stats(self, sae_id: str, feature: int, token: str | None = None) -> dict[str, Any]:
        """freq (firing fraction of tokens), img_freq, mean (when firing), mean_all, max, img_mean, n_fired."""
        feature, token = self.check_feature(sae_id, feature), self._token(sae_id, token)
        rows = _rows(self.con.execute(
            "SELECT * FROM features WHERE sae_id = ? AND token = ? AND feature = ?", [sae_id, token, feature]))
        assert rows, (sae_id, token, feature)
        return rows[0]

    def histogram(self, sae_id: str, feature: int, token: str | None = None) -> list[dict[str, Any]]:
        """Every log10 bin of firing values (bin, lo, hi, count), empty bins included."""
        feature, token = self.check_feature(sae_id, feature), self._token(sae_id, token)
        counts = dict(self.con.execute(
            "SELECT bin, count FROM histograms WHERE sae_id = ? AND token = ? AND feature = ?",
            [sae_id, token, feature]).fetchall())
        return [
            {"bin": i, "lo": lo, "hi": hi, "count": int(counts.get(i, 0))} for i, (lo, hi) in enumerate(hist_edges())
        ]

    def top_exemplars(
        self, sae_id: str, feature: int, k: int | None = None, token: str | None = None
    ) -> list[dict[str, Any]]:
        """Best images first: rank, image_id, path, label, value, n_fired, acts (float32 array over the
        patch grid, row-major; empty for CLS), grid (rows, cols)."""
        feature, token = self.check_feature(sae_id, feature), self._token(sae_id, token)
        info = self.sae_info(sae_id)
        rows = _rows(self.con.execute(
            "SELECT e.rank, e.image_id, i.path, i.label, e.value, e.n_fired, e.acts FROM exemplars e "
            "LEFT JOIN images i ON i.store_id = ? AND i.image_id = e.image_id "
            "WHERE e.sae_id = ? AND e.token = ? AND e.feature = ? ORDER BY e.rank LIMIT ?",
            [info["store_id"], sae_id, token, feature, int(k if k is not None else info["top_k"])]))
        grid = (int(info["grid_h"]), int(info["grid_w"]))
        for r in rows:
            r["acts"], r["grid"] = index_reads.decode_acts(r["acts"]), grid
        return rows

    def list_features(
        self, sae_id: str, sort: str = "freq", where: str | None = None, limit: int = 20,
        token: str | None = None, descending: bool = True, label: str | None = None,
    ) -> list[dict[str, Any]]:
        """Feature rows sorted by a statistic; `where` is a SQL condition on the features table's columns.

        When the SAE is labelled (`features label`), rows also carry `label`, `auroc` and `f1` of the primary
        level (patch, else image), which `where` and `sort` may use; `label` keeps features whose best class
        is that name (case-insensitive)."""
        level = self.primary_label_level(sae_id)
        sortable = SORTABLE + (LABEL_SORTABLE if level else ())
        if sort not in sortable:
            raise IndexError_(f"cannot sort by {sort!r}", f"use one of {', '.join(sortable)}")
        if label is not None and level is None:
            raise IndexError_(
                f"SAE {sae_id} has no labels to filter by", f"run saevctl features label --sae {sae_id} first"
            )
        token = self._token(sae_id, token)
        rows = index_reads.list_features(self.con, sae_id, token, level, sort, where, limit, descending, label,
                                         sortable)
        if level is None or token != "patches":
            for r in rows:
                for k in ("label", "auroc", "f1"):
                    r.pop(k, None)
        return rows

    # --- labels (saevctl features label) ----------------------------------------------------------
    def label_levels(self, sae_id: str) -> list[str]:
        """Levels this SAE has labels at ('patch', 'image'), patch first."""
        got = {r[0] for r in self.con.execute(
            "SELECT DISTINCT level FROM class_features WHERE sae_id = ?", [sae_id]).fetchall()}
        return [lv for lv in LABEL_LEVELS if lv in got]

    def primary_label_level(self, sae_id: str) -> str | None:
        """The level `features list/show` and the report show: patch when labelled at patch level, else image."""
        levels = self.label_levels(sae_id)
        return levels[0] if levels else None

    def feature_labels(self, sae_id: str, level: str | None = None) -> list[dict[str, Any]]:
        """One row per (feature, level): the feature's best class by AUROC (ties: F1); class_id/class_name are
        None for a feature that never fired on labelled data. Columns as the feature_labels table."""
        return _rows(self.con.execute(
            "SELECT * FROM feature_labels WHERE sae_id = ? AND (? IS NULL OR level = ?) ORDER BY level DESC, feature",
            [sae_id, level, level]))

    def feature_label(self, sae_id: str, feature: int) -> list[dict[str, Any]]:
        """One feature's label rows (one per level, patch first); empty when the SAE is not labelled."""
        feature = self.check_feature(sae_id, feature)
        return _rows(self.con.execute(
            "SELECT * FROM feature_labels WHERE sae_id = ? AND feature = ? ORDER BY level DESC", [sae_id, feature]))

    def class_features(self, sae_id: str, level: str | None = None) -> list[dict[str, Any]]:
        """One row per (class, level): n_positive and the class's best feature by AUROC (feature None when the
        class has no positives or no negatives). Columns as the class_features table."""
        return _rows(self.con.execute(
            "SELECT * FROM class_features WHERE sae_id = ? AND (? IS NULL OR level = ?) ORDER BY level DESC, class_id",
            [sae_id, level, level]))

    def label_coverage(self, sae_id: str, level: str, min_auroc: float) -> float:
        """Share of classes with positives whose best feature reaches `min_auroc` (0.0 when no class has any)."""
        row = self.con.execute(
            "SELECT count(*) FILTER (WHERE auroc >= ?), count(*) FROM class_features "
            "WHERE sae_id = ? AND level = ? AND n_positive > 0", [float(min_auroc), sae_id, level]).fetchone()
        assert row is not None, "an aggregate query returns one row"
        hit, total = row
        return float(hit) / float(total) if total else 0.0

    # --- images ----------------------------------------------------------------------------------
    def images(self, sae_id: str) -> list[dict[str, Any]]:
        """The image table of the store this SAE was mined on."""
        store_id = self.sae_info(sae_id)["store_id"]
        return _rows(
            self.con.execute(
                'SELECT image_id, "row", path, label, width, height FROM images WHERE store_id = ? ORDER BY image_id',
                [store_id],
            )
        )

    def image_features(self, sae_id: str, image_id: int, token: str | None = None) -> list[dict[str, Any]]:
        """The image's top features (rank, feature, value), from the per-image table (no rescan)."""
        token = self._token(sae_id, token)
        return _rows(self.con.execute(
            "SELECT rank, feature, value FROM image_features WHERE sae_id = ? AND token = ? AND image_id = ? "
            "ORDER BY rank", [sae_id, token, int(image_id)]))

    def fingerprint(self) -> str:
        """What the index holds, for the stages that read it to decide on a rerun (saevctl.rerun): every SAE's
        mining inputs and labels record; it changes when an SAE is mined or labelled anew."""
        return index_reads.fingerprint(self.con)

    @classmethod
    def fingerprint_of(cls, ref: str | Path | None) -> list[str | None] | None:
        """[path, fingerprint] of the index at `ref` (else the workspace's), None when there is none."""
        from saevctl import workspace

        ref = ref if ref is not None else workspace.get_default("index")
        fpath = Path(ref).expanduser() if ref is not None else None
        if fpath is None or not fpath.is_file():
            return None
        try:
            with cls.open(fpath, read_only=True) as idx:
                return [str(fpath.resolve()), idx.fingerprint()]
        except IndexError_:
            return [str(fpath.resolve()), None]

    def images_without_feature(self, sae_id: str, feature: int, token: str | None = None) -> list[str]:
        """Paths of the stored images (by id) whose top features (mine --top-n) leave `feature` out."""
        store_id, token = self.sae_info(sae_id)["store_id"], self._token(sae_id, token)
        rows = self.con.execute(
            'SELECT i.path FROM images i WHERE i.store_id = ? AND i."row" >= 0 AND NOT EXISTS (SELECT 1 FROM '
            "image_features f WHERE f.sae_id = ? AND f.token = ? AND f.image_id = i.image_id AND f.feature = ?) "
            "ORDER BY i.image_id", [store_id, sae_id, token, int(feature)]).fetchall()
        return [str(r[0]) for r in rows]

    def image_ids_by_path(self, sae_id: str, paths: list[str]) -> list[int]:
        """Ids, in this SAE's store, of the images with these paths (for matching across models)."""
        store_id = self.sae_info(sae_id)["store_id"]
        rows = self.con.execute(
            'SELECT image_id FROM images WHERE store_id = ? AND list_contains(?, path) AND "row" >= 0 '
            "ORDER BY image_id", [store_id, [str(p) for p in paths]]).fetchall()
        return [int(r[0]) for r in rows]

    def contrast_features(
        self, sae_id: str, image_ids: list[int], n: int = 10, token: str | None = None
    ) -> list[dict[str, Any]]:
        """Features that fire more on `image_ids` than on every other image, from the per-image top-n table.

        score = (mean score on the set - mean score on the rest) / the feature's max; an image where a
        feature is outside the stored top-n counts as 0 for it.
        """
        token = self._token(sae_id, token)
        n_images = int(self.sae_info(sae_id)["n_images"])
        if not image_ids:
            return []
        return index_reads.contrast_features(self.con, sae_id, token, [int(i) for i in image_ids], n_images, n)

    def feature_count(self, sae_id: str, token: str | None = None) -> dict[str, int]:
        """How many features are alive (fired at least once) and dead."""
        token = self._token(sae_id, token)
        row = self.con.execute(
            "SELECT count(*) FILTER (WHERE n_fired > 0), count(*) FROM features WHERE sae_id = ? AND token = ?",
            [sae_id, token]).fetchone()
        assert row is not None, "an aggregate query returns one row"
        alive, total = row
        return {"alive": int(alive), "dead": int(total - alive), "total": int(total)}

    def query(self, sql: str, max_rows: int | None = None) -> tuple[list[str], list[tuple[Any, ...]], bool]:
        """Run one read-only SELECT (or EXPLAIN): (columns, rows, truncated). Anything else is refused."""
        return index_reads.run_select(self.con, sql, max_rows, self.read_only)

    # --- bulk reads: a whole SAE in a few queries (the report) -----------------------------------
    def feature_table(self, sae_id: str, token: str | None = None) -> dict[str, np.ndarray]:
        """Every feature's statistics (schema.STAT_COLUMNS) as numpy columns indexed by feature id."""
        return index_reads.feature_table(self.con, sae_id, self._token(sae_id, token), self.n_features(sae_id))

    def histogram_table(self, sae_id: str, token: str | None = None) -> dict[int, np.ndarray]:
        """Each fired feature's counts over the bins of schema.hist_edges (features that never fired are absent)."""
        return index_reads.histogram_table(self.con, sae_id, self._token(sae_id, token))

    def exemplar_range(self, sae_id: str, lo: int, hi: int, k: int, token: str | None = None) -> list[dict[str, Any]]:
        """The top-k exemplars of features lo..hi (inclusive) in one query, by feature then rank: the columns of
        top_exemplars plus `feature`, without `grid`."""
        store_id = self.sae_info(sae_id)["store_id"]
        return index_reads.exemplar_range(self.con, store_id, sae_id, self._token(sae_id, token), lo, hi, k)

    def exemplar_images(self, sae_id: str, token: str | None = None) -> np.ndarray:
        """int64 (n_latents, top_k): every feature's exemplar image ids by rank, -1 where it has fewer."""
        info = self.sae_info(sae_id)
        return index_reads.exemplar_images(self.con, sae_id, self._token(sae_id, token), int(info["n_latents"]),
                                           int(info["top_k"]))

    def fired_features(self, sae_id: str, tokens: tuple[str, ...], limit: int | None = None) -> np.ndarray:
        """Features that fired on any of these token kinds (the `limit` most frequent when given), ascending."""
        return index_reads.fired_features(self.con, sae_id, tokens, limit)
