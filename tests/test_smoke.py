"""The thin path works: the tiny store opens with the documented shapes."""

from saevctl.store import open_store


def test_tiny_store_shapes(tiny_store):
    store = open_store(tiny_store)
    assert store.n_images == 12  # 13 files, one corrupt
    assert store.layer(3).patches.shape == (12, 16, 32)
    assert store.layer(1).cls.shape == (12, 32)
    assert sum(im["status"] != "ok" for im in store.images) == 1
