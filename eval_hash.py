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
import glob
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import cache
import figures
from cache import save_json
from configurator import check_choice, check_ranges, configure
from runs import bits_dirs, code_lengths, mixed_runs, run_dataset

# -----------------------------------------------------------------------------
# what to evaluate
RUN = ''                 # training run directory holding <bits>bits/codes.npz; metrics.json and PNGs go there
RUNS = ()                # several run directories (comma-separated) to compare, one line each, at BITS
BITS = 64                # code length the --runs comparison draws (Figures 3-4 use 64 bits)
OUT = 'runs/compare'     # folder of the --runs comparison plots and json
TOPK = 0                 # K of MAP@K; 0 = the `topk` stored in codes.npz (1000 CIFAR-10, 5000 others)
# metrics
P_AT_N = (1,) + tuple(range(100, 1001, 100))  # N of precision@N / recall@N (Figure 4); on a retrieval set too
                                              # small for ten of them, ten more spread over it
PR_POINTS = 100          # rank positions of the precision-recall curve, evenly spread over the retrieval set
RADIUS = 2               # Hamming radius of "precision within radius" (empty set: precision 0)
# pictures (Figures 6-7), drawn by --run when the run's images can be read
EXAMPLES = 3             # queries drawn with their top-10 (Figure 6) and their top-5 nouns (Figure 7); 0: none
DATA_PATH = ''           # the dataset's images; '' -> where dataset_extract.py read them (its source.json)
# system
CHUNK = 8                # most queries ranked at once (8 is the fastest on a 2-core CPU: a chunk stays in cache)
MEM_MB = 512             # memory one chunk of one worker may use: chunks shrink as the retrieval set grows
WORKERS = 2              # threads, each ranking its own block of queries (numpy releases the GIL)
SUBSAMPLE = 32           # every SUBSAMPLE-th item estimates a query's top-K threshold (results never depend on it)
KERNEL = 'auto'          # ranking code: numba (hamming.py, compiled), numpy, or auto: numba when installed and the
                         # evaluation has _COMPILED_PAIRS (query, item) pairs; both give the same results to the bit

_RANGES = dict(BITS='[1, 1024]', TOPK='[0, inf)', P_AT_N='[1, inf)', PR_POINTS='[2, inf)', RADIUS='[0, inf)',
               EXAMPLES='[0, inf)', CHUNK='[1, inf)', MEM_MB='[1, inf)', WORKERS='[1, inf)', SUBSAMPLE='[1, inf)')
_COMPILED_PAIRS = 50_000_000  # below this, loading the compiled kernels (~0.5 s) costs more than they save
_CONTINUOUS_LABEL = ("continuous-output MAP (authors' released evaluation: ranks by the tanh outputs "
                    "without sign(); not the paper's binary-code MAP)")


# -----------------------------------------------------------------------------
# codes, packing, ranking
def _sign_bits(h):
    """sign(h) >= 0 as bool (sign(0) = +1), after the checks of to_codes: one pass over h."""
    h = np.asarray(h)
    if h.dtype.kind == 'f' and not np.isfinite(h).all():
        raise ValueError('hash outputs hold NaN or infinite values')
    if h.dtype.kind in 'biu' and (h == 0).any():
        raise ValueError('integer codes must be -1/+1, not 0/1 bits (map them with 2 * bits - 1)')
    return h >= 0


def to_codes(h):
    """Hash codes b = sign(h) in {-1, +1} as int8, with sign(0) = +1 (Section 3.3). Takes the
    continuous outputs h or +-1 codes; integer 0/1 bit codes are refused (sign would make them all +1)."""
    return np.where(_sign_bits(h), 1, -1).astype(np.int8)


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
    return np.packbits(_sign_bits(h), axis=1)


def _words(packed, dtype=None):
    """Packed bits uint8 [N, B] as words [W, N] of uint8/16/32/64, the narrowest that holds B bytes unless `dtype`
    says (zero-padded: padding never counts in a Hamming distance, nor in a shared label)."""
    n, size = packed.shape
    dtype = dtype or (np.uint8 if size <= 1 else np.uint16 if size <= 2 else np.uint32 if size <= 4 else np.uint64)
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
    q, r = _sign_bits(q_codes), _sign_bits(r_codes)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f'query codes {q.shape} and retrieval codes {r.shape} must be N x L with the same L')
    return _words(np.packbits(q, axis=1)), _words(np.packbits(r, axis=1)), q.shape[1]


def _blocks(fn, nq, desc, workers=None):
    """fn(lo, hi, bar) on WORKERS (or `workers`) contiguous blocks of the nq queries, one thread each (numpy
    releases the GIL; each block keeps its own buffers); the list of the blocks' results."""
    if nq < 1:
        raise ValueError('no queries')
    edges = np.linspace(0, nq, min(workers or WORKERS, nq) + 1).astype(int)
    with tqdm(total=nq, desc=desc, leave=False, disable=None) as bar, ThreadPoolExecutor(len(edges) - 1) as ex:
        return list(ex.map(lambda lo, hi: fn(lo, hi, bar), edges[:-1], edges[1:]))


def _compiled(pairs):
    """hamming.py's compiled kernels (numba) when KERNEL asks for them ('numba'), or allows them ('auto') and the
    evaluation has at least _COMPILED_PAIRS (query, item) pairs and numba is installed; None: the numpy path."""
    if KERNEL == 'numpy' or (KERNEL == 'auto' and pairs < _COMPILED_PAIRS):
        return None
    try:
        import hamming
    except ImportError as e:
        if KERNEL == 'numba':
            raise ImportError(f'KERNEL=numba needs numba ({e}): pip install numba, or use --kernel=auto') from None
        return None
    return hamming


def _compiled_run(kernel, nq, args, scratch, desc, chunk=None):
    """kernel(*args[:2], s, e, *args[2:], *scratch()) on chunks of 64 (or `chunk`) of the nq queries, in _blocks'
    threads, each thread with its own scratch arrays (the kernels release the GIL)."""
    c = chunk or 64

    def block(lo, hi, bar):
        work = scratch()
        for s in range(lo, hi, c):
            kernel(*args[:2], s, min(s + c, hi), *args[2:], *work)
            bar.update(min(s + c, hi) - s)
    _blocks(block, nq, desc)


def _wide(words):
    """Words [W, N] of any width as uint64 words [W', N]: the compiled kernels' one type, so each is compiled once."""
    return _words(np.ascontiguousarray(words.T).view(np.uint8), np.uint64)


def _class_bits(qlw, rlw, items=65536):
    """Label words as the compiled kernels read them: each query's classes (uint8 [nq, C], 0/1) and each class's
    items as bits (uint64 [C, ceil(n / 64)], bit j % 64 of word j // 64): a query's relevant items are the OR of a
    few rows that stay in the core's cache, instead of one label load an item. Built `items` items at a time."""
    ql, rl = (np.ascontiguousarray(w.T).view(np.uint8) for w in (qlw, rlw))
    cls = np.zeros((ql.shape[1] * 8, -(-rl.shape[0] // 64) * 8), np.uint8)
    for s in range(0, rl.shape[0], items):
        part = np.unpackbits(rl[s:s + items], axis=1).T
        cls[:, s // 8:s // 8 + -(-part.shape[1] // 8)] = np.packbits(part, axis=1, bitorder='little')
    return np.unpackbits(ql, axis=1), cls.view('<u8')


# the reference: one query at a time, a stable argsort of its distances (DeepHash's CalcTopMap); the
# fast chunked path below gives the same lists and the same MAP (tests/test_eval.py holds them equal)
def hamming_rank_reference(q_codes, r_codes, k):
    """Top-k retrieval items of each query by Hamming distance, ties by index, the plain way: (idx int64
    [nq, k], dist int32 [nq, k]), k cut at the retrieval size."""
    q, r = to_codes(q_codes).astype(np.int64), to_codes(r_codes).astype(np.int64)
    k = min(int(k), len(r))
    idx, dist = np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.int32)
    for i, b in enumerate(q):
        d = (q.shape[1] - r @ b) // 2             # Hamming distance = (L - <b_q, b_r>) / 2
        idx[i] = np.argsort(d, kind='stable')[:k]  # a stable sort: ties in retrieval index order
        dist[i] = d[idx[i]]
    return idx, dist


def mean_average_precision_reference(q_codes, r_codes, q_labels, r_labels, topk):
    """MAP@K of the reference ranking: per query AP@K = (1/R) sum_k precision(k) rel(k) over its top K, R the
    relevant items among them (AP = 0 when R = 0); relevant = at least one shared label."""
    qy, ry = np.asarray(q_labels), np.asarray(r_labels)
    if qy.ndim == 1:  # class indices: one-hot rows
        qy, ry = (np.eye(int(max(qy.max(), ry.max())) + 1)[y] for y in (qy, ry))
    idx, _ = hamming_rank_reference(q_codes, r_codes, topk)
    aps = []
    for i, y in zip(idx, qy.astype(np.float64)):
        rel = ry[i].astype(np.float64) @ y > 0     # relevance of the ranked items
        hits = np.cumsum(rel)
        aps.append(np.sum(hits / np.arange(1, len(rel) + 1) * rel) / hits[-1] if hits[-1] else 0.0)
    return float(np.mean(aps))


# the fast path: distances tile by tile, then the top K found by counting, not by sorting every row
_TILE = 8192  # retrieval items per distance tile: the tile's XOR words stay in the core's cache
_MAG = np.uint64(0x0102040810204080)  # (w * _MAG) >> 56: the low bits of the 8 bytes of w as one byte


_BYTE_POS, _BYTE_COUNT = np.zeros((8, 256), np.intp), np.zeros(256, np.intp)  # by pattern: j-th candidate, count
for _b in np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder='little'):
    _p, _at = int((np.ascontiguousarray(_b).view(np.uint64) * _MAG >> np.uint64(56))[0]), np.flatnonzero(_b)
    _BYTE_POS[:len(_at), _p], _BYTE_COUNT[_p] = _at, len(_at)


def _distances(qw, rw, s, e, D, buf):
    """D[:e-s, :n] = Hamming distances popcount(b_q xor b_r) of the queries s..e-1 of qw to every item
    of rw, one column tile at a time (buf [c, _TILE] holds a tile's XOR words); returns D[:e-s]."""
    c, n = e - s, rw.shape[1]
    for a in range(0, n, _TILE):
        b = min(a + _TILE, n)
        x = buf[:c, :b - a]
        np.bitwise_xor(qw[0, s:e, None], rw[0, None, a:b], out=x)
        np.bitwise_count(x, out=D[:c, a:b])
        for w in range(1, len(rw)):
            np.bitwise_xor(qw[w, s:e, None], rw[w, None, a:b], out=x)
            D[:c, a:b] += np.bitwise_count(x)
    return D[:c]


def _distance_buffers(c, n, L, dtype):
    """A chunk's distance rows [c, n rounded up to 8] (padding L + 1, above every distance), its XOR tile."""
    D = np.full((c, -(-n // 8) * 8), L + 1, np.uint8 if L < 255 else np.uint16)
    return D, np.empty((c, min(_TILE, n)), dtype)


def _distance_chunks(qw, rw, L, chunk=None, bar=None):
    """Yield (s, e, D): Hamming distances D [e-s, n] of the queries s..e-1 of qw to every item of rw."""
    nq, n = qw.shape[1], rw.shape[1]
    c = _chunk_size(n, chunk)
    D, buf = _distance_buffers(c, n, L, rw.dtype)  # reused: fresh large arrays cost page faults
    for s in range(0, nq, c):
        e = min(s + c, nq)
        yield s, e, _distances(qw, rw, s, e, D, buf)[:, :n]
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
    for r in range(c):  # each row's candidates sorted, ties in index order (they are in index order)
        v = val[start[r]:start[r] + count[r]]
        o = np.argsort(v)  # the fast (unstable) sort: equal to the stable one when no two values tie
        if (v[o[1:]] == v[o[:-1]]).any():
            o = np.argsort(v, kind='stable')
        o = start[r] + o[:k]
        idx[r], top[r] = pos[o] - r * n, val[o]
    return idx, top


def _candidate_keys(D, t, L, mask):
    """Every item of row r of D [c, n8] at distance <= t[r] as keys r << (cb + db) | d << cb | column, sorted: (keys,
    cb, db). Words of 8 distances holding a candidate come first (a nonzero over n8 / 8), their candidates next."""
    c, n8 = D.shape
    cb, db = max(1, (n8 - 1).bit_length()), max(1, (L + 1).bit_length())
    words = np.less_equal(D, t.astype(D.dtype)[:, None], out=mask[:c]).view(np.uint64).ravel()  # 1: candidate
    nzw = np.flatnonzero(words != 0)
    p = (np.take(words, nzw) * _MAG >> np.uint64(56)).view(np.intp)  # each word's pattern of candidate bytes
    rows = np.searchsorted(nzw, np.arange(c + 1) * (n8 // 8))
    base = nzw * 8                                       # position in D of each word's first item
    kw = base + np.repeat(np.arange(c) * ((1 << (cb + db)) - n8), np.diff(rows))  # its key at distance 0
    count, sel, pos, keys = np.take(_BYTE_COUNT, p), None, [], []
    for j in range(8):  # the j-th candidate of every word that has more than j
        if j:
            sel = np.flatnonzero(count > j) if sel is None else sel[np.take(count, sel) > j]
            if not len(sel):
                break
        off = np.take(_BYTE_POS[j], p if sel is None else np.take(p, sel))
        pos.append(off + (base if sel is None else np.take(base, sel)))
        keys.append(np.add(off, kw if sel is None else np.take(kw, sel), out=off))
    key = np.concatenate(keys)
    key += np.left_shift(np.take(D.ravel(), np.concatenate(pos)), cb, dtype=np.intp)
    key = key.astype(np.uint32 if (c - 1).bit_length() + cb + db <= 32 else np.uint64)
    key.sort()
    return key, cb, db


def _hamming_topk(D, k, L, n, mask):
    """The k smallest (distance, index) of each row of D [c, n8] as keys row|distance|index [c, k], and (cb, db): a
    threshold t per row from a column sample, every item with d <= t (_candidate_keys), the first k kept."""
    c = len(D)
    sample = D[:, :n:SUBSAMPLE].astype(np.uint16)
    j = min(sample.shape[1] - 1, 5 * k // (4 * SUBSAMPLE) + 4)
    t = np.partition(sample, j, axis=1)[:, j]
    key, cb, db = _candidate_keys(D, t, L, mask)
    starts = np.searchsorted(key, (np.arange(c + 1) << (cb + db)).astype(key.dtype))
    top = np.take(key, starts[:-1, None] + np.arange(k), mode='clip')  # a short row's tail: redone below
    short = np.flatnonzero(np.diff(starts) < k)
    if len(short):  # estimate too low: those rows again at their exact k-th smallest distance
        exact = np.partition(D[short, :n].astype(np.uint16), k - 1, axis=1)[:, k - 1]  # (u16: a fast partition)
        key, _, _ = _candidate_keys(D[short], exact, L, mask)
        starts = np.searchsorted(key, (np.arange(len(short)) << (cb + db)).astype(key.dtype))
        top[short] = np.take(key, starts[:, None] + np.arange(k))
    return top, cb, db


def _ranked_chunks(qw, rw, L, k, chunk=None, bar=None, dist=True):
    """Yield (s, e, idx, dist): the top-k of queries s..e-1 by (Hamming distance, index); dist None if not asked."""
    nq, n = qw.shape[1], rw.shape[1]
    k = min(int(k), n)
    c = _chunk_size(n, chunk)
    D, buf = _distance_buffers(c, n, L, rw.dtype)  # reused: fresh large arrays cost page faults
    mask = np.empty(D.shape, bool)
    for s in range(0, nq, c):
        e = min(s + c, nq)
        Dc = _distances(qw, rw, s, e, D, buf)
        if 4 * k >= n:  # most of the row: one stable sort per row
            idx, d = _topk_rows(Dc[:, :n], k)
        else:
            top, cb, db = _hamming_topk(Dc, k, L, n, mask)
            idx, d = (top & ((1 << cb) - 1)).astype(np.intp), (top >> cb) & ((1 << db) - 1) if dist else None
        yield s, e, idx, d if d is None else d.astype(np.int32)
        if bar is not None:
            bar.update(e - s)


def hamming_rank_topk(q_codes, r_codes, k, chunk=None, device=None):
    """Top-k retrieval indices of every query by Hamming distance, ties by retrieval index (a stable sort on
    distance): (idx int64 [nq, k], dist int32 [nq, k]), k cut at the retrieval size; result nq * k * 12 bytes.
    device: None for numpy on the CPU, or a torch device ('cuda') for the same ranking there (_torch_ranked)."""
    if device is not None:
        parts = list(_torch_ranked(q_codes, r_codes, k, device, chunk))
        return np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
    qw, rw, L = _code_words(q_codes, r_codes)
    return _rank_words(qw, rw, L, k, chunk)


def _torch_ranked(q_codes, r_codes, k, device, chunk=None, bar=None):
    """Yield (s, e, idx, dist) as _ranked_chunks, with torch on `device` (a GPU): distances (L - <b_q, b_r>) / 2
    by a product of the +-1 codes (exact in float32), the k smallest keys distance * n + index by torch.topk."""
    import torch
    q = torch.as_tensor(to_codes(q_codes), device=device).float()
    r = torch.as_tensor(to_codes(r_codes), device=device).float()
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f'query codes {tuple(q.shape)} / retrieval codes {tuple(r.shape)}: N x L with one L')
    n, L = r.shape
    k = min(int(k), n)
    c = int(chunk or max(1, min(4096, (MEM_MB << 20) // (16 * n))))  # float32 products and int64 keys
    col = torch.arange(n, device=device)
    for s in range(0, len(q), c):
        e = min(s + c, len(q))
        d = (L - q[s:e] @ r.T).to(torch.int64) // 2  # Hamming distance, exact
        top = torch.topk(d * n + col, k, dim=1, largest=False, sorted=True).values
        yield s, e, (top % n).cpu().numpy(), (top // n).to(torch.int32).cpu().numpy()
        if bar is not None:
            bar.update(e - s)


def hamming_rank_packed(q_packed, r_packed, k, chunk=None):
    """hamming_rank_topk of codes already packed by `pack` (uint8 [N, L / 8]), as search.py keeps them."""
    return _rank_words(_words(q_packed), _words(r_packed), 8 * r_packed.shape[1], k, chunk)


def _rank_words(qw, rw, L, k, chunk=None):
    k = min(int(k), rw.shape[1])
    idx, dist = np.empty((qw.shape[1], k), np.int64), np.empty((qw.shape[1], k), np.int32)
    h = _compiled(qw.shape[1] * rw.shape[1])
    if h is not None:  # the same lists, compiled
        _compiled_run(h.rank, len(idx), (_wide(qw), _wide(rw), k, SUBSAMPLE, idx, dist),
                      lambda: h.scratch(rw.shape[1], k, L)[:4], 'rank', chunk)
        return idx, dist

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
        x = rlw[w][None, :] & qlw[w][:, None] if idx is None else np.take(rlw[w], idx) & qlw[w][:, None]
        g = x if g is None else np.bitwise_or(g, x, out=g)
    return g != 0


def _average_precision(rel):
    """AP@K of each row of a ranked relevance matrix rel [c, K]: (1/R) sum_k precision(k) rel(k),
    R the relevant items in the top K, AP = 0 when R = 0 (MAP, Section 4.2.1). The floating-point
    operations of mean_average_precision_reference, in its order: the same value to the last bit."""
    hits = np.cumsum(rel, axis=1, dtype=np.float64)  # relevant items up to each rank
    R = hits[:, -1].copy()
    hits /= np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    hits *= rel
    s = hits.sum(1)
    return np.where(R > 0, s / np.maximum(R, 1), 0.0)


def mean_average_precision(q_codes, r_codes, q_labels, r_labels, topk, device=None):
    """MAP@K (Table 1) of Hamming ranking: mean over queries of AP@K, K = topk cut at the retrieval size;
    continuous outputs become codes by sign() first. device: a torch device (a GPU) ranks there (_torch_ranked)."""
    qw, rw, L = _code_words(q_codes, r_codes)
    qlw, rlw = _label_words(q_labels, r_labels, qw.shape[1], rw.shape[1])
    h = _compiled(qw.shape[1] * rw.shape[1]) if device is None else None
    if h is not None:  # the same AP@K of each query, compiled (hamming.average_precisions)
        k, ap = min(int(topk), rw.shape[1]), np.empty(qw.shape[1])
        _compiled_run(h.average_precisions, len(ap), (_wide(qw), _wide(rw), k, SUBSAMPLE, *_class_bits(qlw, rlw), ap),
                      lambda: h.scratch(rw.shape[1], k, L), 'map')
        return float(ap.mean())
    if device is not None:
        return _map_of(lambda lo, hi, bar: _torch_ranked(np.asarray(q_codes)[lo:hi], r_codes, topk, device, bar=bar),
                       qlw, rlw, 'map', workers=1)
    return _map_of(lambda lo, hi, bar: _ranked_chunks(qw[:, lo:hi], rw, L, topk, bar=bar, dist=False), qlw,
                   rlw, 'map')


def _map_of(ranked, qlw, rlw, desc, workers=None):
    """MAP@K of a ranking: ranked(lo, hi, bar) yields (s, e, idx, _), the top-K retrieval items of the
    queries lo + s .. lo + e - 1 in rank order. The one AP@K code of every method (Hamming or AQD)."""
    def block(lo, hi, bar):
        return [_average_precision(_relevance(qlw[:, lo + s:lo + e], rlw, idx)) for s, e, idx, _ in ranked(lo, hi, bar)]
    return float(np.concatenate(sum(_blocks(block, qlw.shape[1], desc, workers), [])).mean())


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
    h = _compiled(qw.shape[1] * rw.shape[1])

    def hits_at(cut):  # the same hits at each N, compiled (hamming.hits_at)
        hits = np.zeros((qw.shape[1], len(cut)), np.int64)
        _compiled_run(h.hits_at, len(hits), (_wide(qw), _wide(rw), cut, SUBSAMPLE, *_class_bits(qlw, rlw), hits),
                      lambda: h.scratch(rw.shape[1], int(cut[-1]), L)[:6], 'p@n')
        return hits
    return _precision_recall_of(lambda lo, hi, k, bar: _ranked_chunks(qw[:, lo:hi], rw, L, k, bar=bar, dist=False), qlw,
                                rlw, ns, hits_at if h is not None else None)


def _relevant_totals(qlw, rlw):
    """Relevant items in the whole retrieval set of each query [nq]: through the distinct label sets of the
    retrieval items (a few hundred or thousand, not every item), each with its count."""
    sets, counts = np.unique(rlw.T, axis=0, return_counts=True)
    sets = np.ascontiguousarray(sets.T)
    c = max(1, (MEM_MB << 20) // (8 * len(rlw) * max(1, sets.shape[1])))
    return np.concatenate([_relevance(qlw[:, s:s + c], sets) @ counts for s in range(0, qlw.shape[1], c)])


def _precision_recall_of(ranked, qlw, rlw, ns, hits_at=None):
    """precision_recall_at of a ranking: ranked(lo, hi, k, bar) yields (s, e, idx, _) as in _map_of; or hits_at(cut),
    the relevant items among the first cut[u] of each query [nq, len(cut)] (the compiled kernel)."""
    nq, n = qlw.shape[1], rlw.shape[1]
    ns = np.clip(np.asarray(ns, np.int64), 1, n)
    cut = np.unique(ns)  # hits at each N: relevant items in the segments between sorted N, added up
    hits, total = np.zeros((nq, len(cut)), np.int64), _relevant_totals(qlw, rlw).astype(np.float64)

    def block(lo, hi, bar):
        for s, e, idx, _ in ranked(lo, hi, int(cut[-1]), bar):
            rel = _relevance(qlw[:, lo + s:lo + e], rlw, idx).view(np.uint8)  # [c, k] in rank order
            seg = np.add.reduceat(rel, np.concatenate([[0], cut[:-1]]), axis=1, dtype=np.int64)
            hits[lo + s:lo + e] = np.cumsum(seg, axis=1)
    if hits_at:
        hits = hits_at(cut)
    else:
        _blocks(block, nq, 'p@n')
    hits = hits[:, np.searchsorted(cut, ns)]
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
    h = _compiled(nq * rw.shape[1])
    if h is not None:  # the same counts, compiled
        _compiled_run(h.radius_counts, nq, (_wide(qw), _wide(rw), *_class_bits(qlw, rlw), within, rel_within, total),
                      lambda: h.scratch(rw.shape[1], 1, L)[0:5:4], 'radius')
        return within, rel_within, total

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


def p_at_n_values(ns, n, least=10):
    """The N of precision@N (Figure 4) on n retrieval items: those of `ns` (P_AT_N) up to n, and when
    fewer than `least` remain (a small set), `least` more spread evenly over 1..n, so the curve has
    at least `least` points (every N on a set of fewer items)."""
    kept = np.unique(np.clip(np.asarray(ns, np.int64), 1, n))
    if len(kept) < least:
        kept = np.unique(np.concatenate([kept, np.linspace(1, n, least).round().astype(np.int64)]))
    return kept


def _rank_curves(precision_recall, n, ns, pr_points):
    """Precision/recall@N at the N of `ns` (Figure 4) and the PR curve at `pr_points` rank positions
    spread over the n retrieval items (Figure 3), from one ranking: precision_recall(positions) is
    precision_recall_at (or its AQD twin) at the sorted positions. Returns dict(p_at_n,
    pr_curve_rank, queries_without_relevant)."""
    positions = np.unique(np.linspace(1, n, pr_points).round().astype(np.int64))
    n_at = p_at_n_values(ns, n)
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
    """Yield (s, e, idx, dist): the top-k items of queries s..e-1 by (AQD, index). The distance of query q to
    item r is sum_m T[q, m, code_rm] in subspace order, gathered as rows of T.T (a word's term for each query)."""
    n, (m, w) = len(codes), codebooks.shape[:2]
    h = _compiled(len(q_z) * n)
    if h is not None:  # the same lists, compiled
        yield from _aqd_compiled(h, q_z, codes, codebooks, metric, k, chunk, bar)
        return
    c = max(1, _chunk_size(n, chunk) // 2)  # float64 distances and the gathered term: 16 bytes per pair
    rows = np.ascontiguousarray((codes + w * np.arange(m)).T)  # [M, n]: rows of the tables [M * K, c]
    tile = 2048  # items gathered at once: their rows stay in cache
    for s in range(0, len(q_z), c):
        e = min(s + c, len(q_z))
        tT = np.ascontiguousarray(aqd_tables(q_z[s:e], codebooks, metric).reshape(e - s, -1).T)
        D, acc, x = np.empty((e - s, n)), np.empty((tile, e - s)), np.empty((tile, e - s))
        for a in range(0, n, tile):
            b = min(a + tile, n)  # (indices checked by _check_pq)
            d = np.take(tT, rows[0, a:b], axis=0, out=acc[:b - a], mode='wrap')
            for j in range(1, m):
                d += np.take(tT, rows[j, a:b], axis=0, out=x[:b - a], mode='wrap')
            D[:, a:b] = d.T
        yield s, e, *_topk_rows(D, k)
        if bar is not None:
            bar.update(e - s)


def _aqd_compiled(h, q_z, codes, codebooks, metric, k, chunk=None, bar=None):
    """_aqd_ranked by hamming.aqd_rank: the lookup tables of 64 queries (or `chunk`) at a time, a pass per query."""
    n, k = len(codes), min(int(k), len(codes))
    codes_t = np.ascontiguousarray(codes.T, np.uint8 if codebooks.shape[1] <= 256 else np.int32)  # [M, n]
    work, c = h.scratch(n, k, 0, 'aqd'), chunk or 64
    for s in range(0, len(q_z), c):
        e = min(s + c, len(q_z))
        idx, dist = np.empty((e - s, k), np.int64), np.empty((e - s, k))
        h.aqd_rank(np.ascontiguousarray(aqd_tables(q_z[s:e], codebooks, metric)), codes_t, k, SUBSAMPLE, idx, dist,
                   *work)
        yield s, e, idx, dist
        if bar is not None:
            bar.update(e - s)


def aqd_rank_topk(q_z, r_codes, codebooks, k, metric='ip'):
    """Top-k retrieval indices of every query by asymmetric quantizer distance, ties by retrieval
    index: (idx int64 [nq, k], dist float64 [nq, k])."""
    q, codes, c = _check_pq(q_z, r_codes, codebooks)
    k = min(int(k), len(codes))
    idx, dist = np.empty((len(q), k), np.int64), np.empty((len(q), k))

    def block(lo, hi, bar):
        for s, e, i, d in _aqd_ranked(q[lo:hi], codes, c, metric, k, bar=bar):
            idx[lo + s:lo + e], dist[lo + s:lo + e] = i, d
    _blocks(block, len(q), 'rank (aqd)')
    return idx, dist


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


def map_text(value, topk, n):
    """MAP@K as train.py and eval_hash.py print it: K as asked (the dataset's K, or --topk) whatever the
    size n of the retrieval set, and a note when K was cut to it: 'map@1000=0.7955 (K cut to the 45
    retrieval items)'."""
    return f"map@{topk}={value:.4f}" + (f" (K cut to the {n} retrieval items)" if topk > n else '')


def _score(path, name):
    """evaluate_all on one codes.npz, and its printed line: (metrics, line); codes or labels that cannot be
    scored (NaN, shapes that do not match) are an error naming the file."""
    try:
        return _score_codes(_load_codes(path), name)
    except ValueError as e:
        raise SystemExit(f'error: {path}: {e}: it is damaged or hand-made; rerun train.py for that code length')


def _score_codes(z, name):
    topk = TOPK or int(z['topk'])
    if 'codebooks' in z:  # DQN, DVSQ, DTQ: product-quantized codes ranked by AQD
        m = evaluate_quantized(z['query_h'], z['retrieval_h'], z['retrieval_codes'], z['codebooks'], z['query_labels'],
                               z['retrieval_labels'], topk, str(z['aqd']))
        return m, (f"eval {name}bits={m['bits']} {map_text(m['map'], topk, m['num_retrieval'])} (AQD ranking of "
                   f"product-quantized codes) p@{m['p_at_n']['n'][-1]}={m['p_at_n']['precision'][-1]:.4f} "
                   f"map_continuous@{topk}={m['map_continuous']['value']:.4f} (continuous features)")
    m = evaluate_all(z['query_h'], z['retrieval_h'], z['query_labels'], z['retrieval_labels'], topk)
    p_at_n = f"p@{m['p_at_n']['n'][-1]}={m['p_at_n']['precision'][-1]:.4f}"
    return m, (f"eval {name}bits={m['bits']} {map_text(m['map'], topk, m['num_retrieval'])} "
               f"p@r{m['radius']}={m['precision_radius']:.4f} {p_at_n} map_continuous@{topk}="
               f"{m['map_continuous']['value']:.4f} (continuous-output MAP, released-code ranking)")


def run_codes(run):
    """[(bits, codes.npz)] of a run folder's finished code lengths (a note for each unfinished one); none
    is an error that lists the run folders found below `run` (runs/<dataset>/<run>: up to two levels)."""
    dirs = bits_dirs(run)
    found = sorted((b, os.path.join(d, 'codes.npz')) for b, d in dirs.items()
                   if os.path.exists(os.path.join(d, 'codes.npz')))
    for d in sorted(d for d in dirs.values() if not os.path.exists(os.path.join(d, 'codes.npz'))):
        print(f'note: {d} has no codes.npz (its training did not finish): that code length is left out; '
              f'rerun train.py')
    if found:
        return found
    below = sorted({os.path.dirname(os.path.dirname(p)) for depth in ('*', '*/*')
                    for p in glob.glob(os.path.join(glob.escape(run), depth, '*bits', 'codes.npz'))})
    if below:
        more = f' and {len(below) - 8} more' if len(below) > 8 else ''
        raise SystemExit(f"error: no <bits>bits/codes.npz under {run}: it holds {len(below)} run folder(s), "
                         f"{', '.join(below[:8])}{more}; give one of them as --run")
    raise SystemExit(f"error: no <bits>bits/codes.npz under {run}{'' if os.path.isdir(run) else ' (no such folder)'}"
                     f": give --run the folder train.py wrote (its run=... line, or --run_dir)")


def eval_run(cfg):
    """--run: metrics.json, the PR and P@N plots and Figures 6-7 of a run's code lengths; then how to
    open its search page, and last the MAP line of each code length."""
    found = run_codes(RUN)
    mixed = mixed_runs(RUN, [b for b, _ in found])
    if mixed:
        raise SystemExit(f'error: {RUN} mixes runs made from different settings or inputs ({mixed}); train '
                         f'each into its own --run_dir')
    print(f'eval run={RUN} code_lengths={[b for b, _ in found]}')
    scored = {b: _score(p, '') for b, p in found}
    metrics = {b: m for b, (m, _) in scored.items()}
    save_json(os.path.join(RUN, 'metrics.json'), dict(config=cfg, bits={str(b): m for b, m in metrics.items()}))
    name = os.path.basename(os.path.normpath(RUN))
    figures.plot_curves({f'{b} bits': m['pr_curve_rank'] for b, m in metrics.items()},
                os.path.join(RUN, 'pr_curve.png'), 'pr', f'Precision-recall, {name}')
    figures.plot_curves({f'{b} bits': m['p_at_n'] for b, m in metrics.items()},
                os.path.join(RUN, 'p_at_n.png'), 'pn', f'Precision@N, {name}')
    print(f'wrote {RUN}/metrics.json, pr_curve.png, p_at_n.png')
    bits, path = found[-1]
    z = _load_codes(path)
    result = os.path.join(RUN, f'{bits}bits', 'result.json')
    if EXAMPLES and 'query_index' in z and os.path.exists(result):
        top = rank_topk(z, min(10, len(z['retrieval_index'])), EXAMPLES)[0]  # Figure 6's top-10 of each query
        drawn = figures.draw_examples(RUN, bits, z, top, DATA_PATH)
        if drawn:
            print(f"wrote {len(drawn)} pictures (Figures 6-7, {bits} bits): {', '.join(map(os.path.basename, drawn))}")
    if os.path.exists(result):
        with open(result) as f:
            run_cfg = json.load(f).get('config', {})
        if run_cfg.get('METHOD', 'duheg') == 'duheg' and 'DATASET' in run_cfg:  # Hv and He: images and words
            print(f"search page: python search.py --run={RUN} --bits={bits} --images=dataset:{run_cfg['DATASET']} "
                  f"--index={os.path.normpath(RUN)}_index --serve (then open the address it prints)")
    for _, line in scored.values():
        print(line, flush=True)


def main():
    cfg = configure(globals())
    check_ranges(globals(), _RANGES)
    check_choice('kernel', KERNEL, ('auto', 'numba', 'numpy'))
    if not RUN and not RUNS:
        raise SystemExit('error: give --run=<run dir> or --runs=<dir>,<dir> (see the docstring)')
    if RUN:
        eval_run(cfg)
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
            metrics[run], line = _score(os.path.join(run, f'{BITS}bits', 'codes.npz'), f'run={run} ')
            print(line, flush=True)
        save_json(os.path.join(OUT, f'compare_{BITS}bits.json'), dict(config=cfg, runs=metrics))
        figures.plot_curves({k: m['pr_curve_rank'] for k, m in metrics.items()},
                    os.path.join(OUT, f'pr_curve_{BITS}bits.png'), 'pr', f'Precision-recall, {BITS} bits')
        figures.plot_curves({k: m['p_at_n'] for k, m in metrics.items()},
                    os.path.join(OUT, f'p_at_n_{BITS}bits.png'), 'pn', f'Precision@N, {BITS} bits')
        print(f'wrote {OUT}/compare_{BITS}bits.json, pr_curve_{BITS}bits.png, p_at_n_{BITS}bits.png')


if __name__ == '__main__':
    try:
        main()
    except (OSError, ValueError, cache.CacheError) as e:
        raise SystemExit(cache.user_error(e, dict(run=RUN, out=OUT)))
