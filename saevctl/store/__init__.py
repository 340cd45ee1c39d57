"""The activation store: memory-mappable shards of residual-stream activations plus a manifest.

`open_store(dir)` reads it (`store.layer(6).patches` is an (n, p, d) array view); `StoreWriter` makes it.
"""

from saevctl.store.reader import LayerView, ShardedArray, Store, open_store
from saevctl.store.writer import StoreWriter

__all__ = ["LayerView", "ShardedArray", "Store", "StoreWriter", "open_store"]
