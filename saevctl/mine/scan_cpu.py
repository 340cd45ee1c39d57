"""Compiled (numba) CPU kernels of the mining scan (saevctl.mine.scan).

- `scan`: a whole chunk folded into a scanner's state, the features split among the threads. Each thread reads
  the chunk's codes once (dense codes a 64-code block at a time: one vector pass makes a 64-bit mask of its
  positive codes, which are then visited by their bits; a TopK encoder's k codes per token directly) and, image
  by image, updates its features' statistics and their top-k slots: an image whose score beats a feature's smallest
  slot takes that slot (with --max-per-source, an image whose source already holds its cap of the feature's slots can
  only take that source's weakest one), and its per-patch codes are written from the codes it just read. The same
  statistics and exemplars as the torch code in scan.py (the reference: CUDA runs it); the float64 sums differ only in
  summation order, and among equal scores another row may be kept (tests/test_mine_scan.py).
- `entering`: where the per-patch codes of the rows entering the torch path's top-k go, found in one pass over
  the chunk's firing codes; exactly what the torch code beside it finds, in the same order.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange
from numba.cpython.unsafe.numbers import trailing_zeros
from torch import Tensor

from saevctl.compiled import as_array, f16_bits, f32_bits, kernel, ld, n_threads


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


@kernel(inline=True)
def _bin(v: float, edges: np.ndarray, table: np.ndarray) -> int:
    """The histogram bin of v > 0: how many of the ascending float32 inner edges are <= v. `table` holds it for
    the smallest float32 of each value of the top 16 bits; such a range is narrower than a bin, so at most one
    edge lies inside it."""
    u = f32_bits(np.float32(v))  # type: ignore[call-arg, var-annotated]
    bn = np.int64(table[u >> np.uint32(16)])
    n = edges.shape[0]
    return bn + ((bn < n) & (v >= edges[min(bn, n - 1)]))  # without a branch: the edge is passed unpredictably


def bin_table(edges: np.ndarray) -> np.ndarray:
    """`_bin`'s table: for each top-16-bit prefix of a float32, the bin of the smallest value with it."""
    low = (np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    with np.errstate(invalid="ignore"):
        return np.searchsorted(edges, low, side="right").astype(np.uint8)


BLOCK = 64  # dense codes tested per vector pass: a positive code's bit in one 64-bit mask


@kernel(inline=True)
def _positive_bits(x: np.ndarray) -> np.uint64:
    """Bit e set where x[e] > 0, for x of at most BLOCK codes: one vectorised pass (a full block's fixed trip count
    vectorises best), after which the firing codes are visited by their set bits, lowest first, with no branch per
    code. (Every compiled loop here runs an index from 0 over a slice: with a start numba cannot prove non-negative
    it checks each index for wraparound and does not vectorise.)"""
    m = np.uint64(0)
    zero = np.float32(0.0)
    if x.shape[0] == BLOCK:
        for e in range(BLOCK):
            m |= np.uint64(ld(x, e) > zero) << np.uint64(e)
    else:
        for e in range(x.shape[0]):
            m |= np.uint64(ld(x, e) > zero) << np.uint64(e)
    return m


@kernel(parallel=True)
def _scan(
    dense: np.ndarray, tk_vals: np.ndarray, tk_idx: np.ndarray, b: int, p: int, by_mean: bool, ids_b: np.ndarray,
    edges: np.ndarray, table: np.ndarray, nt: int, vals_ks: np.ndarray, ids_ks: np.ndarray, patches: np.ndarray,
    img_fired: np.ndarray, vsum: np.ndarray, img_score_sum: np.ndarray, vmax: np.ndarray, hist: np.ndarray,
    lh: np.ndarray, since: int, flush: int, scores_bs: np.ndarray, src_ks: np.ndarray, src_b: np.ndarray, cap: int,
) -> None:
    """One chunk of b images x p tokens folded into a scanner's state, thread th owning a range of features.
    Codes come dense ((b p, s) float32, or bfloat16 bits) or as a TopK encoder's ((b p, kc) values and features);
    the other pair is empty. With `cap` > 0, at most `cap` of a feature's slots hold images of one source (src_b: each
    image's; src_ks: each slot's, -1 when empty)."""
    s = vals_ks.shape[1]
    per = ((s + nt - 1) // nt + 15) // 16 * 16  # ranges of whole cache lines of float32
    for th in prange(nt):
        lo = min(s, th * per)
        _scan_range(dense, tk_vals, tk_idx, b, p, by_mean, ids_b, edges, table, lo, min(s, lo + per), vals_ks, ids_ks,
                    patches, img_fired, vsum, img_score_sum, vmax, hist, lh, since, flush, scores_bs, src_ks, src_b,
                    cap)


@kernel()
def _scan_range(
    dense: np.ndarray, tk_vals: np.ndarray, tk_idx: np.ndarray, b: int, p: int, by_mean: bool, ids_b: np.ndarray,
    edges: np.ndarray, table: np.ndarray, lo: int, hi: int, vals_ks: np.ndarray, ids_ks: np.ndarray,
    patches: np.ndarray, img_fired: np.ndarray, vsum: np.ndarray, img_score_sum: np.ndarray, vmax: np.ndarray,
    hist: np.ndarray, lh: np.ndarray, since: int, flush: int, scores_bs: np.ndarray, src_ks: np.ndarray,
    src_b: np.ndarray, cap: int,
) -> None:
    """`_scan`'s work on features lo..hi-1 (vsum ... scores_bs written there only). Histogram counts go to lh, 16
    bits (a quarter of hist's size: it stays in L2, where hist misses at every code), and are added into hist
    after every `flush`-th image since the last time (`since` images ago)."""
    k = vals_ks.shape[0]
    use_dense = dense.shape[0] > 0
    keep = patches.shape[0] > 0
    kc = tk_idx.shape[1]
    zero = np.float32(0.0)
    w = hi - lo
    sc = np.zeros(w, np.float32)  # this image's score per feature (0: not fired)
    ent = np.full(w, -1, np.int64)  # the slot this image entered, per feature
    touched = np.empty(w + 1, np.int64)  # one more: _fire writes past the touched features
    csum = np.zeros(w, np.float64)  # this chunk's sums, added to the running ones at the end (as torch does)
    cscore = np.zeros(w, np.float64)
    minv = np.empty(w, np.float32)  # each feature's smallest slot value and its (first) slot
    mins = np.empty(w, np.int64)
    for j in range(w):  # a loop, not a slice copy: that compiles numba's shape-mismatch error (~2 s cold)
        minv[j], mins[j] = vals_ks[0, lo + j], 0
    for r in range(1, k):  # row by row: a feature's k slots are a strided column
        row = vals_ks[r, lo:hi]
        for j in range(w):
            if row[j] < minv[j]:
                minv[j], mins[j] = row[j], r
    n_open = 0  # features with an empty (-inf) slot
    for j in range(w):
        n_open += minv[j] == -np.inf
    n_hist = edges.shape[0] + 1
    # this image's firing codes (feature - lo, token, value), for the per-patch codes of the rows that enter
    room = p * (w if use_dense else min(w, kc)) if keep else 0
    fj, ft, fv = np.empty(room, np.int32), np.empty(room, np.int32), np.empty(room, np.float32)
    for i in range(b):
        n_t = n_e = 0
        for t0 in range(p):
            t = i * p + t0
            if use_dense:
                row = dense[t, lo:hi]
                for q in range(0, w, BLOCK):
                    blk = row[q : q + BLOCK]
                    m = _positive_bits(blk)
                    while m:  # the firing codes, by their bits
                        e = q + trailing_zeros(m)  # type: ignore[call-arg]
                        m &= m - np.uint64(1)
                        v = ld(row, e)
                        n_t = _fire(e, v, lo, by_mean, edges, table, n_t, csum, vmax, lh, sc, touched)
                        if keep:
                            fj[n_e], ft[n_e], fv[n_e] = e, t0, v
                            n_e += 1
            else:
                vr, ir = tk_vals[t], tk_idx[t]
                for e in range(kc):
                    f = ir[e]
                    v = vr[e]
                    if lo <= f < hi and v > zero:
                        n_t = _fire(f - lo, v, lo, by_mean, edges, table, n_t, csum, vmax, lh, sc, touched)
                        if keep:
                            fj[n_e], ft[n_e], fv[n_e] = f - lo, t0, v
                            n_e += 1
        entered = False
        for u in range(n_t):
            j = touched[u]
            score = sc[j] / np.float32(p) if by_mean else sc[j]
            img_fired[lo + j] += 1
            cscore[j] += score
            scores_bs[i, lo + j] = score
            if score > minv[j]:  # (a score at most the weakest slot's cannot beat any slot of its source either)
                q = mins[j]
                if cap > 0:  # the image's source at its cap: it can only take that source's weakest slot
                    wq = _source_full(src_ks, vals_ks, lo + j, src_b[i], cap)
                    q = q if wq < 0 else wq if score > vals_ks[wq, lo + j] else -1
                if q >= 0:
                    n_open -= minv[j] == -np.inf
                    _enter(j, lo, q, score, ids_b[i], vals_ks, ids_ks, minv, mins, ent, patches, keep, p)
                    if cap > 0:
                        src_ks[q, lo + j] = src_b[i]
                    n_open += minv[j] == -np.inf
                    entered = True
        if n_open > 0:  # a feature that has not filled its k slots takes this image at score 0 (torch.topk's)
            for j in range(w):
                if sc[j] == 0 and minv[j] == -np.inf:
                    if cap > 0 and _source_full(src_ks, vals_ks, lo + j, src_b[i], cap) >= 0:
                        continue  # its source's slots are full, with better images
                    n_open -= 1
                    q = mins[j]
                    _enter(j, lo, q, zero, ids_b[i], vals_ks, ids_ks, minv, mins, ent, patches, np.bool_(False), p)
                    if cap > 0:
                        src_ks[q, lo + j] = src_b[i]
                    n_open += minv[j] == -np.inf
        if entered:  # the entering rows' per-patch codes
            for q in range(n_e):
                j = fj[q]
                if ent[j] >= 0:
                    patches[((lo + j) * k + ent[j]) * p + ft[q]] = f16_bits(fv[q])
        for u in range(n_t):
            j = touched[u]
            sc[j] = 0
            ent[j] = -1
        if (since + i + 1) % flush == 0:
            _add_counts(hist[lo * n_hist : hi * n_hist], lh[lo * n_hist : hi * n_hist])
    for j in range(w):
        vsum[lo + j] += csum[j]
        img_score_sum[lo + j] += cscore[j]


@kernel()
def _add_counts(out: np.ndarray, counts: np.ndarray) -> None:
    """out += counts, and counts zeroed."""
    for q in range(out.shape[0]):
        out[q] += counts[q]
        counts[q] = 0


@kernel()
def _source_full(src_ks: np.ndarray, vals_ks: np.ndarray, f: int, g: int, cap: int) -> int:
    """Whether source g holds `cap` of feature f's slots: then its weakest slot (the first of equal ones), else -1.
    The capped sets form a matroid, so taking an image this way as it comes (into its source's weakest slot when
    the source is full, else into the feature's weakest) keeps the best capped top-k of every image so far: what
    the torch merge (scan.within_cap) chooses over a chunk at once, up to which of equal values is kept."""
    c = 0
    w = -1
    wv = np.float32(np.inf)
    for r in range(src_ks.shape[0]):
        if src_ks[r, f] == g:
            c += 1
            if vals_ks[r, f] < wv:
                wv, w = vals_ks[r, f], r
    return w if c >= cap else -1


@kernel()
def _find_min(vals_ks: np.ndarray, f: int, j: int, minv: np.ndarray, mins: np.ndarray) -> None:
    """Feature f's smallest slot value and its first slot, into minv[j], mins[j]."""
    col = vals_ks[:, f]
    m, q = col[0], 0
    for r in range(col.shape[0]):
        if col[r] < m:
            m, q = col[r], r
    minv[j], mins[j] = m, q


@kernel(inline=True)
def _fire(j: int, v: float, lo: int, by_mean: bool, edges: np.ndarray, table: np.ndarray, n_t: int, csum: np.ndarray,
          vmax: np.ndarray, lh: np.ndarray, sc: np.ndarray, touched: np.ndarray) -> int:
    """A firing code v of feature lo + j: the statistics (lh: the 16-bit histogram counts), and the image's score
    (the feature listed as touched on its first code); returns the touched count."""
    f = lo + j
    csum[j] += v
    vmax[f] = max(vmax[f], v)
    lh[f * (edges.shape[0] + 1) + _bin(v, edges, table)] += 1
    # Without branches (a firing code's are unpredictable; their mispredictions cost more than the rest of this
    # work): the feature is written at the end of the touched list, which grows by one on its first code.
    touched[n_t] = j
    n_t += sc[j] == 0
    sc[j] = sc[j] + v if by_mean else max(sc[j], v)
    return n_t


@kernel()
def _enter(j: int, lo: int, q: int, score: float | np.float32, image_id: int, vals_ks: np.ndarray,
           ids_ks: np.ndarray, minv: np.ndarray, mins: np.ndarray, ent: np.ndarray, patches: np.ndarray,
           keep: bool | np.bool_, p: int) -> None:
    """The image takes feature lo + j's slot q (its per-patch codes zeroed, to be written by the caller); the
    feature's smallest slot is found again."""
    k = vals_ks.shape[0]
    f = lo + j
    vals_ks[q, f] = score
    ids_ks[q, f] = image_id
    if keep:
        ent[j] = q
        base = (f * k + q) * p
        patches[base : base + p] = 0
    _find_min(vals_ks, f, j, minv, mins)


def scan(
    codes: Tensor | tuple[Tensor, Tensor], b: int, p: int, by_mean: bool, ids_b: Tensor, edges: np.ndarray,
    table: np.ndarray, vals_ks: Tensor, ids_ks: Tensor, patches_skp: Tensor | None, img_fired: Tensor, vsum: Tensor,
    img_score_sum: Tensor, vmax: Tensor, hist: Tensor, counts: HistCounts, threads: int,
    src_ks: Tensor | None = None, src_b: Tensor | None = None, cap: int | None = None,
) -> Tensor:
    """Fold one chunk into a scanner's state in place (the arguments from `vals_ks` on are updated; `hist` holds
    the histogram once `counts.flush_into(hist)` has run), the features split among `threads` threads; returns
    the images' scores (b, s). `codes`: dense (b p, s) float32 or bfloat16, or a TopK encoder's (values,
    features), (b p, kc) each. With `cap`, at most that many of a feature's exemplars per source (`src_b`: each
    image's source, int64; `src_ks`: each slot's, updated)."""
    s = vals_ks.shape[1]
    if isinstance(codes, Tensor):  # dense float32, or bfloat16 as its bits (read through `ld`)
        dense, tk_vals, tk_idx = as_array(codes), np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)
    else:
        dense = np.empty((0, 0), np.float32)
        tk_vals, tk_idx = codes[0].float().numpy(), codes[1].numpy()
    scores = torch.zeros(b, s)
    patches = (patches_skp.view(torch.int16).numpy().view(np.uint16).reshape(-1) if patches_skp is not None
               else np.empty(0, np.uint16))
    assert p == counts.p, (p, counts.p)
    _scan(dense, tk_vals, tk_idx, b, p, by_mean, ids_b.numpy(), edges, table, n_threads(threads), vals_ks.numpy(),
          ids_ks.numpy(), patches, img_fired.numpy(), vsum.numpy(), img_score_sum.numpy(), vmax.numpy(), hist.numpy(),
          counts.lh, counts.since, counts.every, scores.numpy(),
          src_ks.numpy() if src_ks is not None else np.empty((0, 0), np.int64),
          src_b.numpy() if src_b is not None else np.empty(0, np.int64), cap or 0)
    counts.since = (counts.since + b) % counts.every
    return scores


class HistCounts:
    """The compiled scan's 16-bit histogram counts (n_features x bins) not yet added into the scanner's int64
    table: one image adds at most p (its tokens) to a count, so they are added every 65535 // p images, and
    whenever the table is read (`flush_into`)."""

    def __init__(self, n: int, p: int) -> None:
        self.lh = np.zeros(n, np.uint16)
        self.p = p
        self.every = max(1, 65535 // p)
        self.since = 0  # images counted since the counts were last added

    def flush_into(self, hist: Tensor) -> None:
        hist += torch.from_numpy(self.lh.astype(np.int64))
        self.lh[:] = 0
        self.since = 0
