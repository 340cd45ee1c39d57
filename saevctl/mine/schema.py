"""The mined index's DuckDB schema as numbered migrations (spec and column meanings: docs/disk-layout.md).

A file's `schema_migrations` table says which have run; a file newer than this code is refused.
"""

from __future__ import annotations

import itertools
import math

FORMAT = "saevctl-index"

# The features table's per-feature statistics (column names), in the order readers list them.
STAT_COLUMNS = ("freq", "img_freq", "mean", "mean_all", "max", "img_mean", "n_fired")
# Log10 histogram of firing values (the histograms table's bins): regular bins over [HIST_LO, HIST_HI) plus an
# underflow and an overflow bin.
HIST_LO, HIST_HI, HIST_STEP = -4.0, 4.0, 0.1
N_HIST = round((HIST_HI - HIST_LO) / HIST_STEP) + 2


def hist_edges() -> list[tuple[float, float]]:
    """(lo, hi) activation range of every histogram bin; the first starts at 0, the last ends at inf."""
    inner = [10 ** (HIST_LO + i * HIST_STEP) for i in range(N_HIST - 1)]
    return [(0.0, inner[0]), *list(itertools.pairwise(inner)), (inner[-1], math.inf)]

# Each entry upgrades the schema from version i to i + 1. Never edit a released entry: append a new one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
        """CREATE TABLE stores (
            store_id VARCHAR PRIMARY KEY, path VARCHAR, fingerprint VARCHAR, model_spec VARCHAR,
            model_sha256 VARCHAR, model JSON, n_images INTEGER, grid_h INTEGER, grid_w INTEGER)""",
        """CREATE TABLE images (
            store_id VARCHAR, image_id INTEGER, "row" INTEGER, path VARCHAR, label VARCHAR,
            width INTEGER, height INTEGER)""",
        """CREATE TABLE saes (
            sae_id VARCHAR PRIMARY KEY, seq INTEGER, name VARCHAR, ckpt_path VARCHAR, weights_sha256 VARCHAR,
            store_id VARCHAR, model_spec VARCHAR, model_sha256 VARCHAR, layer INTEGER, d INTEGER,
            n_latents INTEGER, activation VARCHAR, tokens VARCHAR, top_k INTEGER, top_n INTEGER,
            rank_by VARCHAR, n_images INTEGER, n_patches INTEGER, grid_h INTEGER, grid_w INTEGER,
            mined_at TIMESTAMP, seconds DOUBLE, config JSON)""",
        """CREATE TABLE features (
            sae_id VARCHAR, token VARCHAR, feature INTEGER, freq DOUBLE, img_freq DOUBLE, mean DOUBLE,
            mean_all DOUBLE, max DOUBLE, img_mean DOUBLE, n_fired BIGINT)""",
        """CREATE TABLE histograms (
            sae_id VARCHAR, token VARCHAR, feature INTEGER, bin SMALLINT, lo DOUBLE, hi DOUBLE, count BIGINT)""",
        """CREATE TABLE exemplars (
            sae_id VARCHAR, token VARCHAR, feature INTEGER, rank SMALLINT, image_id INTEGER, value FLOAT,
            n_fired SMALLINT, acts BLOB)""",
        """CREATE TABLE image_features (
            sae_id VARCHAR, token VARCHAR, image_id INTEGER, rank SMALLINT, feature INTEGER, value FLOAT)""",
    ],
    [
        # saevctl features label: each feature's best class, and each class's best feature (AUROC, F1).
        """CREATE TABLE feature_labels (
            sae_id VARCHAR, token VARCHAR, feature INTEGER, level VARCHAR, class_id INTEGER, class_name VARCHAR,
            auroc DOUBLE, f1 DOUBLE, threshold DOUBLE)""",
        """CREATE TABLE class_features (
            sae_id VARCHAR, token VARCHAR, level VARCHAR, class_id INTEGER, class_name VARCHAR, n_positive BIGINT,
            feature INTEGER, auroc DOUBLE, f1 DOUBLE, threshold DOUBLE)""",
    ],
]

# Tables with one SAE's rows (replaced as a whole when that SAE is mined again).
PER_SAE_TABLES = ("features", "histograms", "exemplars", "image_features", "saes")
