"""Retrieval evaluation of hash codes (Sections 4.1-4.2 of the paper).

Codes are b = sign(h) in {-1, +1}^L with sign(0) = +1. The retrieval set is ranked by Hamming
distance (L - <b_q, b_r>) / 2, ties by retrieval index. An item is relevant when it shares at
least one label with the query. Metrics: MAP@K (Table 1), precision@N and recall@N (Figure 4),
precision-recall curves by rank position and by Hamming radius (Figure 3), precision within
Hamming radius 2, and the plots of Figures 3, 4, 6 and 7. The quantization baselines (DQN, DVSQ,
DTQ) store product-quantized codes instead; they are ranked by asymmetric quantizer distance
(`map_aqd`), ties by index, and scored by the same AP@K code.

The authors' released code ranks by the continuous tanh outputs instead, without sign();
`map_continuous` reproduces that for comparison and is always labelled as such.

    python eval_hash.py --run=runs/cifar10            # every <bits>bits/codes.npz in the run
    python eval_hash.py --runs=runs/a,runs/b --bits=64  # one line per run in the same plot
"""
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import cache
import dataset
import external
from cache import save_json
from configurator import check_ranges, configure
from runs import bits_dirs, code_lengths, mixed_runs, run_dataset

# -----------------------------------------------------------------------------
# what to evaluate
RUN = ''                 # training run directory holding <bits>bits/codes.npz; metrics.json and PNGs go there
RUNS = ()                # several run directories (comma-separated) to compare, one line each, at BITS
BITS = 64                # code length the --runs comparison draws (Figures 3-4 use 64 bits)
OUT = 'runs/compare'     # folder of the --runs comparison plots and json
TOPK = 0                 # K of MAP@K; 0 = the `topk` stored in codes.npz (1000 CIFAR-10, 5000 others)
# metrics
P_AT_N = (1,) + tuple(range(100, 1001, 100))  # N of precision@N / recall@N (Figure 4)
PR_POINTS = 100          # rank positions of the precision-recall curve, evenly spread over the retrieval set
RADIUS = 2               # Hamming radius of "precision within radius" (empty set: precision 0)
# pictures (Figures 6-7), drawn by --run when the run's images can be read
EXAMPLES = 3             # queries drawn with their top-10 (Figure 6) and their top-5 nouns (Figure 7); 0: none
DATA_PATH = ''           # the dataset's images; '' -> where dataset_extract.py read them (its source.json)
# system
CHUNK = 32               # most queries ranked at once (32 is the fastest on a 2-core CPU)
MEM_MB = 512             # memory one chunk of one worker may use: chunks shrink as the retrieval set grows
WORKERS = 2              # threads, each ranking its own block of queries (numpy releases the GIL)
SUBSAMPLE = 32           # every SUBSAMPLE-th item estimates a query's top-K threshold (results never depend on it)

_RANGES = dict(BITS='[1, 1024]', TOPK='[0, inf)', P_AT_N='[1, inf)', PR_POINTS='[2, inf)', RADIUS='[0, inf)',
               EXAMPLES='[0, inf)', CHUNK='[1, inf)', MEM_MB='[1, inf)', WORKERS='[1, inf)', SUBSAMPLE='[1, inf)')
_CONTINUOUS_LABEL = ("continuous-output MAP (authors' released evaluation: ranks by the tanh outputs "
                    "without sign(); not the paper's binary-code MAP)")


# -----------------------------------------------------------------------------
# codes, packing, ranking
def to_codes(h):
    """Hash codes b = sign(h) in {-1, +1} as int8, with sign(0) = +1 (Section 3.3). Takes the
    continuous outputs h or +-1 codes; integer 0/1 bit codes are refused (sign would make them all +1)."""
    h = np.asarray(h)
    if h.dtype.kind == 'f' and not np.isfinite(h).all():
        raise ValueError('hash outputs hold NaN or infinite values')
    if h.dtype.kind in 'biu' and (h == 0).any():
        raise ValueError('integer codes must be -1/+1, not 0/1 bits (map them with 2 * bits - 1)')
    return np.where(h >= 0, 1, -1).astype(np.int8)


def _label_words(q_labels, r_labels, nq, n):
    """Query and retrieval labels (N x C 0/1 matrices, or vectors of class indices) as packed words."""
    q, r = np.asarray(q_labels), np.asarray(r_labels)
    if q.ndim == 1 and r.ndim == 1:  # class indices: one-hot rows
        eye = np.eye(int(max(q.max(), r.max())) + 1, dtype=np.int8)
        q, r = eye[q], eye[r]
    if len(q) != nq or len(r) != n or q.shape[1:] != r.shape[1:]:
        raise ValueError(f'labels {q.shape} / {r.shape} do not match {nq} queries / {n} retrieval items')
    return _words(np.packbits(q > 0, axis=1)), _words(np.packbits(r > 0, axis=1))


def pack(h):
    """Codes b = sign(h) (sign(0) = +1, to_codes) as bits, 8 a byte: uint8 [N, ceil(L / 8)]. The one
    packing of codes: search.py's index stores these bytes."""
    return np.packbits(to_codes(h) > 0, axis=1)


def _words(packed):
    """Packed bits uint8 [N, B] as words [W, N] of uint8/16/32/64 (zero-padded: padding never
    counts in a Hamming distance)."""
    n, size = packed.shape
    dtype = np.uint8 if size <= 1 else np.uint16 if size <= 2 else np.uint32 if size <= 4 else np.uint64
    width = np.dtype(dtype).itemsize
    pad = np.zeros((n, -(-size // width) * width), np.uint8)
    pad[:, :size] = packed
    return np.ascontiguousarray(pad.view(dtype).T)


def _chunk_size(n, chunk=None):
    """Queries per chunk: `chunk` if given, else at most CHUNK and ~64 bytes per (query, item) within MEM_MB."""
    if chunk:
        return int(chunk)
    return int(max(1, min(CHUNK, (MEM_MB << 20) // (64 * max(n, 1)))))


def _code_words(q_codes, r_codes):
    """Query and retrieval codes (or continuous outputs, through sign()) packed into words: (qw, rw, L)."""
    q, r = to_codes(q_codes), to_codes(r_codes)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f'query codes {q.shape} and retrieval codes {r.shape} must be N x L with the same L')
    return _words(pack(q)), _words(pack(r)), q.shape[1]


def _blocks(fn, nq, desc):
    """fn(lo, hi, bar) on WORKERS contiguous blocks of the nq queries, one thread each (numpy
    releases the GIL; each block keeps its own buffers); the list of the blocks' results."""
    if nq < 1:
        raise ValueError('no queries')
    edges = np.linspace(0, nq, min(WORKERS, nq) + 1).astype(int)
    with tqdm(total=nq, desc=desc, leave=False, disable=None) as bar, ThreadPoolExecutor(len(edges) - 1) as ex:
        return list(ex.map(lambda lo, hi: fn(lo, hi, bar), edges[:-1], edges[1:]))


def _distance_chunks(qw, rw, L, chunk=None, bar=None):
    """Yield (s, e, D): Hamming distances D [e-s, n] of the queries s..e-1 of qw to every item of rw."""
    nq, n = qw.shape[1], rw.shape[1]
    c = _chunk_size(n, chunk)
    buf = np.empty((c, n), rw.dtype)  # reused: fresh large arrays cost page faults
    D = np.empty((c, n), np.uint8 if L < 256 else np.uint16)
    for s in range(0, nq, c):
        e = min(s + c, nq)
        # Hamming distance = popcount(b_q xor b_r) = (L - <b_q, b_r>) / 2, exact
        np.bitwise_xor(qw[0, s:e, None], rw[0][None, :], out=buf[:e - s])
        np.bitwise_count(buf[:e - s], out=D[:e - s])
        for w in range(1, len(rw)):
            np.bitwise_xor(qw[w, s:e, None], rw[w][None, :], out=buf[:e - s])
            D[:e - s] += np.bitwise_count(buf[:e - s])
        yield s, e, D[:e - s]
        if bar is not None:
            bar.update(e - s)


def _topk_rows(D, k):
    """The k smallest entries of each row of D [c, n], ordered by (value, column index):
    (columns int64 [c, k], values [c, k]). Equal to a stable argsort of each row, cut at k."""
    c, n = D.shape
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f'k must be at least 1, got {k}')
    if 4 * k >= n:  # a large part of the row: one stable sort per row is cheaper
        idx = np.argsort(D, axis=1, kind='stable')[:, :k]
        return idx, np.take_along_axis(D, idx, 1)
    # a threshold t per row with at least k items <= t, estimated on a column sample, then checked
    sample = D[:, ::SUBSAMPLE]
    j = min(sample.shape[1] - 1, 5 * k // (4 * SUBSAMPLE) + 4)
    t = np.partition(sample, j, axis=1)[:, j]
    pos = np.flatnonzero(D <= t[:, None])  # candidates, row by row, each row in index order
    count = np.diff(np.searchsorted(pos, np.arange(c + 1) * n))
    bad = np.flatnonzero(count < k)
    if len(bad):  # estimate too low: the exact k-th smallest value of those rows
        t[bad] = np.partition(D[bad], k - 1, axis=1)[:, k - 1]
        pos = np.flatnonzero(D <= t[:, None])
        count = np.diff(np.searchsorted(pos, np.arange(c + 1) * n))
    val = D.ravel()[pos]
    start = np.cumsum(count) - count
    idx, top = np.empty((c, k), np.int64), np.empty((c, k), D.dtype)
    for r in range(c):  # a stable sort of each row's candidates keeps index order inside ties
        o = start[r] + np.argsort(val[start[r]:start[r] + count[r]], kind='stable')[:k]
        idx[r], top[r] = pos[o] - r * n, val[o]
    return idx, top


def _ranked_chunks(qw, rw, L, k, chunk=None, bar=None):
    """Yield (s, e, idx, dist): the top-k retrieval items of queries s..e-1 by (Hamming distance, index)."""
    for s, e, D in _distance_chunks(qw, rw, L, chunk, bar):
        idx, dist = _topk_rows(D, k)
        yield s, e, idx, dist


def hamming_rank_topk(q_codes, r_codes, k, chunk=None):
    """Top-k retrieval indices of every query by Hamming distance, ties by retrieval index
    (a stable sort on distance): (idx int64 [nq, k], dist int32 [nq, k]); k is cut at the
    retrieval size. Memory of the result: nq * k * 12 bytes."""
    qw, rw, L = _code_words(q_codes, r_codes)
    return _rank_words(qw, rw, L, k, chunk)


def hamming_rank_packed(q_packed, r_packed, k, chunk=None):
    """hamming_rank_topk of codes already packed by `pack` (uint8 [N, L / 8]), as search.py keeps them."""
    return _rank_words(_words(q_packed), _words(r_packed), 8 * r_packed.shape[1], k, chunk)


def _rank_words(qw, rw, L, k, chunk=None):
    k = min(int(k), rw.shape[1])
    idx = np.empty((qw.shape[1], k), np.int64)
    dist = np.empty((qw.shape[1], k), np.int32)

    def block(lo, hi, bar):
        for s, e, i, d in _ranked_chunks(qw[:, lo:hi], rw, L, k, chunk, bar):
            idx[lo + s:lo + e], dist[lo + s:lo + e] = i, d
    _blocks(block, qw.shape[1], 'rank')
    return idx, dist


# -----------------------------------------------------------------------------
# relevance and metrics
def _relevance(qlw, rlw, idx=None):
    """Relevant = at least one shared label: bool [c, n], or [c, k] at the ranked items idx."""
    g = None
    for w in range(len(rlw)):
        r = rlw[w][None, :] if idx is None else rlw[w][idx]
        x = r & qlw[w][:, None]
        g = x if g is None else g | x
    return g != 0


def _average_precision(rel):
    """AP@K of each row of a ranked relevance matrix rel [c, K]: (1/R) sum_k precision(k) rel(k),
    R the relevant items in the top K, AP = 0 when R = 0 (MAP, Section 4.2.1)."""
    hits = np.cumsum(rel, axis=1, dtype=np.int64)
    R = hits[:, -1]
    s = (hits * rel) @ (1.0 / np.arange(1, rel.shape[1] + 1))
    return np.where(R > 0, s / np.maximum(R, 1), 0.0)


def mean_average_precision(q_codes, r_codes, q_labels, r_labels, topk):
    """MAP@K (Table 1) of Hamming ranking: mean over queries of AP@K, K = topk cut at the
    retrieval size. Continuous outputs are turned into codes with sign() first."""
    qw, rw, L = _code_words(q_codes, r_codes)
    qlw, rlw = _label_words(q_labels, r_labels, qw.shape[1], rw.shape[1])
    return _map_of(lambda lo, hi, bar: _ranked_chunks(qw[:, lo:hi], rw, L, topk, bar=bar), qlw, rlw, 'map')


def _map_of(ranked, qlw, rlw, desc):
    """MAP@K of a ranking: ranked(lo, hi, bar) yields (s, e, idx, _), the top-K retrieval items of the
    queries lo + s .. lo + e - 1 in rank order. The one AP@K code of every method (Hamming or AQD)."""
    def block(lo, hi, bar):
        return [_average_precision(_relevance(qlw[:, lo + s:lo + e], rlw, idx)) for s, e, idx, _ in ranked(lo, hi, bar)]
    return float(np.concatenate(sum(_blocks(block, qlw.shape[1], desc), [])).mean())


def map_continuous(q_h, r_h, q_labels, r_labels, topk):
    """Continuous-output MAP@K, the authors' released evaluation: ranks by the inner product of
    the tanh outputs (no sign()), descending, ties by index; same AP@K. Not the paper's metric:
    report it beside `mean_average_precision`, labelled (_CONTINUOUS_LABEL), never in its place."""
    q_h, r_h = np.asarray(q_h, np.float64), np.asarray(r_h, np.float64)
    if not (np.isfinite(q_h).all() and np.isfinite(r_h).all()):
        raise ValueError('hash outputs hold NaN or infinite values')
    qlw, rlw = _label_words(q_labels, r_labels, len(q_h), len(r_h))
    rT = np.ascontiguousarray(r_h.T)
    c = max(1, _chunk_size(len(r_h)) // 2)  # float64 scores take 8 bytes per pair

    def block(lo, hi, bar):
        ap = []
        for s in range(lo, hi, c):
            e = min(s + c, hi)
            idx, _ = _topk_rows((-q_h[s:e]) @ rT, int(topk))  # descending inner product
            ap.append(_average_precision(_relevance(qlw[:, s:e], rlw, idx)))
            bar.update(e - s)
        return ap
    return float(np.concatenate(sum(_blocks(block, len(q_h), 'map (continuous)'), [])).mean())


def precision_recall_at(q_codes, r_codes, q_labels, r_labels, ns):
    """Precision@N and recall@N of Hamming ranking for each N in ns (Figure 4; N cut at the
    retrieval size). Recall = relevant in the top N / relevant in the whole retrieval set; a
    query with no relevant item has no defined recall and is left out of the recall mean (its
    precision counts, as 0). Returns dict(n, precision, recall, queries_without_relevant)."""
    qw, rw, L = _code_words(q_codes, r_codes)
    qlw, rlw = _label_words(q_labels, r_labels, qw.shape[1], rw.shape[1])
    return _precision_recall_of(lambda lo, hi, k, bar: _ranked_chunks(qw[:, lo:hi], rw, L, k, bar=bar), qlw, rlw, ns)


def _precision_recall_of(ranked, qlw, rlw, ns):
    """precision_recall_at of a ranking: ranked(lo, hi, k, bar) yields (s, e, idx, _) as in _map_of."""
    nq, n = qlw.shape[1], rlw.shape[1]
    ns = np.clip(np.asarray(ns, np.int64), 1, n)
    hits, total = np.zeros((nq, len(ns))), np.zeros(nq)

    def block(lo, hi, bar):
        for s, e, idx, _ in ranked(lo, hi, int(ns.max()), bar):
            rel = _relevance(qlw[:, lo + s:lo + e], rlw)  # [c, n] in index order
            total[lo + s:lo + e] = np.count_nonzero(rel, axis=1)
            hits[lo + s:lo + e] = np.cumsum(np.take_along_axis(rel, idx, 1), axis=1, dtype=np.int32)[:, ns - 1]
    _blocks(block, nq, 'p@n')
    has = total > 0
    recall = (hits[has] / total[has, None]).mean(0) if has.any() else np.zeros(len(ns))
    return dict(n=ns.tolist(), precision=(hits / ns).mean(0).tolist(), recall=recall.tolist(),
                queries_without_relevant=int((~has).sum()))


def _radius_counts(q_codes, r_codes, q_labels, r_labels):
    """Per query and radius r = 0..L: items within distance r, relevant items within r, and
    relevant items in the whole set: ([nq, L+1], [nq, L+1], [nq])."""
    qw, rw, L = _code_words(q_codes, r_codes)
    nq = qw.shape[1]
    qlw, rlw = _label_words(q_labels, r_labels, nq, rw.shape[1])
    within, rel_within = np.zeros((nq, L + 1), np.int64), np.zeros((nq, L + 1), np.int64)
    total = np.zeros(nq, np.int64)

    def block(lo, hi, bar):
        for s, e, D in _distance_chunks(qw[:, lo:hi], rw, L, bar=bar):
            q = slice(lo + s, lo + e)
            rel = _relevance(qlw[:, q], rlw)
            flat = D + (np.arange(e - s) * (L + 1))[:, None]  # histogram bin of (query, distance)
            size = (e - s) * (L + 1)
            within[q] = np.bincount(flat.ravel(), minlength=size).reshape(e - s, L + 1).cumsum(1)
            rel_within[q] = np.bincount(flat[rel], minlength=size).reshape(e - s, L + 1).cumsum(1)
            total[q] = np.count_nonzero(rel, axis=1)
    _blocks(block, nq, 'radius')
    return within, rel_within, total


def pr_curve_radius(q_codes, r_codes, q_labels, r_labels):
    """Precision-recall curve over Hamming radii r = 0..L (Figure 3 style): precision and recall
    of the items within distance r, averaged over queries. A query with nothing within r
    counts precision 0; queries with no relevant item are left out of the recall mean."""
    within, rel_within, total = _radius_counts(q_codes, r_codes, q_labels, r_labels)
    precision = np.where(within > 0, rel_within / np.maximum(within, 1), 0.0).mean(0)
    has = total > 0
    recall = (rel_within[has] / total[has, None]).mean(0) if has.any() else np.zeros(within.shape[1])
    return dict(radius=list(range(within.shape[1])), precision=precision.tolist(), recall=recall.tolist())


def precision_radius(q_codes, r_codes, q_labels, r_labels, radius=2):
    """Precision within Hamming radius `radius`: mean over queries of the precision of the items
    at distance <= radius; a query with nothing inside the radius counts precision 0."""
    within, rel_within, _ = _radius_counts(q_codes, r_codes, q_labels, r_labels)
    r = min(int(radius), within.shape[1] - 1)
    # empty Hamming ball: precision 0 (not left out, so a code that retrieves nothing is penalised)
    return float(np.where(within[:, r] > 0, rel_within[:, r] / np.maximum(within[:, r], 1), 0.0).mean())


def evaluate_all(q_h, r_h, q_labels, r_labels, topk, ns=None, pr_points=None, radius=None):
    """Every metric of one code length from the continuous outputs h (JSON-serialisable dict):
    MAP@K of sign(h), continuous-output MAP (labelled), precision/recall@N, the PR curves by
    rank position and by Hamming radius, and precision within Hamming radius `radius`."""
    ns = P_AT_N if ns is None else ns
    pr_points = PR_POINTS if pr_points is None else pr_points
    radius = RADIUS if radius is None else radius
    qb, rb = to_codes(q_h), to_codes(r_h)
    n, L, K = len(rb), qb.shape[1], min(int(topk), len(rb))
    curves = _rank_curves(lambda at: precision_recall_at(qb, rb, q_labels, r_labels, at), n, ns, pr_points)
    curve = pr_curve_radius(qb, rb, q_labels, r_labels)
    r = min(int(radius), L)
    return dict(
        bits=int(L), num_query=int(len(qb)), num_retrieval=int(n), topk=int(K),
        map=mean_average_precision(qb, rb, q_labels, r_labels, K),
        map_continuous=dict(value=map_continuous(q_h, r_h, q_labels, r_labels, K), label=_CONTINUOUS_LABEL),
        radius=r, precision_radius=curve['precision'][r],  # = precision_radius(...): empty ball counts 0
        pr_curve_radius=curve, **curves)


def _rank_curves(precision_recall, n, ns, pr_points):
    """Precision/recall@N at the N of `ns` (Figure 4) and the PR curve at `pr_points` rank positions
    spread over the n retrieval items (Figure 3), from one ranking: precision_recall(positions) is
    precision_recall_at (or its AQD twin) at the sorted positions. Returns dict(p_at_n,
    pr_curve_rank, queries_without_relevant)."""
    positions = np.unique(np.linspace(1, n, pr_points).round().astype(np.int64))
    n_at = np.clip(np.asarray(ns, np.int64), 1, n)
    both = np.unique(np.concatenate([n_at, positions]))
    at = precision_recall(both)  # one ranking serves both lists

    def pick(want):  # the entries of `at` at the positions `want`
        i = np.searchsorted(both, want)
        return {key: [at[key][j] for j in i] for key in ('n', 'precision', 'recall')}
    return dict(p_at_n=pick(n_at), pr_curve_rank=pick(positions),
                queries_without_relevant=at['queries_without_relevant'])


# -----------------------------------------------------------------------------
# product-quantized codes (DQN, DVSQ, DTQ): ranking by asymmetric quantizer distance
_AQD_METRICS = ('ip', 'l2')


def aqd_tables(q_z, codebooks, metric='ip'):
    """Lookup tables T [nq, M, K] (float64): what word k of codebook m adds to the asymmetric
    quantizer distance of each query: 'ip' -<z_q^m, c_mk> (DeepHash's ranking), 'l2' ||z_q^m - c_mk||^2;
    z_q^m the query's m-th subvector."""
    c = np.asarray(codebooks, np.float64)
    m, _, d = c.shape
    q = np.asarray(q_z, np.float64).reshape(len(q_z), m, d)
    if metric == 'ip':
        return -np.einsum('qmd,mkd->qmk', q, c)
    if metric == 'l2':
        return ((q[:, :, None, :] - c[None]) ** 2).sum(3)
    raise ValueError(f"unknown AQD metric {metric!r}; choose one of {', '.join(_AQD_METRICS)}")


def _check_pq(q_z, r_codes, codebooks):
    q, codes, c = np.asarray(q_z), np.asarray(r_codes), np.asarray(codebooks)
    if (c.ndim != 3 or codes.ndim != 2 or codes.shape[1] != c.shape[0] or q.ndim != 2
            or q.shape[1] != c.shape[0] * c.shape[2]):
        raise ValueError(f'product-quantized codes {codes.shape} / codebooks {c.shape} / queries {q.shape} do not fit: '
                         f'expected N x M codes, M x K x D/M codebooks and nq x D queries')
    if codes.size and (codes.min() < 0 or codes.max() >= c.shape[1]):
        raise ValueError(f'product-quantized codes hold word indices outside 0..{c.shape[1] - 1}')
    if not np.isfinite(q).all() or not np.isfinite(c).all():
        raise ValueError('queries or codebooks hold NaN or infinite values')
    return q, codes.astype(np.intp), c


def _aqd_ranked(q_z, codes, codebooks, metric, k, chunk=None, bar=None):
    """Yield (s, e, idx, dist): the top-k retrieval items of queries s..e-1 by (AQD, index). The
    distance of query q to item r is sum_m T[q, m, code_rm], added in subspace order."""
    n = len(codes)
    c = max(1, _chunk_size(n, chunk) // 2)  # float64 distances and the gathered term: 16 bytes per pair
    for s in range(0, len(q_z), c):
        e = min(s + c, len(q_z))
        t = aqd_tables(q_z[s:e], codebooks, metric)
        D = np.take(t[:, 0], codes[:, 0], axis=1)
        for m in range(1, t.shape[1]):
            D += np.take(t[:, m], codes[:, m], axis=1)
        idx, dist = _topk_rows(D, k)
        yield s, e, idx, dist
        if bar is not None:
            bar.update(e - s)


def aqd_rank_topk(q_z, r_codes, codebooks, k, metric='ip'):
    """Top-k retrieval indices of every query by asymmetric quantizer distance, ties by retrieval
    index: (idx int64 [nq, k], dist float64 [nq, k])."""
    q, codes, c = _check_pq(q_z, r_codes, codebooks)
    k = min(int(k), len(codes))
    parts = list(_aqd_ranked(q, codes, c, metric, k))
    return np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])


def map_aqd(q_z, r_codes, codebooks, q_labels, r_labels, topk, metric='ip'):
    """MAP@K of the quantization methods: the retrieval set ranked by the asymmetric quantizer
    distance between each query's continuous z and the items' quantized z (codes [N, M] into
    codebooks [M, K, D/M]), ties by index, scored by the same AP@K as mean_average_precision."""
    q, codes, c = _check_pq(q_z, r_codes, codebooks)
    qlw, rlw = _label_words(q_labels, r_labels, len(q), len(codes))
    return _map_of(lambda lo, hi, bar: _aqd_ranked(q[lo:hi], codes, c, metric, topk, bar=bar), qlw, rlw, 'map (aqd)')


def evaluate_quantized(q_z, r_z, r_codes, codebooks, q_labels, r_labels, topk, metric='ip', ns=None, pr_points=None):
    """evaluate_all for product-quantized codes: MAP@K, precision/recall@N and the PR curve by rank
    position, all by AQD; the continuous-feature MAP (inner product of z, labelled). Hamming-radius
    metrics do not exist for these codes (None)."""
    ns = P_AT_N if ns is None else ns
    pr_points = PR_POINTS if pr_points is None else pr_points
    q, codes, c = _check_pq(q_z, r_codes, codebooks)
    qlw, rlw = _label_words(q_labels, r_labels, len(q), len(codes))
    n, K = len(codes), min(int(topk), len(codes))

    def ranked(lo, hi, k, bar):  # the top-k of queries lo..hi-1 by AQD
        return _aqd_ranked(q[lo:hi], codes, c, metric, k, bar=bar)
    curves = _rank_curves(lambda at: _precision_recall_of(ranked, qlw, rlw, at), n, ns, pr_points)
    return dict(
        bits=int(c.shape[0] * np.log2(c.shape[1])), num_query=int(len(q)), num_retrieval=int(n), topk=int(K),
        ranking=f'aqd-{metric}', map=_map_of(lambda lo, hi, bar: ranked(lo, hi, K, bar), qlw, rlw, 'map (aqd)'),
        map_continuous=dict(value=map_continuous(q_z, r_z, q_labels, r_labels, K), label=_CONTINUOUS_LABEL),
        radius=None, precision_radius=None, pr_curve_radius=None, **curves)


def rank_topk(z, k, n=None):
    """Top-k retrieval items of the first n queries of a codes.npz `z`: by AQD for product-quantized
    codes, by Hamming distance otherwise."""
    n = len(z['query_h']) if n is None else n
    if 'codebooks' in z:
        return aqd_rank_topk(z['query_h'][:n], z['retrieval_codes'], z['codebooks'], k, str(z['aqd']))
    return hamming_rank_topk(to_codes(z['query_h'][:n]), to_codes(z['retrieval_h']), k)


# -----------------------------------------------------------------------------
# plots (Agg canvas, no pyplot state)
def _figure(w, h, dpi=100):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=dpi)


def plot_curves(curves, path, kind='pr', title=None):
    """One line per method or code length (Figure 3: kind='pr', precision over recall;
    Figure 4: kind='pn', precision over the number N of returned images). 600 x 450 px."""
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    for label, cur in curves.items():
        x = cur['recall'] if kind == 'pr' else cur['n']
        ax.plot(x, cur['precision'], marker='.', markersize=3, label=label)
    ax.set_xlabel('Recall' if kind == 'pr' else 'Number of top returned images N')
    ax.set_ylabel('Precision')
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or ('Precision-recall' if kind == 'pr' else 'Precision@N'))
    fig.tight_layout()
    fig.savefig(path)
    return path


def _framed(img, color, width):
    """The image as H x W x 3 uint8 inside a border of `color` (RGB) `width` pixels wide."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    out = np.empty((img.shape[0] + 2 * width, img.shape[1] + 2 * width, 3), np.uint8)
    out[:] = color
    out[width:width + img.shape[0], width:width + img.shape[1]] = img[:, :, :3]
    return out


def plot_top10(query_img, retrieved_imgs, correct, path):
    """Figure 6: the query and its top-10 retrieved images, each framed green (relevant) or red."""
    fig = _figure(1.4 * (1 + len(retrieved_imgs)), 1.8)
    panels = [('query', _framed(query_img, (255, 255, 255), 0))]
    for i, (img, ok) in enumerate(zip(retrieved_imgs, correct)):
        w = max(2, round(0.06 * min(np.shape(img)[:2])))
        panels.append((f'{i + 1}', _framed(img, (0, 170, 0) if ok else (220, 0, 0), w)))
    for j, (name, img) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis('off')
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.02, top=0.85, wspace=0.06)
    fig.savefig(path)
    return path


def plot_top_nouns(img, words, weights, path, words_all=None, weights_all=None):
    """Figure 7: an image with its top-5 matched nouns and their weights s_{i,w} (Eq. 6) as bar
    charts, with the noun selection and, when given, without it (all nouns)."""
    charts = [('with noun selection', words, weights)]
    if words_all is not None:
        charts.append(('without noun selection', words_all, weights_all))
    fig = _figure(3 + 3.5 * len(charts), 3)
    ax = fig.add_subplot(1, 1 + len(charts), 1)
    ax.imshow(_framed(img, (255, 255, 255), 0))
    ax.axis('off')
    for j, (name, ws, vs) in enumerate(charts):
        ax = fig.add_subplot(1, 1 + len(charts), j + 2)
        ws, vs = list(ws)[:5], list(vs)[:5]
        ax.barh(range(len(ws))[::-1], vs, color='tab:blue' if j == 0 else 'tab:gray')
        ax.set_yticks(range(len(ws))[::-1], [str(w).replace('_', ' ') for w in ws], fontsize=8)
        ax.set_xlabel('weight')
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def draw_examples(run, bits, z, n):
    """Figures 6 and 7 for the first n queries of a run, at `bits`: each query with its top-10
    retrievals, and its top-5 nouns of Eq. 6 with and without the noun selection."""
    cfg = cache.read_json(os.path.join(run, f'{bits}bits', 'result.json'))['config']
    name = cfg['DATASET']
    try:  # the images dataset_extract.py read, checked against their recorded fingerprint
        images = dataset.extracted_images(cfg['CACHE_DIR'], name, DATA_PATH)
    except dataset.DataError as e:
        if DATA_PATH:  # the user named other images: refused, never drawn
            raise SystemExit(f'error: --data_path={DATA_PATH}: {e}')
        print(f'no Figure 6-7 pictures: {e}')
        return []
    except Exception as e:  # noqa: BLE001 - pictures are optional: say why there are none
        print(f'no Figure 6-7 pictures: the images of {name} cannot be read ({e})')
        return []
    q_idx, r_idx = z['query_index'][:n], z['retrieval_index']
    top, _ = rank_topk(z, min(10, len(r_idx)), n)
    paths = []
    for j, q in enumerate(q_idx):
        ret = r_idx[top[j]]
        correct = images.labels[ret] @ images.labels[q] > 0
        paths.append(plot_top10(np.asarray(images.load(q)), [np.asarray(images.load(r)) for r in ret], correct,
                                os.path.join(run, f'top10_query{j}.png')))
    if cfg.get('METHOD', 'duheg') != 'duheg' or cfg.get('EXTERNAL', 'efc') == 'none':
        return paths
    try:  # Figure 7: the weights of Eq. 6 over t_com, and over every noun
        i_feats = cache.load_features(cfg['CACHE_DIR'], name, cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'],
                                      cfg.get('VIEW_RECIPE') or 'simclr', mmap=True)
        t_com, words_com = external.run_vocabulary(dict(cfg, EXTERNAL='efc'), words=True)
        t_all, words_all = external.run_vocabulary(dict(cfg, EXTERNAL='ek'), words=True)
    except (Exception, SystemExit) as e:  # noqa: BLE001
        print(f'no Figure 7 pictures: the nouns or CLIP features of the run cannot be read ({str(e)[:200]})')
        return paths

    def top5(i, t, words):  # the five largest weights s_{i,w} of Eq. 6
        s = external.noun_weights(i[None], t, cfg['TAU1'])[0][0].numpy()
        best = np.argsort(-s, kind='stable')[:5]
        return [words[w] for w in best], s[best]

    for j, q in enumerate(q_idx):
        i = np.asarray(i_feats[q], np.float32)
        (w1, s1), (w2, s2) = top5(i, t_com, words_com), top5(i, t_all, words_all)
        paths.append(plot_top_nouns(np.asarray(images.load(q)), w1, s1, os.path.join(run, f'nouns_query{j}.png'),
                                    w2, s2))
    return paths


# -----------------------------------------------------------------------------
def _load_codes(path):
    """The arrays of one codes.npz (query_h, retrieval_h, query_labels, retrieval_labels, topk)."""
    if not os.path.exists(path):
        raise SystemExit(f'error: {path} does not exist (train.py writes it)')
    try:
        with np.load(path) as z:
            missing = {'query_h', 'retrieval_h', 'query_labels', 'retrieval_labels', 'topk'} - set(z.files)
            if missing:
                raise SystemExit(f'error: {path} lacks {sorted(missing)}: rerun train.py for that code length')
            return {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SystemExit(f'error: {path} cannot be read ({type(e).__name__}: {str(e)[:120]}): it is damaged; rerun '
                         f'train.py for that code length') from None


def _score(path, name):
    """evaluate_all on one codes.npz, and its printed line; codes or labels that cannot be scored (NaN,
    shapes that do not match) are an error naming the file."""
    try:
        return _score_codes(_load_codes(path), name)
    except ValueError as e:
        raise SystemExit(f'error: {path}: {e}: it is damaged or hand-made; rerun train.py for that code length')


def _score_codes(z, name):
    topk = TOPK or int(z['topk'])
    if 'codebooks' in z:  # DQN, DVSQ, DTQ: product-quantized codes ranked by AQD
        m = evaluate_quantized(z['query_h'], z['retrieval_h'], z['retrieval_codes'], z['codebooks'], z['query_labels'],
                               z['retrieval_labels'], topk, str(z['aqd']))
        print(f"eval {name}bits={m['bits']} map@{m['topk']}={m['map']:.4f} (AQD ranking of product-quantized codes) "
              f"p@{m['p_at_n']['n'][-1]}={m['p_at_n']['precision'][-1]:.4f} "
              f"map_continuous@{m['topk']}={m['map_continuous']['value']:.4f} (continuous features)", flush=True)
        return m
    m = evaluate_all(z['query_h'], z['retrieval_h'], z['query_labels'], z['retrieval_labels'], topk)
    print(f"eval {name}bits={m['bits']} map@{m['topk']}={m['map']:.4f} p@r{m['radius']}={m['precision_radius']:.4f} "
          f"p@{m['p_at_n']['n'][-1]}={m['p_at_n']['precision'][-1]:.4f} "
          f"map_continuous@{m['topk']}={m['map_continuous']['value']:.4f} "
          f"(continuous-output MAP, released-code ranking)",
          flush=True)
    return m


def main():
    cfg = configure(globals())
    check_ranges(globals(), _RANGES)
    if not RUN and not RUNS:
        raise SystemExit('error: give --run=<run dir> or --runs=<dir>,<dir> (see the docstring)')
    if RUN:
        dirs = bits_dirs(RUN)
        found = sorted((b, os.path.join(d, 'codes.npz')) for b, d in dirs.items()
                       if os.path.exists(os.path.join(d, 'codes.npz')))
        for d in sorted(d for d in dirs.values() if not os.path.exists(os.path.join(d, 'codes.npz'))):
            print(f'note: {d} has no codes.npz (its training did not finish): that code length is left out; '
                  f'rerun train.py')
        if not found:
            raise SystemExit(f'error: no <bits>bits/codes.npz under {RUN}')
        mixed = mixed_runs(RUN, [b for b, _ in found])
        if mixed:
            raise SystemExit(f'error: {RUN} mixes runs made from different settings or inputs ({mixed}); train '
                             f'each into its own --run_dir')
        print(f'eval run={RUN} code_lengths={[b for b, _ in found]}')
        metrics = {b: _score(p, '') for b, p in found}
        save_json(os.path.join(RUN, 'metrics.json'), dict(config=cfg, bits={str(b): m for b, m in metrics.items()}))
        plot_curves({f'{b} bits': m['pr_curve_rank'] for b, m in metrics.items()},
                    os.path.join(RUN, 'pr_curve.png'), 'pr',
                    f'Precision-recall, {os.path.basename(os.path.normpath(RUN))}')
        plot_curves({f'{b} bits': m['p_at_n'] for b, m in metrics.items()},
                    os.path.join(RUN, 'p_at_n.png'), 'pn', f'Precision@N, {os.path.basename(os.path.normpath(RUN))}')
        print(f'wrote {RUN}/metrics.json, pr_curve.png, p_at_n.png')
        bits, path = found[-1]
        z = _load_codes(path)
        if EXAMPLES and 'query_index' in z and os.path.exists(os.path.join(RUN, f'{bits}bits', 'result.json')):
            drawn = draw_examples(RUN, bits, z, EXAMPLES)
            if drawn:
                names = ', '.join(map(os.path.basename, drawn))
                print(f'wrote {len(drawn)} pictures (Figures 6-7, {bits} bits): {names}')
    if RUNS:  # one line per run at BITS (Figures 3-4 compare methods at 64 bits)
        runs = list(dict.fromkeys(os.path.normpath(r) for r in RUNS))  # keyed by the whole path: two 'run' folders stay
                                                                       # two
        for r in runs:
            if not os.path.exists(os.path.join(r, f'{BITS}bits', 'codes.npz')):
                if not os.path.isdir(r) or not bits_dirs(r):
                    raise SystemExit(f'error: {r} is not a train.py run folder (it holds no <L>bits/codes.npz): give '
                                     f'--runs the folders train.py wrote, e.g. runs/<dataset>/<name>_<key>')
                have = code_lengths(r)
                raise SystemExit(f'error: {r} has no {BITS}-bit codes ({r}/{BITS}bits/codes.npz); its code lengths: '
                                 f'{have or "none"}; choose --bits from those, or train {BITS} bits')
        datasets = {r: run_dataset(r, BITS) for r in runs}
        if len(set(datasets.values()) - {'?'}) > 1:  # '?': a run whose result.json does not say
            raise SystemExit('error: --runs mixes datasets (' + ', '.join(f'{r}: {d}' for r, d in datasets.items())
                             + '): MAP is comparable only on one dataset and split; compare runs of one dataset')
        os.makedirs(OUT, exist_ok=True)
        metrics = {}
        for run in runs:
            metrics[run] = _score(os.path.join(run, f'{BITS}bits', 'codes.npz'), f'run={run} ')
        save_json(os.path.join(OUT, f'compare_{BITS}bits.json'), dict(config=cfg, runs=metrics))
        plot_curves({k: m['pr_curve_rank'] for k, m in metrics.items()},
                    os.path.join(OUT, f'pr_curve_{BITS}bits.png'), 'pr', f'Precision-recall, {BITS} bits')
        plot_curves({k: m['p_at_n'] for k, m in metrics.items()},
                    os.path.join(OUT, f'p_at_n_{BITS}bits.png'), 'pn', f'Precision@N, {BITS} bits')
        print(f'wrote {OUT}/compare_{BITS}bits.json, pr_curve_{BITS}bits.png, p_at_n_{BITS}bits.png')


if __name__ == '__main__':
    try:
        main()
    except (OSError, ValueError, cache.CacheError) as e:
        raise SystemExit(cache.user_error(e, dict(run=RUN, out=OUT)))
