"""The sparse autoencoder model shared by every stage: encode/decode raw activations, save/load safetensors.

`SAE.load(path)`, `sae.encode(x)`, `sae.decode(f)`, `sae(x)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.sae.model import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig"]
__getattr__ = lazy_exports(
    __name__,
    {
        "SAE": "saevctl.sae.model",
        "SAEConfig": "saevctl.sae.model",
    },
)
