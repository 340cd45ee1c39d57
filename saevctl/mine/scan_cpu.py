"""A compiled (numba) CPU kernel of the mining scan (saevctl.mine.scan): where the per-patch codes of the rows
entering the streaming top-k go, found in one pass over the chunk's firing codes; exactly what the torch code
beside it in scan.py finds, in the same order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from saevctl.compiled import kernel


@kernel()
def _entering(key_n: np.ndarray, patch_n: np.ndarray, entrant: np.ndarray, fi: np.ndarray, slot: np.ndarray,
              k: int, n_patches: int, dest: np.ndarray, src: np.ndarray) -> int:
    m = 0
    for q in range(key_n.shape[0]):
        e = entrant[key_n[q]]
        if e >= 0:
            dest[m] = (fi[e] * k + slot[e]) * n_patches + patch_n[q]
            src[m] = q
            m += 1
    return m


def entering(key_n: Tensor, patch_n: Tensor, row: Tensor, fi: Tensor, slot: Tensor, n_rows: int, s: int, k: int,
             n_patches: int) -> tuple[Tensor, Tensor]:
    """For the firing entries (key = row * s + feature, patch) of the rows that entered the top-k (entrant e:
    `row[e]` into slot `slot[e]` of feature `fi[e]`): their flat positions in the (features, k, patches) store
    and their positions among the entries, in entry order."""
    entrant = np.full(n_rows * s, -1, np.int64)
    entrant[(row * s + fi).numpy()] = np.arange(len(fi))
    dest = np.empty(len(key_n), np.int64)
    src = np.empty(len(key_n), np.int64)
    m = _entering(key_n.numpy(), patch_n.numpy(), entrant, fi.numpy(), slot.numpy(), k, n_patches, dest, src)
    return torch.from_numpy(dest[:m]), torch.from_numpy(src[:m])
