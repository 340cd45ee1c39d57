"""Reading helpers behind `Index`: the larger queries (feature lists with a user's --where, contrasts, whole-SAE
bulk reads for the report) and the read-only SQL runner of `saevctl sql`. Callers go through `Index` methods.
"""

from __future__ import annotations

import re
from typing import Any

import duckdb
import numpy as np

from saevctl.errors import IndexError_
from saevctl.mine.schema import N_HIST, STAT_COLUMNS

_EXTENSION_RE = re.compile(r"exists in the (\w+) extension")
TABLES = ("saes", "stores", "images", "features", "histograms", "exemplars", "image_features", "feature_labels",
          "class_features", "meta", "schema_migrations")
LABEL_SORTABLE = ("auroc", "f1")
_FORBIDDEN = (";", "--", "/*")


def dict_rows(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [c[0] for c in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _check_expression(where: str) -> None:
    """A --where text is one condition, run on a read-only connection; refuse statement separators."""
    if any(tok in where for tok in _FORBIDDEN):
        raise IndexError_(f"--where {where!r} must be a single condition", "write e.g. \"freq > 1e-4 AND max > 1\"")


def list_features(con: duckdb.DuckDBPyConnection, sae_id: str, token: str, level: str | None, sort: str,
                  where: str | None, limit: int, descending: bool, label: str | None,
                  sortable: tuple[str, ...]) -> list[dict[str, Any]]:
    """Index.list_features' query; `sort` is already checked against `sortable` (constants)."""
    cond = ""
    if where:
        _check_expression(where)
        cond = f" AND ({where})"
    params: list[Any] = [sae_id, level or "", sae_id, token]
    if label is not None:
        cond += " AND lower(label) = lower(?)"
        params.append(label)
    order = "DESC" if descending else "ASC"
    nulls = "NULLS LAST" if sort in LABEL_SORTABLE else ""
    # The CTE gives the caller's --where one flat set of column names (no ambiguous `feature` of a join).
    sql = (
        "WITH l AS (SELECT feature, class_name AS label, auroc, f1 FROM feature_labels "
        "  WHERE sae_id = ? AND level = ? AND token = 'patches'), "
        "f AS (SELECT features.*, l.label, l.auroc, l.f1 FROM features LEFT JOIN l USING (feature) "
        "  WHERE features.sae_id = ? AND features.token = ?) "
        f"SELECT * FROM f WHERE TRUE{cond} ORDER BY {sort} {order} {nulls}, feature LIMIT ?"
    )  # sort from a constant list
    try:
        return dict_rows(con.execute(sql, [*params, int(limit)]))
    except duckdb.Error as e:
        raise IndexError_(f"bad --where {where!r}: {str(e).splitlines()[0]}", f"columns: {', '.join(sortable)}") from e


def contrast_features(con: duckdb.DuckDBPyConnection, sae_id: str, token: str, image_ids: list[int], n_images: int,
                      n: int) -> list[dict[str, Any]]:
    """Index.contrast_features' query (image_ids not empty)."""
    n_set = len(set(image_ids))
    n_rest = max(n_images - n_set, 1)
    return dict_rows(con.execute(
        "WITH s AS (SELECT feature, sum(value) AS set_sum, count(*) AS set_hits FROM image_features "
        "  WHERE sae_id = ? AND token = ? AND list_contains(?, image_id) GROUP BY feature) "
        "SELECT f.feature, s.set_sum / ? AS set_mean, greatest(f.img_mean * ? - s.set_sum, 0) / ? AS rest_mean, "
        "  s.set_hits, f.max, "
        "  (s.set_sum / ? - greatest(f.img_mean * ? - s.set_sum, 0) / ?) / greatest(f.max, 1e-12) AS score "
        "FROM s JOIN features f ON f.sae_id = ? AND f.token = ? AND f.feature = s.feature "
        "ORDER BY score DESC, f.feature LIMIT ?",
        [sae_id, token, image_ids, n_set, n_images, n_rest, n_set, n_images, n_rest, sae_id, token, int(n)]))


def decode_acts(blob: bytes | None) -> np.ndarray:
    """An exemplar's per-patch activations as the mine writer encodes them: little-endian float16 over the patch
    grid, row-major; empty (CLS exemplars) when there is no blob."""
    return np.frombuffer(blob, dtype="<f2").astype(np.float32) if blob else np.zeros(0, np.float32)


def feature_table(con: duckdb.DuckDBPyConnection, sae_id: str, token: str, n_features: int) -> dict[str, np.ndarray]:
    cols = ", ".join(STAT_COLUMNS)
    got = con.execute(
        f"SELECT feature, {cols} FROM features WHERE sae_id = ? AND token = ? ORDER BY feature",  # cols: constants
        [sae_id, token]).fetchnumpy()
    out = {c: np.zeros(n_features, dtype=np.int64 if c == "n_fired" else np.float64) for c in STAT_COLUMNS}
    feat = np.asarray(got["feature"], dtype=np.int64)
    for c in STAT_COLUMNS:
        out[c][feat] = np.asarray(got[c])
    return out


def histogram_table(con: duckdb.DuckDBPyConnection, sae_id: str, token: str) -> dict[int, np.ndarray]:
    got = con.execute(
        "SELECT feature, bin, count FROM histograms WHERE sae_id = ? AND token = ? ORDER BY feature, bin",
        [sae_id, token]).fetchnumpy()
    out: dict[int, np.ndarray] = {}
    for f, b, c in zip(np.asarray(got["feature"]), np.asarray(got["bin"]), np.asarray(got["count"]), strict=True):
        out.setdefault(int(f), np.zeros(N_HIST, dtype=np.int64))[int(b)] = int(c)
    return out


def exemplar_range(con: duckdb.DuckDBPyConnection, store_id: str, sae_id: str, token: str, lo: int, hi: int,
                   k: int) -> list[dict[str, Any]]:
    rows = con.execute(
        "SELECT e.feature, e.rank, e.image_id, i.path, i.label, e.value, e.n_fired, e.acts FROM exemplars e "
        "LEFT JOIN images i ON i.store_id = ? AND i.image_id = e.image_id "
        "WHERE e.sae_id = ? AND e.token = ? AND e.feature BETWEEN ? AND ? AND e.rank < ? ORDER BY e.feature, e.rank",
        [store_id, sae_id, token, int(lo), int(hi), int(k)]).fetchall()
    names = ("feature", "rank", "image_id", "path", "label", "value", "n_fired")
    return [{**dict(zip(names, r[:-1], strict=True)), "acts": decode_acts(r[-1])} for r in rows]


def fired_features(con: duckdb.DuckDBPyConnection, sae_id: str, tokens: tuple[str, ...],
                   limit: int | None) -> np.ndarray:
    rows = con.execute(
        "SELECT feature FROM features WHERE sae_id = ? AND n_fired > 0 AND list_contains(?, token) "
        "GROUP BY feature ORDER BY max(freq) DESC, feature LIMIT ?",
        [sae_id, list(tokens), limit if limit is not None else 2**62]).fetchall()
    return np.sort(np.asarray([r[0] for r in rows], dtype=np.int64))


def run_select(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int | None,
               read_only: bool) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    """One user SELECT (or EXPLAIN) on a read-only connection: (columns, rows, truncated); anything else refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise IndexError_(f"cannot parse the query: {str(e).splitlines()[0]}", "check the SQL syntax") from e
    if len(statements) != 1:
        raise IndexError_(f"saevctl sql runs exactly one statement, got {len(statements)}", "run them one at a time")
    kind = statements[0].type
    if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
        name = "INSTALL or LOAD" if kind == duckdb.StatementType.LOAD else kind.name  # DuckDB types INSTALL as LOAD
        raise IndexError_(f"saevctl sql is read-only and refuses {name} statements", "write a SELECT query")
    if not read_only:
        raise IndexError_("query() needs an index opened read-only", "use Index.open(path)")
    try:
        cur = con.execute(sql)
        cols = [c[0] for c in cur.description or []]
        rows = cur.fetchmany(max_rows + 1) if max_rows is not None else cur.fetchall()
    except duckdb.Error as e:
        ext = _EXTENSION_RE.search(str(e))
        if ext:  # index.py's connections never install or load one
            raise IndexError_(f"the query needs DuckDB's {ext.group(1)} extension, and extensions are disabled in "
                              "saevctl sql", "query the index's own tables: " + ", ".join(TABLES)) from e
        raise IndexError_(f"the query failed: {str(e).splitlines()[0]}", "tables: " + ", ".join(TABLES)) from e
    truncated = max_rows is not None and len(rows) > max_rows
    return cols, rows[:max_rows] if truncated else rows, truncated


# --- what the index holds, for incremental reruns (saevctl.rerun) -------------------------------------------------

def get_meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return None if row is None else str(row[0])


def set_meta(con: duckdb.DuckDBPyConnection, key: str, value: str) -> None:
    con.execute("DELETE FROM meta WHERE key = ?", [key])
    con.execute("INSERT INTO meta VALUES (?, ?)", [key, value])


def fingerprint(con: duckdb.DuckDBPyConnection) -> str:
    """Each SAE's id with the inputs it was mined from (saes.config) and its labels' record (meta labels:ID)."""
    import hashlib

    rows = con.execute(
        "SELECT s.sae_id, json_extract_string(s.config, '$.inputs'), m.value FROM saes s "
        "LEFT JOIN meta m ON m.key = 'labels:' || s.sae_id ORDER BY s.sae_id").fetchall()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def exemplar_images(con: duckdb.DuckDBPyConnection, sae_id: str, token: str, n: int, k: int) -> np.ndarray:
    """Index.exemplar_images' query: one pass over the SAE's exemplar rows, no per-patch maps read."""
    cols = con.execute("SELECT feature, rank, image_id FROM exemplars WHERE sae_id = ? AND token = ?",
                       [sae_id, token]).fetchnumpy()
    out = np.full((n, k), -1, dtype=np.int64)
    f, r = cols["feature"].astype(np.int64), cols["rank"].astype(np.int64)
    keep = (f < n) & (r < k)
    out[f[keep], r[keep]] = cols["image_id"][keep]
    return out
