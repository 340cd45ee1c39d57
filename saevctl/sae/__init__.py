"""The sparse autoencoder model shared by every stage: encode/decode raw activations, save/load safetensors.

`SAE.load(path)`, `sae.encode(x)`, `sae.decode(f)`, `sae(x)`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SAE", "SAEConfig"]


def __getattr__(name: str) -> Any:
    # Lazy so CLI help stays torch-free.
    if name in __all__:
        from saevctl.sae import model

        return getattr(model, name)
    raise AttributeError(name)
