"""Backbone adapters: every supported ViT behind one `Backbone` interface, loaded from a model spec.

Specs: `demo`, `timm:NAME`, `local-dir:/path`, `hf-hub:org/name`, `open_clip:ARCH/PRETRAINED` (tag or file).
"""

from __future__ import annotations

from saevctl.data.preprocess import Preprocess
from saevctl.store.format import TokenLayout
from saevctl.vit.backbone import Backbone
from saevctl.vit.load import load_backbone, parse_spec

__all__ = ["Backbone", "Preprocess", "TokenLayout", "load_backbone", "parse_spec"]
