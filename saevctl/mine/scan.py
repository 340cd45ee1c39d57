"""Streaming statistics over SAE codes: per-feature top-k exemplars merged chunk by chunk, firing counts,
log-binned histograms and per-image top features. Memory is bounded by features x k, never by images.

No I/O: `pipeline.py` feeds it chunks of codes; tests compare it with `torch.topk` on everything. On a CPU a
chunk is folded in by one compiled pass (saevctl.mine.scan_cpu.scan); the torch code here is its reference and
runs on CUDA and for a per-source cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saevctl.mine import scan_cpu
from saevctl.mine.schema import N_HIST, hist_edges

# Features merged per block, so the transient copies of the exemplar state stay small.
MERGE_BLOCK = 2048
# Switch: False makes the top-k copy entering rows' per-patch codes from the dense chunk (the reference).
SPARSE_PATCHES = True
# Codes per block of the CPU firing pass (1 MiB of float32: fits in L2).
FIRING_BLOCK = 1 << 18
# Switch: False makes a CPU scan fold chunks in with torch ops (the reference of saevctl.mine.scan_cpu's compiled
# scan; tests check they agree) and place entering rows' per-patch codes with torch ops.
COMPILED = True
# The histogram's inner bin edges as float32: a value's bin is how many of them are <= it, on every path.
HIST_INNER = np.array([hi for _lo, hi in hist_edges()[:-1]], dtype=np.float32)
HIST_TABLE = scan_cpu.bin_table(HIST_INNER)


@dataclass(frozen=True)
class Fired:
    """The firing (> 0) codes of a chunk of n_rows rows x p patches x s features, as flat lists: what the scanner
    computes anyway, and all the top-k needs to copy an entering row's per-patch codes."""

    key_n: Int[Tensor, " n"]
    """row * s + feature."""
    patch_n: Int[Tensor, " n"]
    vals_n: Float[Tensor, " n"]
    n_rows: int
    s: int


@dataclass(frozen=True)
class TopKCodes:
    """Codes of a chunk kept sparse, as a TopK encoder computes them before scattering: per token its k largest
    (values after the ReLU, feature indices), every other code 0. The scanner takes these instead of the dense
    (b, p, s) codes, skipping the zero + scatter and the dense firing pass."""

    vals_tk: Float[Tensor, "t k"]
    idx_tk: Int[Tensor, "t k"]
    shape: tuple[int, int, int]
    """(b, p, s) of the dense codes."""

    def firing(self) -> tuple[Tensor, Tensor]:
        """Flat indices into the dense (b, p, s) codes and values of the codes > 0, in the dense pass's order."""
        idx_tk, order_tk = self.idx_tk.sort(dim=1)
        vals_tk = self.vals_tk.gather(1, order_tk)
        flat_tk = idx_tk + torch.arange(len(idx_tk), device=idx_tk.device)[:, None] * self.shape[2]
        keep_tk = vals_tk > 0
        return flat_tk[keep_tk], vals_tk[keep_tk]

    def dense(self) -> Float[Tensor, "b p s"]:
        """The dense codes (the reference path's input)."""
        b, p, s = self.shape
        codes = torch.zeros((b * p, s), dtype=self.vals_tk.dtype, device=self.vals_tk.device)
        return codes.scatter_(1, self.idx_tk, self.vals_tk).view(b, p, s)


class StreamingTopK:
    """The k highest-scoring rows per feature seen so far, with their ids and (optionally) per-patch codes.

    Each feature has k unordered slots. `update` only touches features whose smallest slot a new row beats,
    and only copies the rows that enter (into the slots they evict), so after the first chunks a merge costs
    almost nothing and memory stays at features x k. Equal to `torch.topk` over all rows at once (with ties
    either row may be kept); `ranked()` sorts the slots.
    """

    def __init__(
        self, n_features: int, k: int, n_patches: int = 0, patch_dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu", max_per_source: int | None = None,
    ) -> None:
        assert k >= 1 and (max_per_source is None or max_per_source >= 1)
        self.k = k
        self.vals_ks = torch.full((k, n_features), -math.inf, device=device)
        self.ids_ks = torch.full((k, n_features), -1, dtype=torch.int64, device=device)
        self.patches_skp = (
            torch.zeros((n_features, k, n_patches), dtype=patch_dtype, device=device) if n_patches else None
        )
        # A cap of k or more never binds: those scans take the uncapped path and keep no source ids.
        self.cap = max_per_source if max_per_source is not None and max_per_source < k else None
        self.src_ks = torch.full((k, n_features), -1, dtype=torch.int64, device=device) if self.cap else None
        self.n_sources = 0

    def update(
        self,
        scores_bs: Float[Tensor, "b s"],
        ids_b: Int[Tensor, " b"],
        patches_bps: Float[Tensor, "b p s"] | Fired | None = None,
        src_b: Int[Tensor, " b"] | None = None,
    ) -> None:
        """Fold in b rows; `src_b` (a source photo's number per row) is needed when built with max_per_source.
        `patches_bps`: the rows' per-patch codes, dense or as their firing entries (`Fired`, what the scanner
        passes: the same codes without strided reads of the dense chunk)."""
        # Capped or not, a row that beats no slot cannot enter: the k slots already hold k better rows that are
        # allowed together.
        hit_s = (scores_bs > self.vals_ks.amin(0)).any(0)
        feats = hit_s.nonzero().squeeze(1)
        if self.cap is not None:
            assert src_b is not None, "a capped top-k needs each row's source"
            self.n_sources = max(self.n_sources, int(src_b.max()) + 1 if len(src_b) else 0)
        entered = [self._merge(feats[lo : lo + MERGE_BLOCK], scores_bs, ids_b, src_b)
                   for lo in range(0, len(feats), MERGE_BLOCK)]
        if self.patches_skp is not None and entered:
            assert patches_bps is not None
            fi, slot, row = (torch.cat(c) for c in zip(*entered, strict=True))
            if isinstance(patches_bps, Fired):
                self._put_fired(fi, slot, row, patches_bps)
            else:
                self._put_dense(fi, slot, row, patches_bps)

    def _merge(
        self, f: Tensor, scores_bs: Tensor, ids_b: Tensor, src_b: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Merge the rows into the slots of features `f`; returns the (feature, slot, row) of each entering row."""
        k = self.k
        new_bf = scores_bs[:, f].float()
        cand = torch.cat([self.vals_ks[:, f], new_bf], 0)  # (k+b, F)
        allowed = None
        if self.cap is not None:
            assert self.src_ks is not None and src_b is not None
            src = torch.cat([self.src_ks[:, f], src_b[:, None].expand(-1, len(f))], 0)
            allowed = within_cap(cand, src, self.cap, self.n_sources)
            cand = cand.masked_fill(~allowed, -math.inf)  # a row over its source's cap counts as an empty slot
        pos = cand.topk(k, dim=0, sorted=False).indices
        chosen = torch.zeros_like(cand, dtype=torch.bool).scatter_(0, pos, True)
        # Per feature, as many old slots are evicted as new rows enter; nonzero() on the transposed masks lists
        # both feature by feature, so the i-th evicted slot and the i-th entering row belong to the same feature.
        out_fk = (~chosen[:k]).t().nonzero()
        in_fb = chosen[k:].t().nonzero()
        assert out_fk.shape == in_fb.shape and torch.equal(out_fk[:, 0], in_fb[:, 0])
        fi, slot, row = f[out_fk[:, 0]], out_fk[:, 1], in_fb[:, 1]
        self.vals_ks[slot, fi] = cand[k + row, out_fk[:, 0]]
        self.ids_ks[slot, fi] = ids_b[row]
        if allowed is not None:
            self._settle_capped(f, fi, slot, row, allowed, chosen, src_b)
        return fi, slot, row

    def _put_dense(self, fi: Tensor, slot: Tensor, row: Tensor, patches_bps: Tensor) -> None:
        """The entering rows' per-patch codes read from the dense chunk (the reference)."""
        assert self.patches_skp is not None
        b, _, s = patches_bps.shape
        if len(fi) * 8 > b * s:
            # Many entrants (the first chunks): one transposing copy beats len(fi) * p strided reads.
            src_bsp = patches_bps.transpose(1, 2).to(self.patches_skp.dtype, memory_format=torch.contiguous_format)
            self.patches_skp[fi, slot] = src_bsp[row, fi]
        else:
            self.patches_skp[fi, slot] = patches_bps[row, :, fi].to(self.patches_skp.dtype)

    def _put_fired(self, fi: Tensor, slot: Tensor, row: Tensor, fired: Fired) -> None:
        """The entering rows' per-patch codes from the chunk's firing entries: zero their slots, then scatter the
        entries whose (row, feature) entered. O(firing codes) in-cache work instead of p strided reads (a cache
        miss each in a chunk of tens of MB) per entering row."""
        assert self.patches_skp is not None
        self.patches_skp[fi, slot] = 0
        if fi.device.type == "cpu" and COMPILED:
            _, k, p = self.patches_skp.shape
            dest, src = scan_cpu.entering(fired.key_n, fired.patch_n, row, fi, slot, fired.n_rows, fired.s, k, p)
            self.patches_skp.view(-1)[dest] = fired.vals_n[src].to(self.patches_skp.dtype)
            return
        entrant = torch.full((fired.n_rows * fired.s,), -1, dtype=torch.int64, device=fi.device)
        entrant[row * fired.s + fi] = torch.arange(len(fi), device=fi.device)
        e_n = entrant[fired.key_n]
        keep = (e_n >= 0).nonzero().squeeze(1)
        e_n = e_n[keep]
        self.patches_skp[fi[e_n], slot[e_n], fired.patch_n[keep]] = fired.vals_n[keep].to(self.patches_skp.dtype)

    def _settle_capped(self, f: Tensor, fi: Tensor, slot: Tensor, row: Tensor, allowed: Tensor, chosen: Tensor,
                       src_b: Tensor | None) -> None:
        """Record the entering rows' sources, and empty every slot that holds -inf: a row over its source's cap
        that entered, or an old row now over its cap that topk kept among the -inf ties (fewer than k rows
        allowed)."""
        assert self.src_ks is not None and src_b is not None
        entered_empty = self.vals_ks[slot, fi] == -math.inf
        self.ids_ks[slot[entered_empty], fi[entered_empty]] = -1
        self.src_ks[slot, fi] = torch.where(entered_empty, -1, src_b[row])
        stale_s, stale_f = (chosen[: self.k] & ~allowed[: self.k]).nonzero().unbind(1)
        self.vals_ks[stale_s, f[stale_f]] = -math.inf
        self.ids_ks[stale_s, f[stale_f]] = -1
        self.src_ks[stale_s, f[stale_f]] = -1

    def ranked(self) -> tuple[Float[Tensor, "k s"], Int[Tensor, "k s"], Int[Tensor, "k s"]]:
        """Values and ids best first, and the slot each came from (to index patches_skp); unfilled slots
        hold -inf and id -1."""
        vals_ks, slot_ks = self.vals_ks.sort(0, descending=True)
        return vals_ks, self.ids_ks.gather(0, slot_ks), slot_ks


def within_cap(vals_mf: Float[Tensor, "m f"], src_mf: Int[Tensor, "m f"], cap: int, n_sources: int) -> Tensor:
    """Per column, which rows are among the `cap` best of their source (sources are < n_sources, or -1 for an empty
    slot; values are >= 0 or -inf). Greedy over rows by value keeping those is the best top-k with at most `cap`
    per source, and as the allowed sets form a matroid, merging chunk by chunk gives the same rows as one pass
    over all of them (with ties either row may be kept)."""
    src_fm = src_mf.t() + 1
    m = src_fm.shape[1]
    pos_fm = torch.arange(m, device=src_fm.device).expand_as(src_fm)
    idx_bits = max(1, (m - 1).bit_length())
    if n_sources < 1 << (32 - idx_bits):
        # Non-negative float32 values order as their bit patterns, so one int64 key (source, value descending,
        # column) puts each source's rows together, best first, with a plain sort (numpy's is several times
        # faster than torch's on CPU).
        vals_fm = vals_mf.t().contiguous()
        desc = torch.where(vals_fm >= 0, 0x7F800000 - vals_fm.view(torch.int32), 0x7F800001).long()
        key = (src_fm << (31 + idx_bits)) | (desc << idx_bits) | pos_fm
        key = torch.from_numpy(np.sort(key.numpy(), 1)) if key.device.type == "cpu" else key.sort(1).values
        order, src_sorted = key & ((1 << idx_bits) - 1), key >> (31 + idx_bits)
    else:  # more sources than the key holds: two stable sorts
        order = vals_mf.t().argsort(dim=1, descending=True, stable=True)
        src_sorted, by_src = src_fm.gather(1, order).sort(dim=1, stable=True)
        order = order.gather(1, by_src)
    # Sorted by source then value, a row is among its source's `cap` best iff the row `cap` places up is another
    # source's.
    keep = torch.ones_like(src_sorted, dtype=torch.bool)
    keep[:, cap:] = src_sorted[:, cap:] != src_sorted[:, :-cap]
    return torch.empty_like(keep).scatter_(1, order, keep).t()


@dataclass
class FeatureStats:
    """Final per-feature statistics (all tensors have one entry per feature)."""

    n_tokens: int
    n_images: int
    n_fired: Tensor
    """Tokens with a positive code."""
    img_fired: Tensor
    """Images where any token fires."""
    sum: Tensor
    """Sum of codes over all tokens (float64)."""
    img_score_sum: Tensor
    """Sum over images of the ranking score (max or mean over the image's tokens)."""
    max: Tensor
    """Largest code over all tokens."""
    hist_sb: Tensor
    """Firing tokens per log10 bin (see hist_edges)."""

    @property
    def freq(self) -> Tensor:
        return self.n_fired.double() / max(self.n_tokens, 1)

    @property
    def img_freq(self) -> Tensor:
        return self.img_fired.double() / max(self.n_images, 1)

    @property
    def mean(self) -> Tensor:
        """Mean code where the feature fires (0 for dead features)."""
        return self.sum / self.n_fired.clamp_min(1).double()

    @property
    def mean_all(self) -> Tensor:
        return self.sum / max(self.n_tokens, 1)

    @property
    def img_mean(self) -> Tensor:
        return self.img_score_sum / max(self.n_images, 1)


class FeatureScanner:
    """Everything `mine` records for one token kind, fed one chunk of images' codes at a time."""

    def __init__(
        self, n_features: int, k: int, n_patches: int, by: str, top_n: int, keep_patches: bool,
        device: str | torch.device = "cpu", max_per_source: int | None = None,
    ) -> None:
        assert by in ("max", "mean"), by
        self.s, self.by, self.top_n = n_features, by, min(top_n, n_features)
        self.topk = StreamingTopK(n_features, k, n_patches if keep_patches else 0, device=device,
                                  max_per_source=max_per_source)
        self.img_fired = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.sum = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.img_score_sum = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.max = torch.zeros(n_features, device=device)
        self.hist_sb = torch.zeros(n_features * N_HIST, dtype=torch.int64, device=device)
        self._counts: scan_cpu.HistCounts | None = None  # the compiled scan's pending histogram counts
        self.n_tokens = self.n_images = 0
        self._mask: np.ndarray | None = None
        self._one = torch.ones(1, dtype=torch.int64, device=device)
        # the compiled scan's threads: torch's count where the scanner is made (the pipeline then runs the torch
        # path's many small ops on one thread, see pipeline._one_thread)
        self.threads = torch.get_num_threads()
        self.image_top: list[tuple[Tensor, Tensor, Tensor]] = []  # (ids_b, feats_bn, vals_bn)

    def update(
        self, codes_bps: Float[Tensor, "b p s"] | TopKCodes, ids_b: Int[Tensor, " b"],
        src_b: Int[Tensor, " b"] | None = None,
    ) -> None:
        """Fold in one chunk: b images, p tokens each (p = 1 for CLS), s features; codes dense (float32 or
        bfloat16) or as a TopK encoder's (TopKCodes), a code firing where it is > 0 (every other value, a negative one
        too, counts as 0; only the reference path with SPARSE_PATCHES off needs codes >= 0). `src_b`: each image's
        source photo (a number), for max_per_source."""
        b, p, s = codes_bps.shape
        assert s == self.s
        if self._compiled(codes_bps, ids_b, src_b):
            t = self.topk
            tk = isinstance(codes_bps, TopKCodes)
            codes = (codes_bps.vals_tk, codes_bps.idx_tk) if tk else codes_bps.reshape(-1, s)  # type: ignore[union-attr]
            if t.cap is not None and src_b is not None and len(src_b):
                t.n_sources = max(t.n_sources, int(src_b.max()) + 1)
            scores_bs = scan_cpu.scan(codes, b, p, self.by == "mean", ids_b, HIST_INNER, HIST_TABLE, t.vals_ks,
                                      t.ids_ks, t.patches_skp, self.img_fired, self.sum, self.img_score_sum, self.max,
                                      self.hist_sb, self._hist_counts(p), self.threads, t.src_ks, src_b, t.cap)
            self.n_tokens += b * p
            self.n_images += b
        else:  # bfloat16 codes as their float32 values (exact)
            if isinstance(codes_bps, Tensor) and codes_bps.dtype == torch.bfloat16:
                codes_bps = codes_bps.float()
            scores_bs = self._update_torch(codes_bps, ids_b, src_b)
        vals_bn, feats_bn = scores_bs.topk(self.top_n, dim=1)
        self.image_top.append((ids_b.clone(), feats_bn.to(torch.int32), vals_bn.float()))

    def _hist_counts(self, p: int) -> scan_cpu.HistCounts:
        if self._counts is None:
            self._counts = scan_cpu.HistCounts(len(self.hist_sb), p)
        return self._counts

    def _compiled(self, codes_bps: Tensor | TopKCodes, ids_b: Tensor, src_b: Tensor | None) -> bool:
        """Whether a chunk goes to the compiled scan (saevctl.mine.scan_cpu): on a CPU, float32 codes or dense
        bfloat16 ones (capped too, with int64 sources)."""
        t = self.topk
        tk = isinstance(codes_bps, TopKCodes)
        codes = codes_bps.vals_tk if isinstance(codes_bps, TopKCodes) else codes_bps
        capped_ok = t.cap is None or (src_b is not None and src_b.dtype == torch.int64 and src_b.device.type == "cpu")
        dtype_ok = codes.dtype == torch.float32 or (codes.dtype == torch.bfloat16 and not tk)
        return (COMPILED and codes.device.type == "cpu" and dtype_ok and capped_ok
                and ids_b.dtype == torch.int64 and (t.patches_skp is None or t.patches_skp.dtype == torch.float16))

    def _update_torch(
        self, codes_bps: Tensor | TopKCodes, ids_b: Tensor, src_b: Tensor | None
    ) -> Tensor:
        """`update` in torch ops (CUDA, capped top-k, the reference): returns the images' scores (b, s)."""
        b, p, s = codes_bps.shape
        # One dense pass (none for TopKCodes) finds the firing codes; every statistic is then computed on those few
        # entries.
        idx, vals = codes_bps.firing() if isinstance(codes_bps, TopKCodes) else self._firing(codes_bps.reshape(-1))
        vals = vals.float()
        tok = idx // s
        feat = idx - tok * s
        img = tok // p
        key = img * s + feat  # (image in chunk, feature)
        dev = vals.device
        amax_bs = torch.zeros(b * s, device=dev).scatter_reduce_(0, key, vals, "amax").view(b, s)
        if self.by == "max":
            scores_bs = amax_bs
        else:
            scores_bs = torch.zeros(b * s, device=dev).index_add_(0, key, vals).view(b, s) / p
        self.max = torch.maximum(self.max, amax_bs.amax(0))
        self.img_fired += (amax_bs > 0).sum(0)
        self.sum += torch.bincount(feat, weights=vals.double(), minlength=s)
        self.img_score_sum += scores_bs.sum(0, dtype=torch.float64)
        bins = torch.searchsorted(torch.from_numpy(HIST_INNER).to(dev), vals, right=True)
        # Counted in place: a bincount of s * N_HIST would zero and add tens of MB per chunk at wide SAEs.
        self.hist_sb.scatter_add_(0, feat * N_HIST + bins, self._one.expand(len(bins)))
        self.n_tokens += b * p
        self.n_images += b
        patches: Tensor | Fired | None = None
        if self.topk.patches_skp is not None:
            if SPARSE_PATCHES:
                patches = Fired(key, tok - img * p, vals, b, s)
            else:
                patches = codes_bps.dense() if isinstance(codes_bps, TopKCodes) else codes_bps
        self.topk.update(scores_bs, ids_b, patches, src_b)
        return scores_bs

    def _firing(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Flat indices and values of the codes > 0. On CPU with numpy, over a reused mask, a block of FIRING_BLOCK
        codes at a time: the block is still in cache when its values are gathered (one gather over the whole
        chunk misses the cache at every firing code), and numpy's nonzero is several times faster than torch's."""
        if flat.device.type != "cpu":
            idx = (flat > 0).nonzero().squeeze(1)
            return idx, flat[idx]
        if self._mask is None or self._mask.size < flat.numel():
            self._mask = np.empty(flat.numel(), dtype=bool)
        codes, idx_parts, val_parts = flat.numpy(), [], []
        for lo in range(0, max(len(codes), 1), FIRING_BLOCK):  # one (empty) block for an empty chunk
            block = codes[lo : lo + FIRING_BLOCK]
            mask = self._mask[lo : lo + len(block)]
            np.greater(block, 0, out=mask)
            i = np.flatnonzero(mask)
            val_parts.append(block[i])
            i += lo
            idx_parts.append(i)
        return torch.from_numpy(np.concatenate(idx_parts)), torch.from_numpy(np.concatenate(val_parts))

    def stats(self) -> FeatureStats:
        if self._counts is not None:
            self._counts.flush_into(self.hist_sb)
        hist_sb = self.hist_sb.view(self.s, N_HIST)
        return FeatureStats(
            self.n_tokens, self.n_images, hist_sb.sum(1), self.img_fired, self.sum,
            self.img_score_sum, self.max, hist_sb,
        )

    def image_features(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per image its top-n features by score, positive ones only: (image_id, rank, feature, value)."""
        if not self.image_top:
            z = torch.zeros(0)
            return z.long(), z.int(), z.int(), z.float()
        ids = torch.cat([t[0] for t in self.image_top])
        feats = torch.cat([t[1] for t in self.image_top])
        vals = torch.cat([t[2] for t in self.image_top])
        rank = torch.arange(feats.shape[1], dtype=torch.int32, device=feats.device).expand_as(feats)
        keep = vals > 0
        return ids[:, None].expand_as(feats)[keep], rank[keep], feats[keep], vals[keep]
