"""Tests of eval_hash.py: every metric against a slow per-query computation written here,
hand-worked examples, sklearn's average precision, the plots and the --run command."""
import json
import os
import subprocess
import sys
from fractions import Fraction as F

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval_hash as E  # noqa: E402
import figures  # noqa: E402
from conftest import needs_numba  # noqa: E402


# -----------------------------------------------------------------------------
# slow references: one query at a time, a stable argsort of the whole retrieval set
def slow_rankings(qb, rb):
    """Per query: (order of the retrieval set by (Hamming distance, index), distances)."""
    L = qb.shape[1]
    out = []
    for q in qb.astype(np.int64):
        d = (L - rb.astype(np.int64) @ q) // 2
        out.append((np.argsort(d, kind='stable'), d))
    return out


def slow_rel(ql, rl):
    return [(rl.astype(np.int64) @ q) > 0 for q in ql.astype(np.int64)]


def slow_ap(rel_ranked, K):
    r = rel_ranked[:K]
    hits, total = 0, 0.0
    for k, x in enumerate(r, start=1):
        if x:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


def slow_map(qb, rb, ql, rl, K):
    return float(np.mean([slow_ap(rel[o], K) for (o, _), rel in zip(slow_rankings(qb, rb), slow_rel(ql, rl))]))


def slow_map_continuous(qh, rh, ql, rl, K):
    aps = []
    for q, rel in zip(qh.astype(np.float64), slow_rel(ql, rl)):
        o = np.argsort(-(rh.astype(np.float64) @ q), kind='stable')
        aps.append(slow_ap(rel[o], K))
    return float(np.mean(aps))


def slow_p_r_at(qb, rb, ql, rl, ns):
    P, R = [], []
    for (o, _), rel in zip(slow_rankings(qb, rb), slow_rel(ql, rl)):
        P.append([rel[o][:min(N, len(rb))].sum() / min(N, len(rb)) for N in ns])
        if rel.sum():  # no relevant item: recall undefined, left out
            R.append([rel[o][:min(N, len(rb))].sum() / rel.sum() for N in ns])
    return np.mean(P, 0), (np.mean(R, 0) if R else np.zeros(len(ns)))


def slow_radius(qb, rb, ql, rl):
    L = qb.shape[1]
    P, R = [], []
    for (_, d), rel in zip(slow_rankings(qb, rb), slow_rel(ql, rl)):
        p, r = [], []
        for rad in range(L + 1):
            inside = d <= rad
            p.append(rel[inside].sum() / inside.sum() if inside.sum() else 0.0)  # empty ball: 0
            r.append(rel[inside].sum() / rel.sum() if rel.sum() else np.nan)
        P.append(p)
        if rel.sum():
            R.append(r)
    return np.mean(P, 0), (np.mean(R, 0) if R else np.zeros(L + 1))


# -----------------------------------------------------------------------------
# data with many ties: few prototype codes, few flipped bits
def tied_codes(rng, nq, n, L, protos=4, flip=0.05):
    p = rng.choice([-1, 1], size=(protos, L))
    make = lambda m: p[rng.integers(0, protos, m)] * np.where(rng.random((m, L)) < flip, -1, 1)
    return make(nq).astype(np.int8), make(n).astype(np.int8)


def labels(rng, nq, n, C, multi):
    if multi:  # density about 2 labels per image, some images (and queries) with none
        ql = (rng.random((nq, C)) < 2.0 / C).astype(np.int8)
        rl = (rng.random((n, C)) < 2.0 / C).astype(np.int8)
        return ql, rl
    ql = np.eye(C, dtype=np.int8)[rng.integers(0, C, nq)]
    rl = np.eye(C, dtype=np.int8)[rng.integers(0, C - 1, n)]  # class C-1 absent: queries without relevant
    return ql, rl


CASES = [  # (bits, classes, multi-label)
    (8, 10, False), (16, 24, True), (32, 5, False), (64, 80, True), (80, 70, True)]


@pytest.mark.parametrize('L,C,multi', CASES)
@pytest.mark.usefixtures('kernel')
def test_metrics_match_slow_loop(L, C, multi):
    rng = np.random.default_rng(L * 7 + C)
    nq, n = 30, 400
    qb, rb = tied_codes(rng, nq, n, L)
    ql, rl = labels(rng, nq, n, C, multi)
    ql[0] = 0 if multi else np.eye(C, dtype=np.int8)[C - 1]  # a query without relevant items
    assert any(not r.any() for r in slow_rel(ql, rl))
    # ranking itself (estimate path k < n/4, full path, k = n, k > n), chunk sizes
    ref = slow_rankings(qb, rb)
    for k in (1, 37, 99, 150, n, n + 50):
        for chunk in (None, 1, 7):
            idx, dist = E.hamming_rank_topk(qb, rb, k, chunk=chunk)
            kk = min(k, n)
            assert idx.shape == (nq, kk) and idx.dtype == np.int64
            assert (idx == np.stack([o[:kk] for o, _ in ref])).all()
            assert (dist == np.stack([d[o[:kk]] for o, d in ref])).all()
    for K in (10, 99, 150, n, n + 100):
        assert abs(E.mean_average_precision(qb, rb, ql, rl, K) - slow_map(qb, rb, ql, rl, K)) < 1e-12
    ns = [1, 5, 50, 120, n, n + 10]
    got = E.precision_recall_at(qb, rb, ql, rl, ns)
    P, R = slow_p_r_at(qb, rb, ql, rl, ns)
    assert got['n'] == [1, 5, 50, 120, n, n]
    np.testing.assert_allclose(got['precision'], P, atol=1e-12)
    np.testing.assert_allclose(got['recall'], R, atol=1e-12)
    assert got['queries_without_relevant'] == sum(not r.any() for r in slow_rel(ql, rl))
    curve = E.pr_curve_radius(qb, rb, ql, rl)
    P, R = slow_radius(qb, rb, ql, rl)
    assert curve['radius'] == list(range(L + 1))
    np.testing.assert_allclose(curve['precision'], P, atol=1e-12)
    np.testing.assert_allclose(curve['recall'], R, atol=1e-12)
    for rad in (0, 2, 5):
        assert abs(E.precision_radius(qb, rb, ql, rl, rad) - P[min(rad, L)]) < 1e-12


@pytest.mark.parametrize('multi', [False, True])
def test_map_continuous_matches_slow_loop_with_ties(multi):
    rng = np.random.default_rng(3 + multi)
    nq, n, L = 25, 300, 6
    # dyadic values: every inner product is exact in float64, so ties are exact and many
    qh = rng.choice([-1, -0.5, 0, 0.5, 1], size=(nq, L))
    rh = rng.choice([-1, -0.5, 0, 0.5, 1], size=(8, L))[rng.integers(0, 8, n)]
    ql, rl = labels(rng, nq, n, 12, multi)
    for K in (5, 60, 74, 76, 200, n, n + 1):
        assert abs(E.map_continuous(qh, rh, ql, rl, K) - slow_map_continuous(qh, rh, ql, rl, K)) < 1e-12


def test_topk_rows_fallback_when_sample_misleads():
    # every SUBSAMPLE-th column is 0, the rest 1..9: the sample's threshold (0) covers fewer
    # than k items, so the exact per-row fallback must run
    rng = np.random.default_rng(0)
    c, n, k = 5, 800, 100
    for dtype in (np.uint8, np.float64):
        D = rng.integers(1, 10, size=(c, n)).astype(dtype)
        D[:, ::E.SUBSAMPLE] = 0
        idx, val = E._topk_rows(D, k)
        ref = np.argsort(D, axis=1, kind='stable')[:, :k]
        assert (idx == ref).all() and (val == np.take_along_axis(D, ref, 1)).all()


@pytest.mark.parametrize('L,C,multi', CASES + [(300, 6, False)])
@pytest.mark.usefixtures('kernel')
def test_fast_path_equals_reference(L, C, multi):
    # the counting path (k < n / 4), the sort path (k >= n / 4), short lists (k = 1), k = n and k > n, one
    # query per chunk and several: the same lists as the 20-line reference, and the same MAP to the last bit
    rng = np.random.default_rng(L + C)
    nq, n = 24, 1500
    qb, rb = tied_codes(rng, nq, n, L, protos=3)
    ql, rl = labels(rng, nq, n, C, multi)
    for k in (1, 2, 40, 200, 374, 375, n, n + 7):
        want = E.hamming_rank_reference(qb, rb, k)
        for chunk in (None, 1, 5):
            got = E.hamming_rank_topk(qb, rb, k, chunk=chunk)
            assert (got[0] == want[0]).all() and (got[1] == want[1]).all(), (k, chunk)
            assert got[0].dtype == np.int64 and got[1].dtype == np.int32
        assert E.mean_average_precision(qb, rb, ql, rl, k) == E.mean_average_precision_reference(qb, rb, ql, rl, k)
    assert abs(E.mean_average_precision_reference(qb, rb, ql, rl, 200) - slow_map(qb, rb, ql, rl, 200)) < 1e-12
    packed = E.hamming_rank_packed(E.pack(qb), E.pack(rb), 40)
    assert L % 8 or (packed[0] == E.hamming_rank_reference(qb, rb, 40)[0]).all()


@pytest.mark.usefixtures('kernel')
def test_counting_path_when_the_sample_misleads():
    # every SUBSAMPLE-th item is the query itself (distance 0), every other item is far: the sample sees
    # only distance 0, which holds fewer than k items, so the rows go again at their exact k-th distance
    rng = np.random.default_rng(7)
    L, n, k = 64, 3200, 150
    qb = rng.choice([-1, 1], size=(3, L)).astype(np.int8)
    rb = np.repeat(-qb[:1], n, 0) * np.where(rng.random((n, L)) < 0.2, -1, 1)
    rb[::E.SUBSAMPLE] = qb[0]
    assert k < n // 4 and n // E.SUBSAMPLE < k
    got, want = E.hamming_rank_topk(qb, rb, k), E.hamming_rank_reference(qb, rb, k)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_counting_keys_wider_than_32_bits():
    # 4096 rows of 2049 distances up to 1000: row, distance and column take 12 + 10 + 12 bits, so the keys
    # are 64-bit; the top k still equals a stable argsort of each row
    rng = np.random.default_rng(8)
    c, n, L, k = 4096, 2049, 1000, 100
    D = np.full((c, -(-n // 8) * 8), L + 1, np.uint16)
    D[:, :n] = rng.integers(0, 40, (c, n))
    top, cb, db = E._hamming_topk(D, k, L, n, np.empty(D.shape, bool))
    assert top.dtype == np.uint64
    want = np.argsort(D[:, :n], axis=1, kind='stable')[:, :k]
    assert ((top & ((1 << cb) - 1)).astype(np.int64) == want).all()
    assert ((top >> cb) & ((1 << db) - 1) == np.take_along_axis(D[:, :n], want, 1)).all()


@pytest.mark.usefixtures('kernel')
def test_ranking_when_the_sample_guesses_too_high():
    # every SUBSAMPLE-th item is the query's opposite (distance L), every other item near it: the threshold guessed
    # from the sample overshoots, so the counting starts again (the compiled path: from a full histogram)
    rng = np.random.default_rng(11)
    L, n, k = 64, 3200, 150
    qb = rng.choice([-1, 1], size=(3, L)).astype(np.int8)
    rb = np.repeat(qb[:1], n, 0) * np.where(rng.random((n, L)) < 0.03, -1, 1)
    rb[::E.SUBSAMPLE] = -qb[0]
    got, want = E.hamming_rank_topk(qb, rb, k), E.hamming_rank_reference(qb, rb, k)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


@needs_numba
@pytest.mark.parametrize('L,C', [(8, 3), (16, 150), (64, 80), (300, 6)])
def test_compiled_path_equals_numpy_path_and_reference(L, C, monkeypatch):
    # hamming.py's kernels (forced on small sets) against the numpy path and the 20-line reference: ties, K = 1,
    # K = n, K > n, a retrieval set that is no multiple of 64, 8- to 300-bit codes (300: distances held in 16 bits),
    # one, two and three words of labels, multi-label; ranking, MAP, precision/recall@N, the radius curves, to the bit
    rng = np.random.default_rng(L + C)
    nq, n = 20, 701
    qb, rb = tied_codes(rng, nq, n, L, protos=3)
    ql, rl = labels(rng, nq, n, C, True)
    ks, ns = (1, 2, 63, 64, 65, 175, 176, n, n + 9), [1, 3, 64, 65, 500, n, n + 5]

    def every_metric(kernel):
        monkeypatch.setattr(E, 'KERNEL', kernel)
        return ([E.hamming_rank_topk(qb, rb, k) for k in ks], [E.mean_average_precision(qb, rb, ql, rl, k) for k in ks],
                E.precision_recall_at(qb, rb, ql, rl, ns), E.pr_curve_radius(qb, rb, ql, rl))
    compiled, numpy_path = every_metric('numba'), every_metric('numpy')
    for k, (ci, cd), (ni, nd) in zip(ks, compiled[0], numpy_path[0]):
        ri, rd = E.hamming_rank_reference(qb, rb, k)
        assert (ci == ni).all() and (ci == ri).all() and (cd == nd).all() and (cd == rd).all(), k
        assert ci.dtype == np.int64 and cd.dtype == np.int32
    assert compiled[1] == numpy_path[1] == [E.mean_average_precision_reference(qb, rb, ql, rl, k) for k in ks]
    assert compiled[2] == numpy_path[2] and compiled[3] == numpy_path[3]


@needs_numba
def test_compiled_rank_on_many_shapes(monkeypatch):
    # 4- to 12-bit codes (a few distances, long ties), 1 to 400 items, k from 1 to n: the reference's lists
    monkeypatch.setattr(E, 'KERNEL', 'numba')
    rng = np.random.default_rng(13)
    for _ in range(40):
        L, n = int(rng.choice([4, 8, 12])), int(rng.integers(1, 400))
        qb, rb = rng.choice([-1, 1], (3, L)), rng.choice([-1, 1], (n, L))
        for k in {1, int(rng.integers(1, n + 1)), n}:
            got, want = E.hamming_rank_topk(qb, rb, k), E.hamming_rank_reference(qb, rb, k)
            assert (got[0] == want[0]).all() and (got[1] == want[1]).all(), (L, n, k)


@needs_numba
def test_compiled_sum_is_numpys_to_the_bit():
    # AP@K's sum is numpy's pairwise summation, redone in hamming.py: the same value as np.sum for every length
    import hamming
    rng = np.random.default_rng(12)
    for n in list(range(1, 300)) + rng.integers(300, 40000, 60).tolist():
        x = rng.random(n) * (rng.random(n) < 0.7) / rng.integers(1, 5000, n)
        assert hamming._pairwise_sum(x, n) == x.sum(), n


@needs_numba
def test_compiled_kernels_run_where_nothing_can_be_cached():
    # numba's cache=True needs a writable place (__pycache__, NUMBA_CACHE_DIR, the user's cache); where it finds none,
    # hamming.py compiles on each first call instead of failing at import
    code = ('import numba.core.caching as c; c.CacheImpl._locator_classes = []; import numpy as np, hamming; '
            'w = np.zeros((1, 64), np.uint64); hamming.distances(w[:, :1], w, 0, 1, np.zeros(64, np.uint8)); '
            'print(type(hamming.distances._cache).__name__)')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ['NullCache']


@pytest.mark.parametrize('multi', [False, True])
@pytest.mark.usefixtures('kernel')
def test_torch_path_equals_numpy_path(multi):
    # the GPU path (torch), run here on the CPU: the same lists, ties by index, and the same MAP
    pytest.importorskip('torch')
    rng = np.random.default_rng(9 + multi)
    nq, n, L = 30, 900, 32
    qb, rb = tied_codes(rng, nq, n, L, protos=3)
    ql, rl = labels(rng, nq, n, 8, multi)
    for k in (1, 60, 400, n, n + 3):
        for chunk in (None, 7):
            got, want = E.hamming_rank_topk(qb, rb, k, chunk=chunk, device='cpu'), E.hamming_rank_topk(qb, rb, k)
            assert (got[0] == want[0]).all() and (got[1] == want[1]).all() and got[1].dtype == np.int32
        assert E.mean_average_precision(qb, rb, ql, rl, k, device='cpu') == E.mean_average_precision(qb, rb, ql, rl, k)


def test_topk_rows_float_without_and_with_ties():
    # the fast (unstable) sort of a row's candidates is kept only when no two of them tie
    rng = np.random.default_rng(10)
    for D in (rng.standard_normal((6, 3000)), rng.integers(0, 50, (6, 3000)).astype(np.float64)):
        for k in (1, 90, 700, 3000):
            idx, val = E._topk_rows(D, k)
            ref = np.argsort(D, axis=1, kind='stable')[:, :k]
            assert (idx == ref).all() and (val == np.take_along_axis(D, ref, 1)).all()


def test_chunk_size_bounds_memory():
    assert E._chunk_size(117_218) == E.CHUNK == 8  # 8 queries: a chunk's distances and mask stay in cache
    assert E._chunk_size(50_000_000) == 1  # one query at a time, however large the retrieval set
    for n in (1_000, 117_218, 5_000_000):   # ~64 bytes per (query, item) stay within MEM_MB, and only just
        c = E._chunk_size(n)
        assert 64 * c * n <= E.MEM_MB << 20 and (c == E.CHUNK or 64 * (c + 1) * n > E.MEM_MB << 20), n
    assert E._chunk_size(10, chunk=5) == 5


# -----------------------------------------------------------------------------
# hand-worked example, 5 retrieval items, L = 4, labels one-hot over 3 classes
#   query q1 = ++++ (class 0), q2 = ---- (class 2: nothing relevant)
#   r0 = --++ (class 0)  d(q1) = 2     r1 = ++++ (class 0)  d(q1) = 0
#   r2 = ++-- (class 1)  d(q1) = 2     r3 = +++- (class 1)  d(q1) = 1
#   r4 = ---+ (class 0)  d(q1) = 3
# q1 ranking by (distance, index): r1 r3 r0 r2 r4, relevance 1 0 1 0 1
QB = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]])
RB = np.array([[-1, -1, 1, 1], [1, 1, 1, 1], [1, 1, -1, -1], [1, 1, 1, -1], [-1, -1, -1, 1]])
QL = np.eye(3, dtype=np.int8)[[0, 2]]
RL = np.eye(3, dtype=np.int8)[[0, 0, 1, 1, 0]]


@pytest.mark.usefixtures('kernel')
def test_hand_ranking():
    idx, dist = E.hamming_rank_topk(QB, RB, 5)
    assert idx[0].tolist() == [1, 3, 0, 2, 4] and dist[0].tolist() == [0, 1, 2, 2, 3]
    # q2 distances: r0 2, r1 4, r2 2, r3 3, r4 1 -> r4 r0 r2 r3 r1
    assert idx[1].tolist() == [4, 0, 2, 3, 1] and dist[1].tolist() == [1, 2, 2, 3, 4]


@pytest.mark.usefixtures('kernel')
def test_hand_map():
    # AP@5(q1) = (1/3)(1/1 + 2/3 + 3/5) = 34/45; AP(q2) = 0 (no relevant) -> MAP@5 = 17/45
    assert abs(E.mean_average_precision(QB, RB, QL, RL, 5) - float(F(17, 45))) < 1e-15
    # AP@3(q1): relevance 1 0 1, R = 2: (1/2)(1 + 2/3) = 5/6 -> MAP@3 = 5/12
    assert abs(E.mean_average_precision(QB, RB, QL, RL, 3) - float(F(5, 12))) < 1e-15
    # AP@2(q1): relevance 1 0, R = 1: 1 -> MAP@2 = 1/2; K = 10 > 5 uses all five
    assert abs(E.mean_average_precision(QB, RB, QL, RL, 2) - 0.5) < 1e-15
    assert abs(E.mean_average_precision(QB, RB, QL, RL, 10) - float(F(17, 45))) < 1e-15


@pytest.mark.usefixtures('kernel')
def test_hand_precision_recall_at():
    # q1 top-N relevant: N=1 1, N=2 1, N=3 2, N=5 3 -> precision 1, 1/2, 2/3, 3/5; q2 all 0
    # mean precision: 1/2, 1/4, 1/3, 3/10; recall over q1 only (q2 has nothing to find): 1/3, 1/3, 2/3, 1
    got = E.precision_recall_at(QB, RB, QL, RL, [1, 2, 3, 5])
    np.testing.assert_allclose(got['precision'], [1 / 2, 1 / 4, 1 / 3, 3 / 10], atol=1e-15)
    np.testing.assert_allclose(got['recall'], [1 / 3, 1 / 3, 2 / 3, 1], atol=1e-15)
    assert got['queries_without_relevant'] == 1


@pytest.mark.usefixtures('kernel')
def test_hand_radius():
    # q1 within radius 0..4: 1, 2, 4, 5, 5 items, 1, 1, 2, 3, 3 relevant
    #   precision 1, 1/2, 1/2, 3/5, 3/5; recall 1/3, 1/3, 2/3, 1, 1
    # q2: nothing inside radius 0 (empty ball: precision 0), nothing relevant anywhere: precision 0
    curve = E.pr_curve_radius(QB, RB, QL, RL)
    np.testing.assert_allclose(curve['precision'], [1 / 2, 1 / 4, 1 / 4, 3 / 10, 3 / 10], atol=1e-15)
    np.testing.assert_allclose(curve['recall'], [1 / 3, 1 / 3, 2 / 3, 1, 1], atol=1e-15)
    assert abs(E.precision_radius(QB, RB, QL, RL, 2) - 0.25) < 1e-15  # (1/2 + 0) / 2
    assert abs(E.precision_radius(QB, RB, QL, RL, 0) - 0.5) < 1e-15   # (1 + 0) / 2


@pytest.mark.usefixtures('kernel')
def test_hand_empty_ball_counts_zero():
    # both queries class 0; items r0 = ---+ (class 0), r1 = +--- (class 1)
    # qa = ++++: d(r0) = 3, d(r1) = 3 -> nothing within radius 2: precision 0 (not left out)
    # qb = ---+: d(r0) = 0, d(r1) = 2 -> within 2: r0, r1, one relevant: precision 1/2
    q = np.array([[1, 1, 1, 1], [-1, -1, -1, 1]])
    r = np.array([[-1, -1, -1, 1], [1, -1, -1, -1]])
    ql, rl = np.eye(2, dtype=np.int8)[[0, 0]], np.eye(2, dtype=np.int8)[[0, 1]]
    assert abs(E.precision_radius(q, r, ql, rl, 2) - 0.25) < 1e-15   # (0 + 1/2) / 2
    assert abs(E.precision_radius(q, r, ql, rl, 1) - 0.5) < 1e-15    # (0 + 1/1) / 2
    assert abs(E.precision_radius(q, r, ql, rl, 3) - 0.5) < 1e-15    # (1/2 + 1/2) / 2


def test_hand_map_continuous():
    # <q, r> with q = (0.5, 0.25): r0 0.375, r1 0.5, r2 0, r3 0.375, r4 -0.75
    # descending, ties by index: r1 r0 r3 r2 r4; relevance 1 0 1 0 1 -> AP@5 = 34/45
    # (the other tie order r1 r3 r0 would give 1 1 0 0 1 -> 13/15)
    qh = np.array([[0.5, 0.25]])
    rh = np.array([[0.5, 0.5], [1, 0], [-0.5, 1], [0.5, 0.5], [-1, -1]])
    rl = np.eye(2, dtype=np.int8)[[1, 0, 1, 0, 0]]
    ql = np.eye(2, dtype=np.int8)[[0]]
    assert abs(E.map_continuous(qh, rh, ql, rl, 5) - float(F(34, 45))) < 1e-15
    assert abs(E.map_continuous(qh, rh, ql, rl, 2) - 1.0) < 1e-15  # 1 0 -> R = 1


@pytest.mark.usefixtures('kernel')
def test_class_index_labels_and_shape_checks():
    rng = np.random.default_rng(4)
    qb, rb = tied_codes(rng, 10, 120, 16)
    qc, rc = rng.integers(0, 4, 10), rng.integers(0, 4, 120)
    eye = np.eye(4, dtype=np.int8)
    assert E.mean_average_precision(qb, rb, qc, rc, 50) == E.mean_average_precision(qb, rb, eye[qc], eye[rc], 50)
    with pytest.raises(ValueError):
        E.mean_average_precision(qb, rb, eye[qc], eye[rc][:-1], 50)
    with pytest.raises(ValueError):
        E.hamming_rank_topk(qb, rb[:, :8], 5)


def test_to_codes_sign_zero_is_plus_one():
    b = E.to_codes(np.array([[-0.3, 0.0, 0.7, -0.0]], np.float32))
    assert b.dtype == np.int8 and b.tolist() == [[-1, 1, 1, 1]]
    with pytest.raises(ValueError):
        E.to_codes(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError):  # 0/1 bits are not +-1 codes
        E.to_codes(np.array([[0, 1, 1]], np.int8))
    assert E.to_codes(np.array([[-1, 1]])).tolist() == [[-1, 1]]


# -----------------------------------------------------------------------------
@pytest.mark.usefixtures('kernel')
def test_map_equals_sklearn_average_precision_without_ties():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(5)
    L = 48
    aps, ours = [], []
    for _ in range(6):  # one query each: item i is the query with i bits flipped, shuffled
        q = rng.choice([-1, 1], size=(1, L))
        flips = rng.permutation(L + 1)
        r = np.repeat(q, L + 1, 0)
        for i, f in enumerate(flips):
            r[i, rng.permutation(L)[:f]] *= -1
        rel = rng.random(L + 1) < 0.4
        rel[0] = True
        rl = np.stack([rel, ~rel], 1).astype(np.int8)
        ql = np.array([[1, 0]], np.int8)
        ours.append(E.mean_average_precision(q, r, ql, rl, L + 1))
        aps.append(average_precision_score(rel, -flips))  # score = -distance, all distinct
    np.testing.assert_allclose(ours, aps, atol=1e-12)
    # continuous ranking: random floats have no ties
    qh, rh = rng.standard_normal((20, 16)), rng.standard_normal((500, 16))
    ql, rl = labels(rng, 20, 500, 6, False)
    ql[:, :] = np.eye(6, dtype=np.int8)[rng.integers(0, 5, 20)]  # every query has relevant items
    ref = np.mean([average_precision_score(rl @ q > 0, rh @ h) for h, q in zip(qh, ql)])
    assert abs(E.map_continuous(qh, rh, ql, rl, 500) - ref) < 1e-12


# -----------------------------------------------------------------------------
# plots
def _png(path):
    import matplotlib.image
    assert os.path.getsize(path) > 1000
    return matplotlib.image.imread(path)


def test_plots(tmp_path):
    rng = np.random.default_rng(0)
    curves = {'16 bits': dict(n=[1, 100, 200], precision=[0.9, 0.8, 0.7], recall=[0.01, 0.2, 0.4]),
              '64 bits': dict(n=[1, 100, 200], precision=[0.95, 0.9, 0.8], recall=[0.02, 0.3, 0.5])}
    for kind in ('pr', 'pn'):
        img = _png(figures.plot_curves(curves, str(tmp_path / f'{kind}.png'), kind=kind, title='t'))
        assert img.shape[:2] == (450, 600)
    imgs = [rng.integers(0, 255, (32, 40, 3), dtype=np.uint8) for _ in range(11)]
    img = _png(figures.plot_top10(imgs[0], imgs[1:], [True] * 5 + [False] * 5, str(tmp_path / 'top10.png')))
    assert img.shape[:2] == (180, 1540)
    rgb = img[..., :3]
    green = (rgb[..., 0] < 0.05) & (np.abs(rgb[..., 1] - 170 / 255) < 0.05) & (rgb[..., 2] < 0.05)
    red = (np.abs(rgb[..., 0] - 220 / 255) < 0.05) & (rgb[..., 1] < 0.05) & (rgb[..., 2] < 0.05)
    assert green.sum() > 100 and red.sum() > 100  # right and wrong retrievals are framed
    words = ['cat', 'tabby_cat', 'kitten', 'fur', 'whisker']
    img = _png(figures.plot_top_nouns(imgs[0], words, [0.4, 0.2, 0.1, 0.05, 0.01], str(tmp_path / 'n.png'),
                                ['round_shape', 'ovoid', 'hair', 'cat', 'ball'], [0.3, 0.2, 0.1, 0.1, 0.05]))
    assert img.shape[:2] == (300, 1000)
    img = _png(figures.plot_top_nouns(imgs[0], words, [0.4, 0.2, 0.1, 0.05, 0.01], str(tmp_path / 'n1.png')))
    assert img.shape[:2] == (300, 650)


# -----------------------------------------------------------------------------
# command line
def _write_run(run, rng, bits_list, nq=40, n=600, C=20):
    ql, rl = labels(rng, nq, n, C, True)
    data = {}
    for bits in bits_list:
        qb, rb = tied_codes(rng, nq, n, bits, protos=6, flip=0.1)
        qh = (qb * rng.uniform(0.05, 1, qb.shape)).astype(np.float32)
        rh = (rb * rng.uniform(0.05, 1, rb.shape)).astype(np.float32)
        os.makedirs(run / f'{bits}bits')
        np.savez(run / f'{bits}bits' / 'codes.npz', query_h=qh, retrieval_h=rh, query_labels=ql,
                 retrieval_labels=rl, topk=np.int64(100))
        data[bits] = (qh, rh, ql, rl)
    return data


def test_cli_run(tmp_path):
    rng = np.random.default_rng(1)
    run = tmp_path / 'run'
    data = _write_run(run, rng, [16, 32])
    out = subprocess.run([sys.executable, 'eval_hash.py', f'--run={run}', '--pr_points=20'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith('eval bits=')]
    assert len(lines) == 2 and 'map_continuous@100=' in lines[0] and 'released-code' in lines[0]
    metrics = json.load(open(run / 'metrics.json'))
    assert metrics['config']['PR_POINTS'] == 20
    for bits, (qh, rh, ql, rl) in data.items():
        m = metrics['bits'][str(bits)]
        qb, rb = E.to_codes(qh), E.to_codes(rh)
        assert abs(m['map'] - E.mean_average_precision(qb, rb, ql, rl, 100)) < 1e-12
        assert f"map@100={m['map']:.4f}" in lines[[16, 32].index(bits)]
        assert abs(m['map_continuous']['value'] - E.map_continuous(qh, rh, ql, rl, 100)) < 1e-12
        assert 'continuous-output' in m['map_continuous']['label']
        assert abs(m['precision_radius'] - E.precision_radius(qb, rb, ql, rl, 2)) < 1e-12
        assert m['p_at_n']['n'] == E.p_at_n_values(E.P_AT_N, 600).tolist()  # 7 of P_AT_N fit: more drawn in
        at = E.precision_recall_at(qb, rb, ql, rl, m['p_at_n']['n'])
        np.testing.assert_allclose(m['p_at_n']['precision'], at['precision'], atol=1e-12)
        np.testing.assert_allclose(m['p_at_n']['recall'], at['recall'], atol=1e-12)
        assert m['pr_curve_rank']['n'][-1] == 600 and len(m['pr_curve_rank']['n']) == 20
        np.testing.assert_allclose(m['pr_curve_radius']['precision'],
                                   E.pr_curve_radius(qb, rb, ql, rl)['precision'], atol=1e-12)
    for name in ('pr_curve.png', 'p_at_n.png'):
        assert _png(run / name).shape[:2] == (450, 600)


def test_cli_runs_compare(tmp_path):
    rng = np.random.default_rng(2)
    for name in ('a', 'b'):
        _write_run(tmp_path / name, rng, [16])
    out = subprocess.run([sys.executable, 'eval_hash.py', f'--runs={tmp_path / "a"},{tmp_path / "b"}',
                          '--bits=16', f'--out={tmp_path / "cmp"}'], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert sum(l.startswith('eval run=') for l in out.stdout.splitlines()) == 2
    assert set(json.load(open(tmp_path / 'cmp' / 'compare_16bits.json'))['runs']) == {str(tmp_path / 'a'),
                                                                                     str(tmp_path / 'b')}
    assert _png(tmp_path / 'cmp' / 'pr_curve_16bits.png').shape[:2] == (450, 600)


def test_one_map_name_and_ten_points_of_p_at_n_on_a_small_set(tmp_path):
    """MAP@K is named by the K asked for, with a note when the retrieval set is smaller; P@N has at least
    ten N whatever the size (the paper's N where they fit), every N on a set of fewer than ten items."""
    assert E.map_text(0.79554, 1000, 45) == 'map@1000=0.7955 (K cut to the 45 retrieval items)'
    assert E.map_text(0.79554, 1000, 5000) == 'map@1000=0.7955'
    assert E.p_at_n_values(E.P_AT_N, 45).tolist() == [1, 6, 11, 16, 21, 25, 30, 35, 40, 45]
    assert E.p_at_n_values(E.P_AT_N, 50000).tolist() == list(E.P_AT_N)  # a large set: the paper's Figure 4
    assert E.p_at_n_values(E.P_AT_N, 4).tolist() == [1, 2, 3, 4]
    rng = np.random.default_rng(3)
    run = tmp_path / 'run'
    qh, rh, ql, rl = _write_run(run, rng, [16], nq=10, n=45, C=5)[16]
    out = subprocess.run([sys.executable, 'eval_hash.py', f'--run={run}'], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.load(open(run / 'metrics.json'))['bits']['16']
    assert len(m['p_at_n']['n']) == 10 and m['p_at_n']['n'][-1] == 45
    assert f"eval bits=16 map@100={m['map']:.4f} (K cut to the 45 retrieval items) " in out.stdout  # codes.npz's K
    assert out.stdout.strip().splitlines()[-1].startswith('eval bits=16 map@100=')  # the MAP line last


def test_a_folder_of_runs_lists_them(tmp_path):
    """--run at a folder that holds runs, not codes: the error lists the run folders found below it."""
    rng = np.random.default_rng(4)
    for name in ('a', 'b'):
        _write_run(tmp_path / 'runs' / 'folder' / name, rng, [16], nq=5, n=30, C=3)
    for where in (tmp_path / 'runs' / 'folder', tmp_path / 'runs'):
        out = subprocess.run([sys.executable, 'eval_hash.py', f'--run={where}'], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 1 and out.stderr.strip() == (
            f"error: no <bits>bits/codes.npz under {where}: it holds 2 run folder(s), {tmp_path}/runs/folder/a, "
            f"{tmp_path}/runs/folder/b; give one of them as --run")
    out = subprocess.run([sys.executable, 'eval_hash.py', f'--run={tmp_path}/nowhere'], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.stderr.strip() == (f"error: no <bits>bits/codes.npz under {tmp_path}/nowhere (no such folder): give "
                                  f"--run the folder train.py wrote (its run=... line, or --run_dir)")

