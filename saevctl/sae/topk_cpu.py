"""Compiled (numba) CPU kernels for `saevctl.sae.topk`: a per-row top-k and a batch-wide top-k that read each row
once, in cache, instead of torch.topk's partial sort of a copy of every row.

The selection, per row:
- the row is split into G strided groups (column j in group j mod n_groups) and each group's maximum taken, a
  vectorised pass;
- a threshold t is bisected on those maxima until at least k (and few more) groups have a maximum >= t: k such
  groups hold k distinct elements >= t, so every one of the row's k largest values is >= t;
- the elements >= t of those groups (and of the columns past the last whole group) are the candidates: the
  groups' elements are first copied to fixed places (a store that waits on no comparison), then the copies >= t
  found by 64-bit compare masks (a walk that kept each element by its comparison's 0/1 chained every store to
  the comparison before it: 10-20% slower in all);
- a quickselect over the candidates returns the k largest.
The batch-wide selection (BatchTopK) over all rows at once:
- a threshold t is estimated from a sample of the blocks (every 16th), aimed at about 1.25k elements >= t in all;
- one pass over the blocks finds the elements >= t by 64-bit compare masks, in index order (and checks for NaN);
  where they are fewer than k, the group maxima of every block give an exact threshold as above and the pass
  runs again;
- the k-th largest candidate is found by a histogram of 16-bit keys (a quickselect only within its bin), and the
  k kept in index order.
A row holding NaN is left to torch.topk (flagged back to the caller), so values match torch.topk's exactly.
bfloat16 is read as its bits and widened element by element (exact; see saevctl.compiled).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import prange
from numba.cpython.unsafe.numbers import trailing_zeros
from torch import Tensor

from saevctl.compiled import as_array, f32_bits, kernel, ld, n_threads

GROUP = 16  # elements per strided group: one AVX-512 float32 vector per group's slice, measured fastest
SLACK = 1.5  # the bisection stops once the groups above the threshold are at most SLACK * k


@kernel(fastmath={"reassoc", "nsz"})
def _row_sum(r: np.ndarray) -> np.float32:
    acc = np.float32(0.0)
    for j in range(r.shape[0]):
        acc += ld(r, j)
    return acc


@kernel()
def _has_nan(r: np.ndarray) -> bool:
    """NaN (or +inf and -inf together) in r: a NaN propagates through a sum, one vectorised pass (which also
    brings r into cache for the group maxima)."""
    t = _row_sum(r)
    return bool(t != t)


@kernel(fastmath=True)
def _group_max(r: np.ndarray, n_groups: int, out: np.ndarray) -> None:
    # GROUP is a compile-time constant: the inner loop unrolls and the outer one vectorises (2x the runtime form)
    for g in range(n_groups):
        m = ld(r, g)
        for t in range(1, GROUP):
            v = ld(r, g + t * n_groups)
            m = v if v > m else m
        out[g] = m


@kernel(fastmath=True)
def _count_ge(a: np.ndarray, n: int | np.int64, t: np.float32) -> int:
    c = 0
    for j in range(n):
        c += a[j] >= t
    return c


@kernel(fastmath=True)
def _min_max(a: np.ndarray, n: int | np.int64) -> tuple[np.float32, np.float32]:
    lo = a[0]
    hi = a[0]
    for j in range(1, n):
        lo = min(lo, a[j])
        hi = max(hi, a[j])
    return lo, hi


@kernel()
def _threshold(a: np.ndarray, n: int | np.int64, k: int, slack: float) -> np.float32:
    """A value t with at least k of a[:n] >= t, raised by bisection while more than slack * k are."""
    lo, hi = _min_max(a, n)
    for _ in range(64):
        mid = lo + (hi - lo) * np.float32(0.5)
        if not (lo < mid < hi):  # -inf bounds, or the bounds are adjacent floats
            break
        c = _count_ge(a, n, mid)
        if c >= k:
            lo = mid
            if c <= slack * k:
                break
        else:
            hi = mid
    return lo


@kernel()
def _top_front(v: np.ndarray, ix: np.ndarray, n: int | np.int64, k: int) -> None:
    """Rearrange v[:n] (ix alongside) so that v[:k] hold the k largest: a quickselect, median-of-three pivot."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        a, b, c = v[lo], v[mid], v[hi]
        if a < b:
            a, b = b, a
        if b < c:
            b = c
            if a < b:
                b = a
        i, j = lo, hi
        while i <= j:
            while v[i] > b:
                i += 1
            while v[j] < b:
                j -= 1
            if i <= j:
                v[i], v[j] = v[j], v[i]
                ix[i], ix[j] = ix[j], ix[i]
                i += 1
                j -= 1
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            break


BITS = 64  # elements compared per vector pass in the flat top-k: one 64-bit mask


@kernel(inline=True)
def _at_least_bits(x: np.ndarray, t: np.float32) -> np.uint64:
    """Bit e set where x[e] >= t, for x of BITS elements: one vectorised pass (a fixed trip count)."""
    m = np.uint64(0)
    for e in range(BITS):
        m |= np.uint64(ld(x, e) >= t) << np.uint64(e)
    return m


@kernel()
def _select_row(r: np.ndarray, k: int, ov: np.ndarray, oi: np.ndarray, cm: np.ndarray,
                cv: np.ndarray, ci: np.ndarray, gl: np.ndarray, st: np.ndarray) -> bool:
    """The k largest of row r into ov/oi; False (nothing written) where the row holds NaN."""
    s = r.shape[0]
    if _has_nan(r):  # torch.topk decides
        return False
    n_groups = s // GROUP
    _group_max(r, n_groups, cm)
    t = _threshold(cm, n_groups, k, SLACK)
    ng = np.int64(0)  # the groups above t, listed without a branch
    for g in range(n_groups):
        gl[ng] = g
        ng += cm[g] >= t
    for i in range(ng):  # their elements staged at fixed places (no store waits on a comparison)
        g = gl[i]
        for u in range(GROUP):
            st[i * GROUP + u] = ld(r, g + u * n_groups)
    end = -(-(ng * GROUP) // BITS) * BITS
    for q in range(ng * GROUP, end):  # padding no threshold keeps (t may be -inf: rows mostly -inf, as AuxK's)
        st[q] = np.nan
    n = np.int64(0)  # typed int64 from the start: a literal 0 would compile the helpers for Literal[int](0) too
    for q in range(0, end, BITS):  # the staged elements >= t, by their bits
        mk = _at_least_bits(st[q : q + BITS], t)
        while mk:
            e = q + trailing_zeros(mk)  # type: ignore[call-arg]
            mk &= mk - np.uint64(1)
            cv[n] = st[e]
            ci[n] = gl[e // GROUP] + (e % GROUP) * n_groups
            n += 1
    for j in range(n_groups * GROUP, s):
        if ld(r, j) >= t:
            cv[n] = ld(r, j)
            ci[n] = j
            n += 1
    if n > 4 * k:  # bisect once more, on the candidates, before the exact (branchy) quickselect
        t = _threshold(cv, n, k, np.float64(1.0))
        m = np.int64(0)
        for q in range(n):
            if cv[q] >= t:
                cv[m] = cv[q]
                ci[m] = ci[q]
                m += 1
        n = m
    _top_front(cv, ci, n, k)
    for q in range(k):  # a loop, not a slice copy: that compiles numba's shape-mismatch error and its string
        ov[q] = cv[q]   # formatting, ~3 s of a cold start
        oi[q] = ci[q]
    return True


@kernel(parallel=True)
def _rows(x: np.ndarray, k: int, nt: int, ov: np.ndarray, oi: np.ndarray, ok: np.ndarray) -> None:
    b, s = x.shape
    per = (b + nt - 1) // nt
    for th in prange(nt):
        cm = np.empty(s // GROUP, np.float32)
        cv = np.empty(s, np.float32)
        ci = np.empty(s, np.int64)
        gl = np.empty(s // GROUP, np.int64)
        st = np.empty(s + BITS, np.float32)
        for i in range(th * per, min(b, (th + 1) * per)):
            ok[i] = _select_row(x[i], k, ov[i], oi[i], cm, cv, ci, gl, st)


def supported(x_bs: Tensor, k: int) -> bool:
    """Whether `rows` takes this input: a CPU float32/bfloat16 2-D tensor with unit column stride and at least 4k
    groups per row (0 < k <= s / 64; larger k goes to torch.topk)."""
    return (x_bs.device.type == "cpu" and x_bs.dtype in (torch.float32, torch.bfloat16) and x_bs.dim() == 2
            and x_bs.stride(1) == 1 and x_bs.shape[0] > 0 and 0 < 4 * k * GROUP <= x_bs.shape[1])


def rows(x_bs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of each row's k largest, unsorted, as `x.topk(k, dim=1, sorted=False)` (see `supported`)."""
    b, s = x_bs.shape
    x = x_bs if x_bs.stride(0) == s else x_bs.contiguous()
    ov = np.empty((b, k), np.float32)
    oi = np.empty((b, k), np.int64)
    ok = np.empty(b, np.bool_)
    _rows(as_array(x), k, n_threads(), ov, oi, ok)
    vals, idx = torch.from_numpy(ov).to(x.dtype), torch.from_numpy(oi)
    if not ok.all():
        bad = torch.from_numpy(~ok).nonzero().squeeze(1)
        vals[bad], idx[bad] = x[bad].topk(k, dim=1, sorted=False)
    return vals, idx


# --- the batch-wide top-k (BatchTopK) -----------------------------------------------------------------------

FLAT_BLOCK = 4096  # groups per block of the flattened input: a block's maxima stay in L1 while its slices stream
BINS = 4096  # histogram bins for the first threshold over all blocks' maxima
TIED = 8  # more than TIED * k groups at or above the exact threshold: ties (bisection got no closer), torch decides


@kernel(parallel=True)
def _flat_count(cm: np.ndarray, t: np.float32, nt: int) -> int:
    n = cm.shape[0]
    per = (n + nt - 1) // nt
    counts = np.zeros(nt, np.int64)
    for th in prange(nt):
        lo = th * per
        counts[th] = _count_ge(cm[lo : min(n, lo + per)], min(n, lo + per) - lo, t)
    return int(counts.sum())


@kernel()
def _flat_threshold(cm: np.ndarray, k: int, nt: int) -> np.float32:
    """A t with at least k maxima >= t and, where bisection can get there, at most 2k: a histogram's bin edge
    first, then bisection with exact counts."""
    lo, hi = _min_max(cm, cm.shape[0])
    if hi - lo < np.inf and lo < hi:  # finite and not all one value: start from the histogram's bin
        scale = BINS / (hi - lo)
        hist = np.zeros(BINS + 1, np.int64)
        for j in range(cm.shape[0]):
            hist[min(BINS, int((cm[j] - lo) * scale))] += 1
        acc, b = 0, BINS
        while b > 0:
            acc += hist[b]
            if acc >= k:
                break
            b -= 1
        top = hi if b >= BINS - 1 else lo + (b + 2) / scale  # a bin's edges, widened by one for rounding
        bottom = lo + (b - 1) / scale if b > 1 else lo
        if _flat_count(cm, bottom, nt) >= k:
            lo, hi = bottom, min(hi, top)
    for _ in range(64):
        mid = lo + (hi - lo) * np.float32(0.5)
        if not (lo < mid < hi):
            break
        c = _flat_count(cm, mid, nt)
        if c >= k:
            lo = mid
            if c <= 2 * k:
                break
        else:
            hi = mid
    return lo


@kernel(parallel=True)
def _flat_pass(x: np.ndarray, n_blocks: int, t: np.float32, nt: int, nan: np.ndarray, cv: np.ndarray,
               ci: np.ndarray, seg: np.ndarray, counts: np.ndarray) -> None:
    """One pass over the blocks, thread th taking a contiguous run of them: each block's NaN check into nan, and
    its elements >= t, in index order, into cv/ci from seg[th] (at most seg[th + 1] - seg[th] kept; counts[th]
    counts all)."""
    blk = FLAT_BLOCK * GROUP
    per = (n_blocks + nt - 1) // nt
    for th in prange(nt):
        n = 0
        cap = seg[th + 1] - seg[th]
        for bi in range(th * per, min(n_blocks, (th + 1) * per)):
            part = x[bi * blk:(bi + 1) * blk]
            nan[bi] = _has_nan(part)
            for q in range(0, blk, BITS):  # the elements >= t by their bits
                mk = _at_least_bits(part[q : q + BITS], t)
                while mk:
                    j = q + trailing_zeros(mk)  # type: ignore[call-arg]
                    mk &= mk - np.uint64(1)
                    if n < cap:
                        cv[seg[th] + n] = ld(part, j)
                        ci[seg[th] + n] = bi * blk + j
                    n += 1
        counts[th] = n


@kernel(parallel=True)
def _flat_maxima(x: np.ndarray, n_blocks: int, nt: int, cm: np.ndarray) -> None:
    """Every block's group maxima into cm (for the exact threshold, where the estimate missed)."""
    blk = FLAT_BLOCK * GROUP
    per = (n_blocks + nt - 1) // nt
    for th in prange(nt):
        for bi in range(th * per, min(n_blocks, (th + 1) * per)):
            _group_max(x[bi * blk:(bi + 1) * blk], FLAT_BLOCK, cm[bi * FLAT_BLOCK:(bi + 1) * FLAT_BLOCK])


@kernel()
def _estimate(x: np.ndarray, n_blocks: int, k: int) -> np.float32:
    """A threshold from every S-th block, aimed at about 1.25k elements above it over all blocks (checked by the
    caller: too few candidates above it and the threshold is recomputed exactly). The sampled blocks' group
    maxima give a first threshold with at least the aim's share of the sample's elements above it; the threshold
    is the aim-th largest of those elements (aiming at maxima instead let ~2.8 elements per group through, 2.8x
    the candidates the flat pass then copies and sorts)."""
    blk = FLAT_BLOCK * GROUP
    step = max(1, n_blocks // 16)
    n_s = (n_blocks + step - 1) // step
    scm = np.empty(n_s * FLAT_BLOCK, np.float32)
    for q in range(n_s):
        bi = q * step
        _group_max(x[bi * blk:(bi + 1) * blk], FLAT_BLOCK, scm[q * FLAT_BLOCK:(q + 1) * FLAT_BLOCK])
    target = min(scm.shape[0], int(1.25 * k * n_s / n_blocks) + 16)
    t = _threshold(scm, scm.shape[0], target, np.float64(2.0))
    n = 0
    for q in range(n_s):
        n += _n_at_least(x[q * step * blk:(q * step + 1) * blk], t)
    if n < target:  # NaN in the sample (the caller's pass finds it) or maxima bisection could not split
        return t
    vals = np.empty(n, np.float32)
    n = 0
    for q in range(n_s):
        part = x[q * step * blk:(q * step + 1) * blk]
        for j in range(0, blk, BITS):
            mk = _at_least_bits(part[j : j + BITS], t)
            while mk:
                vals[n] = ld(part, j + trailing_zeros(mk))  # type: ignore[call-arg]
                mk &= mk - np.uint64(1)
                n += 1
    return _kth_largest(vals, target)


@kernel()
def _n_at_least(a: np.ndarray, t: np.float32) -> int:
    n = 0
    for j in range(a.shape[0]):
        if ld(a, j) >= t:
            n += 1
    return n


@kernel()
def _flat(x: np.ndarray, k: int, nt: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The k largest of x (values, indices), and False (nothing selected) where x holds NaN or too many ties."""
    blk = FLAT_BLOCK * GROUP
    n_blocks = x.shape[0] // blk
    tail = x[n_blocks * blk:]
    if _has_nan(tail):
        return np.empty(0, np.float32), np.empty(0, np.int64), False
    nan = np.empty(n_blocks, np.bool_)
    counts = np.zeros(nt, np.int64)
    seg = np.arange(nt + 1) * ((3 * k) // nt + blk)  # room per thread: an even share of 1.5x the estimate's aim
    t = _estimate(x, n_blocks, k)
    cv = np.empty(seg[-1], np.float32)
    ci = np.empty(seg[-1], np.int64)
    _flat_pass(x, n_blocks, t, nt, nan, cv, ci, seg, counts)
    if nan.any():
        return np.empty(0, np.float32), np.empty(0, np.int64), False
    n_tail = _n_at_least(tail, t)
    if counts.sum() + n_tail < k or (counts > seg[1:] - seg[:-1]).any():
        # the estimate was too high (or a thread's share overflowed): an exact threshold from all the group
        # maxima, and room per thread for every element of its groups above it
        cm = np.empty(n_blocks * FLAT_BLOCK, np.float32)
        _flat_maxima(x, n_blocks, nt, cm)
        t = _flat_threshold(cm, k, nt)
        per = (n_blocks + nt - 1) // nt
        for th in range(nt):
            lo, hi = th * per * FLAT_BLOCK, min(n_blocks, (th + 1) * per) * FLAT_BLOCK
            seg[th + 1] = seg[th] + (_count_ge(cm[lo:hi], max(0, hi - lo), t) if hi > lo else 0) * GROUP
        if seg[-1] > TIED * GROUP * k:  # ties the threshold cannot split (a constant batch): torch.topk, no copy
            return np.empty(0, np.float32), np.empty(0, np.int64), False
        cv = np.empty(seg[-1], np.float32)
        ci = np.empty(seg[-1], np.int64)
        _flat_pass(x, n_blocks, t, nt, nan, cv, ci, seg, counts)
        n_tail = _n_at_least(tail, t)
    n = 0
    for th in range(nt):  # the threads' runs, packed
        for q in range(seg[th], seg[th] + counts[th]):
            cv[n] = cv[q]
            ci[n] = ci[q]
            n += 1
    vals = np.empty(n + n_tail, np.float32)
    idx = np.empty(n + n_tail, np.int64)
    for q in range(n):  # loops, not slice copies (see _select_row)
        vals[q] = cv[q]
        idx[q] = ci[q]
    for j in range(tail.shape[0]):
        if ld(tail, j) >= t:
            vals[n] = ld(tail, j)
            idx[n] = n_blocks * blk + j
            n += 1
    return _keep_in_order(vals, idx, k)


@kernel()
def _key16(v: np.float32) -> np.int64:
    """The high 16 bits of v's order-preserving integer key (larger float, larger key; -0 just below +0): for a
    value that came from bfloat16, a bin of its own."""
    u = f32_bits(v)  # type: ignore[call-arg, var-annotated]
    key = ~u if u >> np.uint32(31) else u | np.uint32(0x80000000)
    return np.int64(key >> np.uint32(16))


@kernel()
def _kth_largest(vals: np.ndarray, k: int) -> np.float32:
    """The k-th largest of vals (no NaN; 0 < k <= len): a histogram of the 16-bit keys finds its bin, and a
    quickselect runs among that bin's members only (values from bfloat16: one value, no quickselect)."""
    n = vals.shape[0]
    hist = np.zeros(1 << 16, np.int64)
    for q in range(n):
        hist[_key16(vals[q])] += 1
    above, bin_ = 0, (1 << 16) - 1
    while above + hist[bin_] < k:
        above += hist[bin_]
        bin_ -= 1
    m = hist[bin_]
    tv = np.empty(m, np.float32)
    j = 0
    for q in range(n):
        if _key16(vals[q]) == bin_:
            tv[j] = vals[q]
            j += 1
    lo, hi = _min_max(tv, m)
    if lo == hi:
        return lo
    need = k - above
    _top_front(tv, np.empty(m, np.int64), m, need)
    kth = np.float32(tv[0])
    for q in range(1, need):
        kth = min(kth, tv[q])
    return kth


@kernel()
def _keep_in_order(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The k largest of vals (idx alongside): those above the k-th largest value in their given order, then the
    first that equal it. The candidates come block by block, nearly in index order, and so do the k kept: a
    caller's counting sort by row then writes nearly in sequence (after a quickselect's shuffle, its scattered
    writes took ~0.6 ms more a BatchTopK step). The k-th value by a histogram (`_kth_largest`): a quickselect
    over all the candidates took 6.8 ms of a 4,096 x 6,144 BatchTopK selection."""
    n = vals.shape[0]
    kth = _kth_largest(vals, k)
    ov = np.empty(k, np.float32)
    oi = np.empty(k, np.int64)
    m = 0
    for q in range(n):
        if vals[q] > kth:
            ov[m] = vals[q]
            oi[m] = idx[q]
            m += 1
    for q in range(n):
        if m < k and vals[q] == kth:
            ov[m] = vals[q]
            oi[m] = idx[q]
            m += 1
    return ov, oi, True


def flat_supported(x: Tensor, k: int) -> bool:
    """Whether `flat` takes this input: a contiguous CPU float32/bfloat16 tensor of at least one block, and at
    least 4k groups."""
    n = x.numel()
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous()
            and n >= FLAT_BLOCK * GROUP and 0 < 4 * k * GROUP <= n)


def flat(x: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """(values, flat indices) of the k largest entries of `x`, unsorted; None where x holds NaN or ties too many to
    narrow (torch.topk decides)."""
    vals, idx, ok = _flat(as_array(x.reshape(-1)), k, n_threads())
    return (torch.from_numpy(vals).to(x.dtype), torch.from_numpy(idx)) if ok else None
