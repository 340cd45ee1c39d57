"""The ViT passes that do not depend on the SAE, computed once per `eval all` run and shared by the evaluations in it:
the residual stream at the SAE's layer of each image batch, and the head's outputs on it unedited and mean-ablated.
The SAE and its baselines (same images, backbone, head and layer) then only run what the SAE changes, and splice and
edits share the batches they both read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saevctl.data import ImageRecord
from saevctl.edit.session import Prober
from saevctl.eval.common import to_input

BUDGET_BYTES = 1 << 30
"""The memo keeps tensors up to this size in all; later ones are computed each time (many images)."""


class Passes:
    """A memo of SAE-independent tensors, each keyed by everything it depends on: the backbone and head objects
    (alive for the whole run, so their ids stay theirs), the layer, the batch's images and the output size. Held
    until the run ends (the demo's 64 images: about 30 MB), up to `budget_bytes`; 0 keeps nothing (a single
    evaluation, where nothing is reused)."""

    def __init__(self, budget_bytes: int = BUDGET_BYTES) -> None:
        self._memo: dict[tuple[Any, ...], Tensor] = {}
        self.budget_bytes, self.held_bytes = budget_bytes, 0

    def __len__(self) -> int:
        """How many tensors are kept."""
        return len(self._memo)

    def get(self, key: tuple[Any, ...], make: Callable[[], Tensor]) -> Tensor:
        if key in self._memo:
            return self._memo[key]
        value = make()
        size = value.numel() * value.element_size()
        if self.held_bytes + size <= self.budget_bytes:
            self._memo[key], self.held_bytes = value, self.held_bytes + size
        return value

    @staticmethod
    def _images(prober: Prober, records: Sequence[ImageRecord]) -> tuple[Any, ...]:
        return (id(prober.bb), prober.layer, tuple(str(r.path) for r in records))

    @torch.no_grad()
    def prefix(self, prober: Prober, records: Sequence[ImageRecord], u8: np.ndarray) -> Tensor:
        """The residual stream (b, t, d) after the SAE's layer of these images (`u8`: their decoded inputs)."""
        return self.get(("prefix", *self._images(prober, records)), lambda: prober.prefix(to_input(prober, u8)))

    @torch.no_grad()
    def outputs(self, prober: Prober, records: Sequence[ImageRecord], x_btd: Tensor, chunk: int | None,
                out_hw: tuple[int, int] | None, variant: str = "original",
                edit: Callable[[Tensor], Tensor] | None = None, depends: tuple[Any, ...] = ()) -> Tensor:
        """The head's float outputs on `x_btd` (the prefix of `records`), or on `edit(x_btd)` for an SAE-independent
        `variant` whose inputs besides the images are `depends` (the ablation's mean vectors)."""
        key = ("outputs", variant, id(prober.head), out_hw or prober.out_hw, *self._images(prober, records), *depends)
        return self.get(key, lambda: prober.outputs(edit(x_btd) if edit else x_btd, chunk=chunk,
                                                    out_hw=out_hw).float())


def digest(tensors: Sequence[Tensor]) -> str:
    """A key for tensors' values (the ablation means)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
