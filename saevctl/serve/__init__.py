"""`saevctl serve`: a local explorer in the browser over one mined SAE: the paper's Figure 2 (which features fire on
the patches you select), each feature's page, and clamp edits through `saevctl probe`'s own code, with controls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saevctl.lazy import lazy_exports

if TYPE_CHECKING:
    from saevctl.serve.app import make_app
    from saevctl.serve.config import Config
    from saevctl.serve.server import run
    from saevctl.serve.state import Explorer

__all__ = ["Config", "Explorer", "make_app", "run"]
__getattr__ = lazy_exports(
    __name__,
    {
        "Config": "saevctl.serve.config",
        "Explorer": "saevctl.serve.state",
        "make_app": "saevctl.serve.app",
        "run": "saevctl.serve.server",
    },
)
