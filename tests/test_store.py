"""The activation store on its own: ShardedArray indexing (property-tested), write/read round trips, and
the errors for stores of another schema, incomplete, foreign or damaged."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saevctl import layout
from saevctl.errors import LayerError, OutputError, StoreError
from saevctl.store import ShardedArray, StoreWriter, open_store
from saevctl.store.format import NP_DTYPES, from_numpy, to_numpy

DTYPES = ["float16", "bfloat16", "float32"]


def mmap_parts(dpath: Path, parts: list[np.ndarray]) -> list[np.ndarray]:
    """Save each part as .npy and open it again as a read-only memory map, as the store does."""
    out = []
    for i, p in enumerate(parts):
        np.save(dpath / f"{i}.npy", p, allow_pickle=False)
        out.append(np.load(dpath / f"{i}.npy", mmap_mode="r"))
    return out


@st.composite
def sharded_case(draw: st.DrawFn) -> tuple[list[int], tuple[int, ...], str, Any]:
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda ls: sum(ls) > 0))
    row_shape = draw(st.sampled_from([(), (3,), (2, 3)]))
    dtype = draw(st.sampled_from(DTYPES))
    n = sum(lengths)
    ints = st.integers(-n, n - 1)
    index = draw(
        st.one_of(
            ints,
            st.builds(slice, st.none() | st.integers(-n - 2, n + 2), st.none() | st.integers(-n - 2, n + 2),
                      st.none() | st.sampled_from([1, 1, 2, 3, -1, -2])),
            st.lists(ints, max_size=12),
            st.lists(ints, min_size=1, max_size=12).map(np.array),
            st.lists(st.booleans(), min_size=n, max_size=n).map(np.array),
            st.tuples(st.lists(ints, min_size=1, max_size=6), st.integers(0, row_shape[0] - 1)) if row_shape else ints,
            st.tuples(st.builds(slice, st.none() | st.integers(0, n), st.none()),
                      st.integers(-row_shape[0], row_shape[0] - 1)) if len(row_shape) == 2 else ints,
        )
    )
    return lengths, row_shape, dtype, index


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sharded_case(), st.integers(0, 2**31 - 1))
def test_sharded_array_indexes_like_the_concatenated_array(case: tuple[Any, ...], seed: int) -> None:
    lengths, row_shape, dtype, index = case
    rng = np.random.default_rng(seed)
    # Values spread over many magnitudes, stored in the store's own on-disk dtype.
    full32 = (rng.standard_normal((sum(lengths), *row_shape)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    full_disk = to_numpy(torch.from_numpy(full32), dtype)
    assert full_disk.dtype == NP_DTYPES[dtype]
    pieces = np.split(full_disk, np.cumsum(lengths)[:-1])
    with tempfile.TemporaryDirectory() as tmp:
        arr = ShardedArray(mmap_parts(Path(tmp), pieces), dtype)
        assert arr.shape == full_disk.shape and len(arr) == len(full_disk)
        want_disk = full_disk[index]
        got_t = arr.torch(index)
        assert got_t.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        want_t = from_numpy(np.asarray(want_disk), dtype)
        assert got_t.shape == want_t.shape
        assert torch.equal(got_t.view(torch.int16 if dtype != "float32" else torch.int32),
                           want_t.view(torch.int16 if dtype != "float32" else torch.int32))  # bit for bit
        got = arr[index]
        want = want_t.float().numpy() if dtype == "bfloat16" else np.asarray(want_disk)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        del arr, got, got_t


def test_sharded_array_refuses_bad_indices(tmp_path: Path) -> None:
    arr = ShardedArray(mmap_parts(tmp_path, [np.zeros((2, 3), np.float32), np.ones((3, 3), np.float32)]), "float32")
    for bad in (5, -6, [0, 5], np.array([-6])):
        with pytest.raises(IndexError):
            arr[bad]
    with pytest.raises(IndexError, match="boolean mask"):
        arr[np.array([True, False])]
    with pytest.raises(IndexError):
        arr[np.array([0.5, 1.0])]
    assert np.asarray(arr).shape == (5, 3) and arr.nbytes == 60 and arr.ndim == 2


def tiny_config(
    dtype: str = "float32", tokens: tuple[str, ...] = ("patches", "cls"), per_shard: int = 3
) -> dict[str, Any]:
    """A store config of the shape the extract stage writes: d=4, 2x2 patch grid, 1 CLS, 2 registers."""
    return {
        "model": {
            "spec": "local-dir:/nowhere",
            "arch": "test",
            "weights_sha256": "ab" * 32,
            "n_blocks": 4,
            "d_model": 4,
            "patch_size": 8,
            "layout": {"n_cls": 1, "n_reg": 2, "grid_h": 2, "grid_w": 2},
            "preprocess": {},
        },
        "images": {"spec": "x", "kind": "folder", "n": 8, "fingerprint": "f"},
        "layers": [0, 2],
        "tokens": list(tokens),
        "dtype": dtype,
        "images_per_shard": per_shard,
    }


def write_store(dpath: Path, cfg: dict[str, Any], n_images: int, unreadable: set[int], seed: int = 0,
                finalize: bool = True) -> dict[tuple[int, str], np.ndarray]:
    """Write a store through StoreWriter with random activations; returns the expected full arrays (float32)."""
    rng = np.random.default_rng(seed)
    w = StoreWriter(dpath, cfg, n_images)
    shapes = {"patches": (4, 4), "cls": (4,), "registers": (2, 4)}
    expected: dict[tuple[int, str], list[np.ndarray]] = {
        (layer, k): [] for layer in cfg["layers"] for k in cfg["tokens"]
    }
    for s, (lo, hi) in enumerate(w.shard_ranges):
        ok = [i for i in range(lo, hi) if i not in unreadable]
        arrays = {}
        for key in expected:
            vals = torch.from_numpy(rng.standard_normal((len(ok), *shapes[key[1]])).astype(np.float32))
            arrays[key] = to_numpy(vals, cfg["dtype"])
            expected[key].append(from_numpy(arrays[key], cfg["dtype"]).float().numpy())
        rows = [{"id": i, "path": f"/img/{i}.png", "label": "a" if i % 2 else "b",
                 "width": 10 + i, "height": 20, "status": "ok"} if i not in unreadable else
                {"id": i, "path": f"/img/{i}.png", "label": None, "width": None, "height": None,
                 "status": "unreadable", "error": "cannot read"} for i in range(lo, hi)]
        w.write_shard(s, arrays, rows)
    if finalize:
        w.finalize()
    return {k: np.concatenate(v) for k, v in expected.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_round_trip(tmp_path: Path, dtype: str) -> None:
    cfg = tiny_config(dtype, tokens=("patches", "cls", "registers"))
    expected = write_store(tmp_path / "s", cfg, n_images=8, unreadable={1, 6, 7})
    store = open_store(tmp_path / "s")
    assert store.n_images == 5 and store.shard_rows == [2, 3, 0]
    assert store.layers == [0, 2] and store.dtype == dtype
    for (layer, kind), want in expected.items():
        arr = store.layer(layer).kind(kind)
        assert arr is getattr(store.layer(layer), kind)
        np.testing.assert_array_equal(arr[:], want)
        assert isinstance(arr.parts[0], np.memmap)  # backed by the files, not loaded
    m = store.manifest
    assert (
        m["complete"]
        and m["n_images"] == 8
        and m["n_rows"] == 5
        and m["n_failed"] == 3
        and m["failed_ids"] == [1, 6, 7]
    )
    assert m["shapes"] == {"patches": [5, 4, 4], "cls": [5, 4], "registers": [5, 2, 4]}
    assert [im["id"] for im in store.images] == list(range(8))
    assert [im["row"] for im in store.images] == [0, -1, 1, 2, 3, 4, -1, -1]
    assert store.row_image_ids().tolist() == [0, 2, 3, 4, 5]
    assert store.images[1]["status"] == "unreadable" and store.images[2]["width"] == 12
    with pytest.raises(LayerError, match=r"holds layers \[0, 2\], not 1"):
        store.layer(1)


def test_store_with_no_readable_image_has_empty_arrays(tmp_path: Path) -> None:
    write_store(tmp_path / "s", tiny_config(per_shard=2), n_images=3, unreadable={0, 1, 2})
    store = open_store(tmp_path / "s")
    assert store.n_images == 0
    assert store.layer(2).patches.shape == (0, 4, 4) and store.layer(0).cls[:].shape == (0, 4)


def test_missing_kind_errors(tmp_path: Path) -> None:
    write_store(tmp_path / "s", tiny_config(), n_images=4, unreadable=set())
    view = open_store(tmp_path / "s").layer(0)
    with pytest.raises(StoreError, match="holds no 'registers' tokens"):
        view.kind("registers")
    with pytest.raises(AttributeError, match="stores no 'registers' tokens"):
        view.registers  # noqa: B018


def edit_manifest(dpath: Path, **changes: Any) -> None:
    fpath = layout.store_manifest_fpath(dpath)
    m = json.loads(fpath.read_text())
    m.update(changes)
    fpath.write_text(json.dumps(m))


@pytest.mark.parametrize("version", [0, 2, 99, None])
def test_other_schema_version_is_refused(tmp_path: Path, version: Any) -> None:
    write_store(tmp_path / "s", tiny_config(), n_images=4, unreadable=set())
    edit_manifest(tmp_path / "s", schema_version=version)
    with pytest.raises(StoreError) as info:
        open_store(tmp_path / "s")
    line = info.value.one_line()
    assert f"has store schema {version}, this saevctl reads schema {layout.STORE_SCHEMA}" in line
    assert "Re-extract with this version of saevctl" in line
    with pytest.raises(StoreError, match="has store schema"):  # the writer refuses to resume it, too
        StoreWriter(tmp_path / "s", tiny_config(), 4)


def test_incomplete_store_is_refused_until_resumed(tmp_path: Path) -> None:
    write_store(tmp_path / "s", tiny_config(), n_images=8, unreadable=set(), finalize=False)
    with pytest.raises(StoreError) as info:
        open_store(tmp_path / "s")
    assert (
        "incomplete" in info.value.one_line() and "Run the same saevctl extract command again" in info.value.one_line()
    )
    w = StoreWriter(tmp_path / "s", tiny_config(), 8)  # same settings: resumes, and every shard is there
    assert w.done_shards() == {0, 1, 2} and not w.is_complete
    w.finalize()
    assert open_store(tmp_path / "s").n_images == 8


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not an activation store"):
        open_store(tmp_path / "plain")
    (tmp_path / "plain" / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(StoreError, match="not an activation store's"):
        open_store(tmp_path / "plain")
    (tmp_path / "plain" / "manifest.json").write_text("{truncated")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(tmp_path / "plain")


def test_damaged_store_names_the_file(tmp_path: Path) -> None:
    write_store(tmp_path / "s", tiny_config(), n_images=6, unreadable=set())
    victim = layout.store_shard_dpath(tmp_path / "s", 1) / layout.shard_array_name(2, "cls")
    victim.unlink()
    store = open_store(tmp_path / "s")
    store.layer(0)  # other layers still open
    with pytest.raises(StoreError, match=f"damaged: {victim} is missing"):
        store.layer(2)
    np.save(victim, np.zeros((2, 4), np.float32))  # one row short
    with pytest.raises(StoreError, match=r"holds float32 \(2, 4\), the manifest says float32 \(3, 4\)"):
        open_store(tmp_path / "s").layer(2)


def test_writer_refuses_other_settings_and_foreign_folders(tmp_path: Path) -> None:
    write_store(tmp_path / "s", tiny_config(), n_images=4, unreadable=set())
    other = tiny_config()
    other["layers"] = [0, 3]
    with pytest.raises(StoreError, match=r"other settings \(layers \[0, 2\] vs \[0, 3\]\)"):
        StoreWriter(tmp_path / "s", other, 4)
    other = tiny_config()
    other["model"] = {**other["model"], "weights_sha256": "cd" * 32}
    with pytest.raises(StoreError, match="now has other weights"):
        StoreWriter(tmp_path / "s", other, 4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("...")
    with pytest.raises(OutputError, match="already holds other files"):
        StoreWriter(tmp_path / "busy", tiny_config(), 4)
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".draft.tmp1").write_text("someone's work")
    with pytest.raises(OutputError, match="already holds other files"):
        StoreWriter(tmp_path / "hidden", tiny_config(), 4)
    assert (tmp_path / "hidden" / ".draft.tmp1").read_text() == "someone's work"
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        StoreWriter(tmp_path / "file", tiny_config(), 4)


def test_leftovers_of_a_killed_write_are_ignored(tmp_path: Path) -> None:
    """Temp files of interrupted atomic writes do not make the folder 'hold something else', nor a shard."""
    d = tmp_path / "s"
    d.mkdir()
    (d / ".manifest.json.tmp4242").write_text('{"half": ')  # killed while writing the first manifest
    w = StoreWriter(d, tiny_config(), 6)
    assert not (d / ".manifest.json.tmp4242").exists()
    (d / ".images.jsonl.tmp77").write_text("half")
    StoreWriter(d, tiny_config(), 6)
    assert not (d / ".images.jsonl.tmp77").exists()
    stale = layout.store_shards_dpath(d) / ".000001.tmp"
    stale.mkdir(parents=True)
    (stale / "l00.patches.npy").write_bytes(b"half")
    assert w.done_shards() == set() and not stale.exists()
