"""Property tests of the streaming scan: merged top-k equals torch.topk over everything at once, and the
per-feature statistics equal the brute-force ones."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saevctl.mine.scan import FeatureScanner, StreamingTopK
from saevctl.mine.schema import HIST_LO, HIST_STEP, N_HIST, hist_edges


@st.composite
def code_streams(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], int]:
    """Sparse non-negative codes (n images, p patches, s features) cut into random chunk sizes, and k."""
    n = draw(st.integers(1, 40))
    p = draw(st.integers(1, 6))
    s = draw(st.integers(1, 12))
    k = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand((n, p, s), generator=g) * 10 ** torch.empty((n, p, s)).uniform_(-5, 5, generator=g)
    codes = torch.where(torch.rand((n, p, s), generator=g) < draw(st.floats(0.05, 1.0)), dense, torch.zeros(()))
    cuts, left = [], n
    while left:
        c = draw(st.integers(1, left))
        cuts.append(c)
        left -= c
    return codes, cuts, k


def _feed(codes: torch.Tensor, cuts: list[int], k: int, by: str = "max", keep: bool = True, cap: int | None = None,
          src_n: torch.Tensor | None = None) -> FeatureScanner:
    n, p, s = codes.shape
    sc = FeatureScanner(s, k, p, by, top_n=3, keep_patches=keep, max_per_source=cap)
    ids = torch.arange(100, 100 + n)  # ids differ from row numbers on purpose
    lo = 0
    for c in cuts:
        sc.update(codes[lo : lo + c], ids[lo : lo + c], None if src_n is None else src_n[lo : lo + c])
        lo += c
    return sc


@contextlib.contextmanager
def _switched(**values: object) -> Iterator[None]:
    """saevctl.mine.scan's switches set for the block, restored after it."""
    import saevctl.mine.scan as scan

    old = {name: getattr(scan, name) for name in values}
    for name, v in values.items():
        setattr(scan, name, v)
    try:
        yield
    finally:
        for name, v in old.items():
            setattr(scan, name, v)


@settings(max_examples=60, deadline=None)
@given(code_streams(), st.sampled_from(["max", "mean"]))
def test_streaming_topk_equals_topk_of_concatenation(stream: tuple[torch.Tensor, list[int], int], by: str) -> None:
    codes, cuts, k = stream
    n, p, s = codes.shape
    sc = _feed(codes, cuts, k, by)
    scores_ns = codes.amax(1) if by == "max" else codes.sum(1) / p
    want_vals, _ = scores_ns.topk(min(k, n), dim=0)
    vals, ids, slots = sc.topk.ranked()
    # Values match exactly; with ties either row may be kept, so check each kept id really has that value.
    # max is exact; a mean's float32 sum may differ in the last bit with the summation order.
    tol = {"rtol": 0, "atol": 0} if by == "max" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(vals[: min(k, n)], want_vals.float(), **tol)
    assert torch.isinf(vals[min(k, n) :]).all() and (ids[min(k, n) :] == -1).all()
    rows = ids[: min(k, n)] - 100
    torch.testing.assert_close(scores_ns.gather(0, rows).float(), vals[: min(k, n)], **tol)
    assert all(len(set(rows[:, f].tolist())) == rows.shape[0] for f in range(s)), "an image kept twice"
    # Each exemplar's per-patch codes are that image's codes for that feature (stored as float16).
    for f in range(s):
        for r in range(rows.shape[0]):
            want = codes[rows[r, f], :, f].to(torch.float16)
            assert torch.equal(sc.topk.patches_skp[f, slots[r, f]], want)


@settings(max_examples=40, deadline=None)
@given(code_streams())
def test_feature_stats_equal_brute_force(stream: tuple[torch.Tensor, list[int], int]) -> None:
    codes, cuts, k = stream
    _n, _p, s = codes.shape
    st_ = _feed(codes, cuts, k).stats()
    flat = codes.reshape(-1, s)
    assert torch.equal(st_.n_fired, (flat > 0).sum(0))
    assert torch.equal(st_.img_fired, (codes.amax(1) > 0).sum(0))
    torch.testing.assert_close(st_.max, flat.amax(0))
    torch.testing.assert_close(st_.sum, flat.double().sum(0), rtol=1e-5, atol=1e-6)  # per-image sums are float32
    torch.testing.assert_close(st_.freq, (flat > 0).double().mean(0))
    # Every firing value lands in the bin whose edges hold it.
    edges = hist_edges()
    for f in range(s):
        vals = flat[:, f][flat[:, f] > 0].double()
        want = torch.zeros(N_HIST, dtype=torch.int64)
        for v in vals.tolist():
            b = next(i for i, (lo, hi) in enumerate(edges) if lo <= v < hi or (i == 0 and v < hi))
            want[b] += 1
        # float32 log10 can put a value within 1 ulp of an edge in the neighbouring bin
        diff = (st_.hist_sb[f] - want).abs().sum().item()
        assert diff <= 2 * sum(1 for v in vals.tolist() if _near_edge(v)), (f, st_.hist_sb[f], want)


def _near_edge(v: float) -> bool:
    x = (math.log10(v) - HIST_LO) / HIST_STEP
    return abs(x - round(x)) < 1e-4


@settings(max_examples=30, deadline=None)
@given(code_streams())
def test_image_features_are_each_images_top_features(stream: tuple[torch.Tensor, list[int], int]) -> None:
    codes, cuts, k = stream
    n, _p, s = codes.shape
    ids, rank, feat, val = _feed(codes, cuts, k).image_features()
    scores = codes.amax(1)
    for i in range(n):
        sel = ids == 100 + i
        want = scores[i].topk(min(3, s)).values
        want = want[want > 0]
        torch.testing.assert_close(val[sel], want)
        assert torch.equal(rank[sel], torch.arange(len(want), dtype=torch.int32))
        torch.testing.assert_close(scores[i, feat[sel].long()], want)


def test_streaming_topk_merges_in_blocks_of_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many features (more than one merge block) give the same answer as one block."""
    import saevctl.mine.scan as scan

    g = torch.Generator().manual_seed(0)
    scores = torch.rand((50, 300), generator=g)
    ids = torch.arange(50)
    one = StreamingTopK(300, 5)
    for lo in range(0, 50, 7):
        one.update(scores[lo : lo + 7], ids[lo : lo + 7])
    monkeypatch.setattr(scan, "MERGE_BLOCK", 16)
    many = StreamingTopK(300, 5)
    for lo in range(0, 50, 7):
        many.update(scores[lo : lo + 7], ids[lo : lo + 7])
    assert torch.equal(one.vals_ks, many.vals_ks) and torch.equal(one.ids_ks, many.ids_ks)
    assert torch.equal(one.ranked()[0], scores.topk(5, dim=0).values)


def _greedy_capped(scores_ns: torch.Tensor, src_n: torch.Tensor, k: int, cap: int) -> list[set[int]]:
    """Per feature, the rows of the best top-k with at most `cap` rows per source, positive scores only (the
    brute-force greedy over all rows at once)."""
    out = []
    for f in range(scores_ns.shape[1]):
        kept: list[int] = []
        per: dict[int, int] = {}
        for r in scores_ns[:, f].argsort(descending=True).tolist():
            if len(kept) == k or scores_ns[r, f] <= 0:
                break
            if per.get(int(src_n[r]), 0) < cap:
                per[int(src_n[r])] = per.get(int(src_n[r]), 0) + 1
                kept.append(r)
        out.append(set(kept))
    return out


@settings(max_examples=60, deadline=None)
@given(code_streams(), st.integers(1, 4), st.integers(1, 5))
def test_capped_streaming_topk_equals_greedy_over_everything(
    stream: tuple[torch.Tensor, list[int], int], cap: int, n_sources: int
) -> None:
    """With max_per_source, merging chunk by chunk keeps exactly the rows the one-pass greedy keeps (at most `cap`
    per source), with each kept row's per-patch codes; a cap >= k changes nothing."""
    codes, cuts, k = stream
    n, p, s = codes.shape
    src_n = torch.arange(n) * 7 % n_sources  # sources interleaved across chunks
    sc = FeatureScanner(s, k, p, "max", top_n=3, keep_patches=True, max_per_source=cap)
    ids = torch.arange(100, 100 + n)
    lo = 0
    for c in cuts:
        sc.update(codes[lo : lo + c], ids[lo : lo + c], src_n[lo : lo + c])
        lo += c
    vals, got_ids, slots = sc.topk.ranked()
    want = _greedy_capped(codes.amax(1), src_n, k, cap)
    for f in range(s):
        keep = vals[:, f] > 0
        rows = (got_ids[keep, f] - 100).tolist()
        assert set(rows) == want[f], (f, rows, want[f])
        assert all(torch.equal(sc.topk.patches_skp[f, sl], codes[r, :, f].to(torch.float16))
                   for r, sl in zip(rows, slots[keep, f].tolist(), strict=True))
        assert (got_ids[~keep & torch.isinf(vals[:, f]), f] == -1).all()
    if cap >= k:
        assert sc.topk.src_ks is None  # the uncapped path


def test_within_cap_packed_key_equals_two_stable_sorts() -> None:
    """The packed-key sort (sources that fit its bits) and the fallback (too many sources) agree, ties and
    empty slots included."""
    from saevctl.mine.scan import within_cap

    g = torch.Generator().manual_seed(0)
    vals = torch.rand((40, 300), generator=g).round(decimals=1)  # many ties
    vals[torch.rand((40, 300), generator=g) < 0.2] = -math.inf
    src = torch.randint(-1, 6, (40, 300), generator=g)
    for cap in (1, 2, 5):
        packed = within_cap(vals, src, cap, n_sources=6)
        assert torch.equal(packed, within_cap(vals, src, cap, n_sources=1 << 40))
        # Per column and source, `cap` rows are kept (all when fewer), and none worse than a dropped one.
        for f in range(0, 300, 37):
            for sv in src[:, f].unique().tolist():
                rows = (src[:, f] == sv).nonzero().squeeze(1)
                kept = rows[packed[rows, f]]
                assert len(kept) == min(cap, len(rows))
                dropped = rows[~packed[rows, f]]
                if len(dropped):
                    assert vals[kept, f].min() >= vals[dropped, f].max()


def test_hist_edges_cover_all_positive_values() -> None:
    edges = np.array(hist_edges())
    assert len(edges) == N_HIST and edges[0, 0] == 0 and math.isinf(edges[-1, 1])
    assert np.all(edges[1:, 0] == edges[:-1, 1])


@pytest.mark.parametrize("activation,k", [("relu", 0), ("topk", 3), ("batchtopk", 3)])
def test_fused_encoder_equals_sae_encode(activation: str, k: int) -> None:
    from saevctl.mine import encode as fast
    from saevctl.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=16, n_latents=40, activation=activation, k=k))
    x = torch.randn(64, 16) * 3 + 1
    sae.set_normalization(x)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        sae.threshold.fill_(0.3)
    want = sae.encode(x)
    got = fast.make_encoder(sae)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got > 0).sum() > 0


@pytest.mark.parametrize("activation,k", [("relu", 0), ("topk", 3), ("batchtopk", 3)])
def test_bf16_encoder_rounds_only_the_gemm(activation: str, k: int) -> None:
    """mine --compute bfloat16: the codes are the float32 encoder's up to bfloat16 rounding of the GEMM's operands
    and output, even on activations whose mean dwarfs their spread (a residual stream's), where rounding x before
    removing the mean would leave its error in every code. The out= and sparse forms agree with the plain one."""
    from saevctl.mine import encode as fast
    from saevctl.mine.scan import TopKCodes
    from saevctl.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d=64, n_latents=256, activation=activation, k=k))
    x = torch.randn(96, 64) * 0.05 + torch.randn(64) * 40  # mean 800x the spread
    sae.set_normalization(x)
    with torch.no_grad():
        sae.b_dec.normal_(std=0.1)
        sae.threshold.fill_(0.05)
    want = fast.make_encoder(sae)(x)
    enc = fast.make_encoder(sae, compute="bfloat16")
    got = enc(x)
    assert got.dtype == torch.float32
    both = (want > 0) & (got > 0)
    assert both.sum() >= 0.95 * (want > 0).sum() > 0
    torch.testing.assert_close(got[both], want[both], rtol=0.03, atol=0.02)
    buf = torch.full((96, 256), float("nan"))
    torch.testing.assert_close(enc(x, out=buf), got, rtol=0, atol=0)
    if activation == "topk":
        sparse = fast.make_encoder(sae, sparse_topk=True, compute="bfloat16")(x, out=buf)
        assert isinstance(sparse, TopKCodes)
        dense = torch.zeros(96, 256).scatter_(1, sparse.idx_tk, sparse.vals_tk)
        torch.testing.assert_close(dense, got, rtol=0, atol=0)
    if activation != "topk":  # the scanner's form: a ReLU SAE's pre-activations left in bfloat16, in `out`
        for_scan = fast.make_encoder(sae, positive_only=True, compute="bfloat16")(x, out=buf)
        assert for_scan.data_ptr() == buf.data_ptr()
        assert for_scan.dtype == (torch.bfloat16 if activation == "relu" else torch.float32)
        torch.testing.assert_close(for_scan.float().clamp_min(0), got, rtol=0, atol=0)
    fig = fast.agreement(sae, x)
    assert fig["compute"] == "bfloat16" and 0.95 <= fig["firing_kept"] <= 1
    assert fig["rel_error_shared"] < 0.02 and fig["rel_error_shared"] <= fig["rel_error_vs_float32"]


@settings(max_examples=40, deadline=None)
@given(code_streams(), st.sampled_from([None, 2]), st.sampled_from([1, 5, 1 << 18]), st.booleans(),
       st.sampled_from(["max", "mean"]), st.booleans())
def test_fast_paths_equal_their_references(stream: tuple[torch.Tensor, list[int], int], cap: int | None,
                                           block: int, compiled: bool, by: str, keep: bool) -> None:
    """Entering rows' per-patch codes from the firing list (SPARSE_PATCHES) equal those read from the dense chunk,
    and the blocked firing pass finds the same codes whatever its block size, with the compiled kernel
    (saevctl.mine.scan_cpu) or torch placing them: every scanner output is equal."""
    codes, cuts, k = stream
    src_n = torch.arange(len(codes)) % 3
    with _switched(SPARSE_PATCHES=False, FIRING_BLOCK=1 << 18, COMPILED=False):
        ref = _feed(codes, cuts, k, by, keep, cap, src_n)
    with _switched(SPARSE_PATCHES=True, FIRING_BLOCK=block, COMPILED=compiled):
        fast = _feed(codes, cuts, k, by, keep, cap, src_n)
    _assert_same_scanner(ref, fast, exact=not compiled)


def test_exemplar_blocks_columns_equal_the_plain_forms() -> None:
    """The exemplars' n_fired (float16 > 0 on bit patterns) and per-patch BLOBs (a fixed-size view) equal the plain
    `> 0` and per-row `tobytes`; every float16 bit pattern is checked."""
    from saevctl.mine.pipeline import exemplar_blocks, positive_f16

    every_f16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(positive_f16(every_f16), every_f16 > 0)
    g = torch.Generator().manual_seed(0)
    codes = torch.where(torch.rand((30, 6, 9), generator=g) < 0.3, torch.rand((30, 6, 9), generator=g), 0.0)
    sc = FeatureScanner(9, 4, 6, "max", top_n=3, keep_patches=True)
    sc.update(codes, torch.arange(30))
    (cols,) = exemplar_blocks(sc)
    acts = codes[cols["image_id"], :, cols["feature"]].half().numpy()
    assert cols["acts"].dtype == object and [bytes(b) for b in cols["acts"]] == [r.tobytes() for r in acts]
    assert np.array_equal(cols["n_fired"], (acts > 0).sum(1).astype(np.int16)) and cols["n_fired"].dtype == np.int16


@settings(max_examples=40, deadline=None)
@given(code_streams(), st.integers(1, 4))
def test_topk_codes_feed_the_scanner_as_their_dense_form(stream: tuple[torch.Tensor, list[int], int],
                                                         k_code: int) -> None:
    """A TopK encoder's unscattered codes (TopKCodes: per token k values, some <= 0, and their features) give the same
    scanner as the dense codes they stand for."""
    from saevctl.mine.scan import TopKCodes

    codes, cuts, k = stream
    n, p, s = codes.shape
    g = torch.Generator().manual_seed(n * 100 + s)
    pre = torch.randn((n * p, s), generator=g)
    vals, idx = pre.topk(min(k_code, s), dim=1)
    vals = vals.relu()
    dense = torch.zeros_like(pre).scatter_(1, idx, vals).view(n, p, s)
    ref = FeatureScanner(s, k, p, "max", top_n=3, keep_patches=True)
    fast = FeatureScanner(s, k, p, "max", top_n=3, keep_patches=True)
    lo = 0
    for c in cuts:
        rows = slice(lo * p, (lo + c) * p)
        ref.update(dense[lo : lo + c], torch.arange(lo, lo + c))
        fast.update(TopKCodes(vals[rows], idx[rows], (c, p, s)), torch.arange(lo, lo + c))
        lo += c
    assert torch.equal(TopKCodes(vals, idx, (n, p, s)).dense(), dense)
    _assert_same_scanner(ref, fast)


def _assert_same_scanner(ref: FeatureScanner, fast: FeatureScanner, exact: bool = True) -> None:
    """Every output of two scanners is equal: top-k values, ids and per-patch codes, statistics, image features.
    Not `exact`: slot by slot only up to the order of slots and, among equal values, which row was kept (the
    compiled scan against torch.topk's merge), and the float64 sums up to their summation order."""
    if exact:
        pairs = [(ref.topk.vals_ks, fast.topk.vals_ks), (ref.topk.ids_ks, fast.topk.ids_ks)]
        if ref.topk.patches_skp is not None or fast.topk.patches_skp is not None:
            pairs.append((ref.topk.patches_skp, fast.topk.patches_skp))
    else:
        (rv, ri, rs), (fv, fi, fs) = ref.topk.ranked(), fast.topk.ranked()
        pairs = [(rv, fv)]
        for f in range(rv.shape[1]):
            ranks = [r for r in range(len(rv)) if rv[r, f] > 0 and int((rv[:, f] == rv[r, f]).sum()) == 1]
            for r in ranks:  # a positive value no other slot shares: the same image, with the same codes
                assert ri[r, f] == fi[r, f], (f, r)
                rp, fp = ref.topk.patches_skp, fast.topk.patches_skp
                assert (rp is None) == (fp is None)
                if rp is not None and fp is not None:
                    assert torch.equal(rp[f, rs[r, f]], fp[f, fs[r, f]])
    pairs += list(zip(ref.image_features(), fast.image_features(), strict=True))
    for a, b in pairs:
        assert torch.equal(a, b)
    for name in ("n_fired", "img_fired", "sum", "img_score_sum", "max", "hist_sb"):
        x, y = getattr(ref.stats(), name), getattr(fast.stats(), name)
        if exact or x.dtype != torch.float64:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=0, msg=name)


@settings(max_examples=30, deadline=None)
@given(code_streams(), st.booleans(), st.booleans())
def test_negative_codes_count_as_zero(stream: tuple[torch.Tensor, list[int], int], compiled: bool,
                                      capped: bool) -> None:
    """The scanner reads only codes > 0, so a ReLU SAE's chunk can be scanned as its pre-activations (mining skips
    the ReLU pass): negative values where the codes are 0 give the very same scanner, on both paths."""
    codes, cuts, k = stream
    n, _p, s = codes.shape
    g = torch.Generator().manual_seed(n * 7 + s)
    pre = torch.where(codes > 0, codes, -torch.rand(codes.shape, generator=g) * 3)
    src_n, cap = torch.arange(n) % 2, 1 if capped else None
    with _switched(COMPILED=compiled):
        _assert_same_scanner(_feed(codes, cuts, k, cap=cap, src_n=src_n), _feed(pre, cuts, k, cap=cap, src_n=src_n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_scan_reads_whole_64_code_blocks(dtype: torch.dtype) -> None:
    """The compiled scan reads dense codes by 64-bit masks of 64-code blocks, and of the shorter block at the end
    of each thread's features (code_streams' widths have only the latter): at 389 features, with firing codes at
    every bit position, it equals the torch reference (float32), and bfloat16 codes give what their float32 values
    give (the same path: bfloat16's many tied scores may keep other images than torch's merge)."""
    g = torch.Generator().manual_seed(3)
    n, p, s = 9, 7, 389
    pre = torch.randn((n, p, s), generator=g) - 1.2
    pre[0, 0, :] = torch.rand(s, generator=g) + 0.5  # every feature fires: every bit of every block set once
    pre = pre.to(dtype)
    with _switched(COMPILED=dtype == torch.bfloat16):
        want = _feed(pre.float(), [4, 5], 3)
    with _switched(COMPILED=True):
        assert FeatureScanner(s, 3, p, "max", 3, keep_patches=True)._compiled(pre, torch.arange(n), None)
        _assert_same_scanner(want, _feed(pre, [4, 5], 3), exact=dtype == torch.bfloat16)


@settings(max_examples=30, deadline=None)
@given(code_streams(), st.booleans(), st.booleans())
def test_bf16_codes_scan_as_their_float32_values(stream: tuple[torch.Tensor, list[int], int], compiled: bool,
                                                 capped: bool) -> None:
    """mine --compute bfloat16 hands a dense SAE's pre-activations to the scanner in bfloat16 (the compiled scan
    reads their bits): the very scanner their float32 values give, on both paths."""
    codes, cuts, k = stream
    n, p, s = codes.shape
    g = torch.Generator().manual_seed(n * 5 + s)
    pre = torch.where(codes > 0, codes, -torch.rand(codes.shape, generator=g)).to(torch.bfloat16)
    src_n, cap = torch.arange(n) % 2, 1 if capped else None
    with _switched(COMPILED=compiled):
        assert FeatureScanner(s, k, p, "max", 3, keep_patches=True)._compiled(pre, torch.arange(n), None) == compiled
        want = _feed(pre.float(), cuts, k, cap=cap, src_n=src_n)
        _assert_same_scanner(want, _feed(pre, cuts, k, cap=cap, src_n=src_n))


@pytest.mark.parametrize("chunk", [3, 20])
def test_compiled_histogram_counts_never_overflow(chunk: int) -> None:
    """The compiled scan counts the histogram in 16 bits and adds the counts into the int64 table every 65535 // p
    images: with 8,192 tokens an image all in one bin (8,192 a count per image, 65,535 after 8), 20 images in
    chunks of 3 or 20 give the exact counts, as the torch path does."""
    b, p, s = 20, 8192, 3
    g = torch.Generator().manual_seed(0)
    codes = torch.ones(b, p, s)
    codes[:, :, 1] = torch.rand(b, p, generator=g)  # and one feature spread over bins
    cuts = [min(chunk, b - lo) for lo in range(0, b, chunk)]
    with _switched(COMPILED=False):
        ref = _feed(codes, cuts, 4, keep=False)
    fast = _feed(codes, cuts, 4, keep=False)
    hist = fast.stats().hist_sb
    assert int(hist[0].sum()) == b * p and int(hist[0].max()) == b * p  # every code of feature 0 in one bin
    assert torch.equal(hist, ref.stats().hist_sb)
    assert torch.equal(fast.stats().hist_sb, hist)  # reading the table twice adds nothing twice
