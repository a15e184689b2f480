"""Compiled kernels of eval_hash.py's rankings (numba; Sections 4.1-4.2 of the paper): Hamming distances, the top K
by (distance, index) without a comparison sort, AP@K, the hits of precision@N and of the radius curves, and the
asymmetric quantizer distance of the quantization baselines. eval_hash.py calls them when numba is installed and an
evaluation is large enough (eval_hash.KERNEL), through the same threads as its numpy path; both give the same lists
and the same floating-point results to the last bit (tests/test_eval.py holds them equal).

One query at a time: its distances to every retrieval item in one vectorised pass (popcount of XOR) into a row of
bytes; the K-th smallest distance d* from counts at four thresholds around a guess made on every SUBSAMPLE-th item
(64 compares at once); the items below d* and the first K - count(< d*) at d*, in index order; a counting sort of
those K over the distances (stable: ties stay in index order). AP@K then does mean_average_precision_reference's
floating-point operations in its order, numpy's pairwise summation included.

Kernels take the whole query arrays and a range s..e of queries, and scratch arrays made by `scratch` (numpy
allocations, so that tracemalloc sees them); a row of distances is padded to a multiple of 64 with L + 1.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_JIT = dict(nogil=True, error_model='numpy')  # GIL released: eval_hash's threads run side by side


def _jit(fn=None, **options):
    """numba.njit with _JIT, its machine code cached where numba finds a writable place (__pycache__ beside this file,
    else NUMBA_CACHE_DIR or the user's cache); compiled on each first call where it finds none, rather than failing."""
    if fn is None:
        return lambda f: _jit(f, **options)
    try:
        return njit(cache=True, **_JIT, **options)(fn)
    except RuntimeError:  # numba: 'cannot cache function ...: no locator available'
        return njit(**_JIT, **options)(fn)


# -----------------------------------------------------------------------------
# machine operations numba has no name for: popcount, trailing zeros, 64 compares at once
def _bits_op(name, doc):
    """An intrinsic f(x) on an integer x returning an intp (so that numba adds it to an index without a float)."""
    @intrinsic
    def op(typingctx, x):
        def codegen(context, builder, sig, args):
            v = builder.ctpop(args[0]) if name == 'ctpop' else builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))
            return builder.zext(v, ir.IntType(64)) if x.bitwidth < 64 else v
        return types.intp(x), codegen
    op.__doc__ = doc
    return op


_popcount = _bits_op('ctpop', 'The set bits of an integer (one POPCNT; vectorised in loops).')
_ctz = _bits_op('cttz', 'The trailing zero bits of an integer (its width for 0).')


def _lanes(op):
    """An intrinsic f(a, s, t): a uint64 whose bit b is a[s + b] <op> t, b < 64 (a[s:s + 64] must exist): one vector
    compare and a mask move on AVX-512, a few of them on other machines (LLVM splits the 64 lanes)."""
    @intrinsic
    def compare(typingctx, a, s, t):
        def codegen(context, builder, sig, args):
            vec = ir.VectorType(context.get_value_type(sig.args[0].dtype), 64)
            ptr = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [args[1]])
            v = builder.load(builder.bitcast(ptr, vec.as_pointer()), align=1)
            tv = builder.insert_element(ir.Constant(vec, ir.Undefined), args[2], ir.Constant(ir.IntType(32), 0))
            tv = builder.shuffle_vector(tv, tv, ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))
            cmp = builder.fcmp_ordered if isinstance(sig.args[0].dtype, types.Float) else builder.icmp_unsigned
            return builder.bitcast(cmp(op, v, tv), ir.IntType(64))
        return types.uint64(a, types.intp, a.dtype), codegen
    return compare


_lt64, _le64, _eq64 = _lanes('<'), _lanes('<='), _lanes('==')


@_jit(inline='always')
def _emit(bits, g, out, m):
    """out[m:] = g + the positions of the set bits of `bits`, lowest first; returns m + their count. Eight slots are
    written whatever the count (out has 64 spare): no branch to mispredict in the common case of a few bits."""
    c = _popcount(bits)
    for u in range(8):
        out[m + u] = g + _ctz(bits)
        bits &= bits - np.uint64(1)
    for u in range(8, c):
        out[m + u] = g + _ctz(bits)
        bits &= bits - np.uint64(1)
    return m + c


def scratch(n, k, L, kind='hamming'):
    """A thread's working arrays for n retrieval items and the top k: (row of distances padded to 64s with L + 1,
    four histograms over 0..L + 1, candidates, their distances, the relevance of every item as bits, relevance in
    rank order, AP terms).
    kind='aqd': (float64 distances padded with +inf, candidates, and the keys and indices of a radix sort, twice)."""
    n64 = -(-n // 64) * 64
    if kind == 'aqd':
        return (np.full(n64, np.inf), np.empty(n64 + 64, np.int32), np.empty(n64, np.uint64), np.empty(n64, np.int32),
                np.empty(n64, np.uint64), np.empty(n64, np.int32))
    dtype = np.uint8 if L < 255 else np.uint16
    row = np.full(n64, L + 1, dtype)
    return (row, np.zeros((4, L + 2), np.int64), np.empty(n64 + 64, np.int32), np.empty(k, dtype),
            np.empty(n64 // 64, np.uint64), np.empty(k, np.uint8), np.empty(k))


# -----------------------------------------------------------------------------
# Hamming distances and the nearest K of a row
@_jit
def _distance_row(qw, i, rw, row):
    """row[j] = popcount(b_i xor b_j), the Hamming distance of query i (words qw [W, nq]) to every item j of rw
    [W, n]: one vectorised pass a word."""
    n = rw.shape[1]
    q = qw[0, i]
    for j in range(n):
        row[j] = _popcount(q ^ rw[0, j])
    for w in range(1, rw.shape[0]):
        q = qw[w, i]
        for j in range(n):
            row[j] += _popcount(q ^ rw[w, j])


@_jit
def distances(qw, rw, s, e, row):
    """The Hamming distances of each query s..e-1 to every item, into `row` one query after the other (as the
    ranking kernels compute them): the floor, and nothing else."""
    for i in range(s, e):
        _distance_row(qw, i, rw, row)


@_jit
def _below(row, v, w):
    """How many entries of row lie below v, and below w: 64 compares at a time."""
    a = b = 0
    for g in range(0, len(row), 64):
        a += _popcount(_lt64(row, g, v))
        b += _popcount(_lt64(row, g, w))
    return a, b


@_jit
def _kth(row, n, k, sub, hist):
    """(d*, count below d*): the k-th smallest of row[:n] and how many entries lie below it. A guess t from every
    sub-th entry, the counts below t and t + 1, then below t + 2 and t + 3 or t - 2 and t - 1 when k is not between;
    a full histogram when d* is none of t - 2 .. t + 2."""
    top, dt = len(hist) - 1, row.dtype.type  # top = L + 1, the padding
    hist[:] = 0
    for j in range(0, n, sub):
        hist[row[j]] += 1
    t, seen = 0, hist[0]
    while seen < max(1, k // sub) and t < top:
        t += 1
        seen += hist[t]
    a, b = _below(row, dt(t), dt(min(t + 1, top)))
    if a < k <= b:
        return t, a
    if b < k:
        c, d = _below(row, dt(min(t + 2, top)), dt(min(t + 3, top)))
        if k <= c:
            return t + 1, b
        if k <= d:
            return t + 2, c
    else:
        c, d = _below(row, dt(max(t - 2, 0)), dt(max(t - 1, 0)))
        if d < k:
            return t - 1, d
        if c < k:
            return t - 2, c
    hist[:] = 0  # the guess missed: count every distance
    for j in range(n):
        hist[row[j]] += 1
    below = 0
    for d in range(top):
        if below + hist[d] >= k:
            return d, below
        below += hist[d]
    return top, below


@_jit
def _nearest(row, n, k, sub, hist, cand, cd):
    """The k nearest items of row[:n] by (distance, index), in index order: cand[:k] their indices, cd[:k] their
    distances; returns d*, the k-th smallest distance. Every item below d*, and the first k - count(< d*) at d*: all
    those at d* up to the 64 items that hold the last one taken, then none."""
    dstar, below = _kth(row, n, k, sub, hist)
    d = row.dtype.type(dstar)
    take, cut = k - below, 0
    eq = _eq64(row, 0, d)
    while _popcount(eq) < take:  # the group of 64 holding the last item taken at d*
        take -= _popcount(eq)
        cut += 64
        eq = _eq64(row, cut, d)
    last = eq
    for _ in range(take - 1):
        last &= last - np.uint64(1)
    m = 0
    for g in range(0, cut, 64):
        m = _emit(_le64(row, g, d), g, cand, m)
    m = _emit(_lt64(row, cut, d) | (eq & ((last & (~last + np.uint64(1))) * np.uint64(2) - np.uint64(1))), cut, cand,
              m)
    for g in range(cut + 64, len(row), 64):
        m = _emit(_lt64(row, g, d), g, cand, m)
    for a in range(k):
        cd[a] = row[cand[a]]
    return dstar


@_jit
def _starts(cd, k, dstar, h4):
    """h4[u, d] = the rank of the first candidate at distance d in quarter u of cd[:k], ties in candidate order
    (index order): the counts of a counting sort over 0..d*, the four quarters counted side by side (four chains of
    dependent increments instead of one). A caller places candidate u * q + a at h4[u, d]++ (q = ceil(k / 4))."""
    q = -(-k // 4)
    h4[:, :dstar + 1] = 0
    for a in range(q):
        for u in range(4):
            if u * q + a < k:
                h4[u, cd[u * q + a]] += 1
    s = 0
    for d in range(dstar + 1):
        for u in range(4):
            c = h4[u, d]
            h4[u, d] = s
            s += c
    return q


@_jit
def rank(qw, rw, s, e, k, sub, idx, dist, row, h4, cand, cd):
    """idx[i], dist[i] = the k nearest items of query i by (Hamming distance, index), their distances; i in s..e-1."""
    n = rw.shape[1]
    for i in range(s, e):
        _distance_row(qw, i, rw, row)
        q = _starts(cd, k, _nearest(row, n, k, sub, h4[0], cand, cd), h4)
        for a in range(q):
            for u in range(4):
                b = u * q + a
                if b < k:
                    p = h4[u, cd[b]]
                    h4[u, cd[b]] = p + 1
                    idx[i, p], dist[i, p] = cand[b], cd[b]


# -----------------------------------------------------------------------------
# relevance and metrics (Section 4.2.1)
@_jit
def _relevance_bits(i, qc, cls, bits):
    """bits = the items sharing a label with query i, one bit an item (bit j % 64 of word j // 64): the OR of the
    item sets of its classes (qc [nq, C] 0/1, cls [C, n64 / 64]), a few kilobytes that stay in the core's cache."""
    bits[:] = 0
    for c in range(qc.shape[1]):
        if qc[i, c]:
            for w in range(len(bits)):
                bits[w] |= cls[c, w]


@_jit
def _ranked_relevance(qw, rw, i, k, sub, qc, cls, row, h4, cand, cd, bits, rel):
    """rel[p] = 1 when the item at rank p < k of query i's Hamming ranking shares a label with it: the distances, the
    k nearest, their relevance placed by a counting sort of their distances."""
    _distance_row(qw, i, rw, row)
    q = _starts(cd, k, _nearest(row, rw.shape[1], k, sub, h4[0], cand, cd), h4)
    _relevance_bits(i, qc, cls, bits)
    for a in range(q):
        for u in range(4):
            b = u * q + a
            if b < k:
                p, j = h4[u, cd[b]], cand[b]
                h4[u, cd[b]] = p + 1
                rel[p] = (bits[j >> 6] >> np.uint64(j & 63)) & np.uint64(1)


@_jit
def _pairwise_sum(x, n):
    """x[0] + ... + x[n-1] added as numpy's np.sum adds them (its pairwise summation: blocks of at most 128 by eight
    interleaved sums, halves cut at a multiple of 8 added recursively), so the result is np.sum's to the last bit."""
    los, ns, sums = np.empty(128, np.int64), np.empty(128, np.int64), np.empty(64)
    los[0], ns[0], top, got = 0, n, 1, 0
    while top:  # a stack of ranges still to add; ns = -1: add the two sums last found
        top -= 1
        lo, m = los[top], ns[top]
        if m < 0:
            got -= 1
            sums[got - 1] += sums[got]
        elif m > 128:
            h = m // 2 - (m // 2) % 8
            ns[top], los[top + 1], ns[top + 1], los[top + 2], ns[top + 2] = -1, lo + h, m - h, lo, h
            top += 3
        elif m < 8:
            r = 0.0
            for u in range(lo, lo + m):
                r += x[u]
            sums[got], got = r, got + 1
        else:
            r0, r1, r2, r3, r4, r5, r6, r7 = x[lo], x[lo + 1], x[lo + 2], x[lo + 3], x[lo + 4], x[lo + 5], x[lo + 6], \
                x[lo + 7]
            end = lo + m - m % 8
            for u in range(lo + 8, end, 8):
                r0, r1, r2, r3 = r0 + x[u], r1 + x[u + 1], r2 + x[u + 2], r3 + x[u + 3]
                r4, r5, r6, r7 = r4 + x[u + 4], r5 + x[u + 5], r6 + x[u + 6], r7 + x[u + 7]
            r = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
            for u in range(end, lo + m):
                r += x[u]
            sums[got], got = r, got + 1
    return sums[0]


@_jit
def _average_precision(rel, k, x):
    """AP@k of a ranked relevance rel[:k], as eval_hash._average_precision: (1/R) sum_p hits(p) / p * rel(p), R the
    relevant items, 0 when R = 0; the same operations in the same order (x: scratch)."""
    h = 0
    for p in range(k):
        h += rel[p]
        x[p] = h
    for p in range(k):
        x[p] = x[p] / (p + 1) * rel[p]
    return _pairwise_sum(x, k) / h if h > 0 else 0.0


@_jit
def average_precisions(qw, rw, s, e, k, sub, qc, cls, ap, row, h4, cand, cd, bits, rel, x):
    """ap[i] = AP@k of query i's Hamming ranking (ties by index), i in s..e-1."""
    for i in range(s, e):
        _ranked_relevance(qw, rw, i, k, sub, qc, cls, row, h4, cand, cd, bits, rel)
        ap[i] = _average_precision(rel, k, x)


@_jit
def hits_at(qw, rw, s, e, cuts, sub, qc, cls, hits, row, h4, cand, cd, bits, rel):
    """hits[i, u] = the relevant items among the first cuts[u] of query i's Hamming ranking (cuts ascending), i in
    s..e-1: precision@N and recall@N (Figure 4), the PR curve by rank (Figure 3)."""
    for i in range(s, e):
        _ranked_relevance(qw, rw, i, cuts[-1], sub, qc, cls, row, h4, cand, cd, bits, rel)
        h, u = 0, 0
        for p in range(cuts[-1]):
            h += rel[p]
            while u < len(cuts) and cuts[u] == p + 1:
                hits[i, u] = h
                u += 1


@_jit
def radius_counts(qw, rw, s, e, qc, cls, within, rel_within, total, row, bits):
    """For query i in s..e-1 and radius r: items within Hamming distance r (within[i, r]), relevant ones among them
    (rel_within[i, r]), relevant items in the whole set (total[i]): the PR curve by radius (Figure 3)."""
    n = rw.shape[1]
    for i in range(s, e):
        _distance_row(qw, i, rw, row)
        _relevance_bits(i, qc, cls, bits)
        tot = 0
        for j in range(n):
            r = (bits[j >> 6] >> np.uint64(j & 63)) & np.uint64(1)
            d = row[j]
            within[i, d] += 1
            rel_within[i, d] += r
            tot += r
        total[i] = tot
        for d in range(1, within.shape[1]):
            within[i, d] += within[i, d - 1]
            rel_within[i, d] += rel_within[i, d - 1]


# -----------------------------------------------------------------------------
# product-quantized codes: asymmetric quantizer distance (DQN, DVSQ, DTQ, MeCoQ)
@_jit
def _sort_by_value(row, cand, m, keys, ids, keys2, ids2):
    """ids[:m] = cand[:m] ordered by row[cand] ascending, ties kept in their order: a stable LSD radix sort of the
    float64 values' bit patterns made monotone (-0.0 counted as 0.0, as a comparison counts it), a byte a pass,
    passes where every key has the same byte skipped. Returns the ids array that holds the order."""
    bits = row.view(np.uint64)
    for a in range(m):
        u = bits[cand[a]]
        u = np.uint64(0) if u == np.uint64(1 << 63) else u
        keys[a] = ~u if u >> np.uint64(63) else u | np.uint64(1 << 63)
        ids[a] = cand[a]
    count = np.empty(257, np.int64)
    for shift in range(0, 64, 8):
        count[:] = 0
        for a in range(m):
            count[((keys[a] >> np.uint64(shift)) & np.uint64(255)) + 1] += 1
        if count.max() == m:  # one byte value throughout: the order stands
            continue
        for b in range(256):
            count[b + 1] += count[b]
        for a in range(m):
            b = (keys[a] >> np.uint64(shift)) & np.uint64(255)
            keys2[count[b]], ids2[count[b]] = keys[a], ids[a]
            count[b] += 1
        keys, keys2, ids, ids2 = keys2, keys, ids2, ids
    return ids


@_jit
def aqd_rank(tables, codes, k, sub, idx, dist, row, cand, keys, ids, keys2, ids2):
    """idx[i], dist[i] = the k items of least AQD sum_m tables[i, m, codes[m, j]] (added in subspace order, as
    eval_hash's numpy path adds them) for each query i of the lookup tables [c, M, Kw], codes [M, n]; ties by
    index. A threshold from every sub-th item (its 5k / 4sub-th smallest, as the numpy path's), the items up to it
    in index order, a stable sort of their distances; every item when fewer than k lie below the threshold."""
    n = codes.shape[1]
    j = min(-(-n // sub) - 1, 5 * k // (4 * sub) + 4)
    for i in range(tables.shape[0]):
        t = tables[i]
        for r in range(n):
            row[r] = t[0, codes[0, r]]
        for w in range(1, codes.shape[0]):
            for r in range(n):
                row[r] += t[w, codes[w, r]]
        m = 0
        for r in range(0, n, sub):
            cand[m] = r
            m += 1
        guess = row[_sort_by_value(row, cand, m, keys, ids, keys2, ids2)[j]]
        m = 0
        for g in range(0, len(row), 64):
            m = _emit(_le64(row, g, guess), g, cand, m)
        if m < k:
            m = n
            cand[:n] = np.arange(n)
        order = _sort_by_value(row, cand, m, keys, ids, keys2, ids2)
        for p in range(k):
            idx[i, p] = order[p]
            dist[i, p] = row[order[p]]
