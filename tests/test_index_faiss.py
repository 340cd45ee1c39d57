"""faiss cosine search equals the brute-force matmul, and the faiss file is rebuilt when missing, stale or corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from saevctl import layout
from saevctl.mine import vectors


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 300), st.integers(1, 48), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_faiss_equals_brute_force(n: int, d: int, k: int, seed: int) -> None:
    import faiss

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.1, 10, size=(n, 1)).astype(np.float32)
    q = rng.normal(size=(3, d)).astype(np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(vectors._unit_rows(w))
    sims, ids = vectors.search(index, q, k)
    want_sims, want_ids = vectors.brute_force_similar(w, q, k)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    # Ids agree except where two rows are equally similar (then either order is right).
    for r in range(q.shape[0]):
        for j in np.nonzero(ids[r] != want_ids[r])[0]:
            assert abs(sims[r, j] - want_sims[r, j]) < 1e-5


def test_faiss_rebuilt_when_missing_stale_or_corrupt(tmp_path: Path) -> None:
    index_fpath = tmp_path / "ix.duckdb"
    rng = np.random.default_rng(0)
    w = rng.normal(size=(50, 8)).astype(np.float32)
    vectors.save_decoder(index_fpath, "a-1", w, "sha-one")
    fx = vectors.load(index_fpath, "a-1", "sha-one")  # missing: built
    assert fx.ntotal == 50
    meta_fpath = layout.faiss_meta_fpath(index_fpath, "a-1")
    assert json.loads(meta_fpath.read_text())["weights_sha256"] == "sha-one"

    # New weights under the same id (re-mined SAE): the old faiss file is stale and is rebuilt.
    w2 = rng.normal(size=(60, 8)).astype(np.float32)
    vectors.save_decoder(index_fpath, "a-1", w2, "sha-two")
    fx = vectors.load(index_fpath, "a-1", "sha-two")
    assert fx.ntotal == 60
    sims, ids = vectors.search(fx, w2[7:8], 1)
    assert ids[0, 0] == 7 and abs(sims[0, 0] - 1) < 1e-5

    layout.faiss_fpath(index_fpath, "a-1").write_bytes(b"garbage")
    assert vectors.load(index_fpath, "a-1", "sha-two").ntotal == 60  # corrupt: rebuilt
