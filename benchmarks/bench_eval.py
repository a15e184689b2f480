"""Speed of eval_hash.mean_average_precision against the plain per-query loop (one stable
argsort of the whole retrieval set per query, as in the DeepHash / SSDH evaluation code), on
random codes of the MS-COCO shape (5,000 queries, 117,218 retrieval items, 64 bits, 80 labels).

    python benchmarks/bench_eval.py                       # 10-30 s on 2 CPU cores
    python benchmarks/bench_eval.py --baseline_queries=5000   # time the loop on every query

The loop is timed on BASELINE_QUERIES queries and scaled to all of them (the output says so),
in rounds interleaved with the fast path so both see the same machine load; both are run on
that subset and must agree to 1e-9. The last line is one parseable result.
"""
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_hash  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
NUM_QUERY = 5000          # MS-COCO query set
NUM_RETRIEVAL = 117218    # MS-COCO retrieval set
BITS = 64                 # code length
CLASSES = 80              # MS-COCO labels
LABELS_PER_IMAGE = 2.9    # mean labels per image (MS-COCO: about 2.9, one class in half the images)
NOISE = 1.0               # noise added before sign() (1.0 gives MAP@5000 about 0.88, near the paper's MS-COCO)
TOPK = 5000               # K of MAP@K (MS-COCO)
BASELINE_QUERIES = 500    # queries the slow loop is timed on (then scaled to NUM_QUERY)
TOLERANCE = 1e-9          # largest allowed |MAP(fast) - MAP(loop)| on the same queries
ROUNDS = 10               # interleaved timing rounds of the loop and the fast path
WORKERS = 2               # eval_hash.WORKERS: threads of the fast path (the loop's BLAS uses every core too)
SEED = 0                  # seed of the generated codes and labels


def make_data(rng):
    """Multi-label labels with a skewed class frequency, and codes built from class prototypes
    (an image's code is the sign of the sum of its classes' prototypes plus noise), so that
    relevant items are near and distances tie a lot."""
    n = NUM_QUERY + NUM_RETRIEVAL
    freq = 1.0 / np.arange(1, CLASSES + 1) ** 0.9
    freq *= LABELS_PER_IMAGE / freq.sum()
    freq = np.minimum(freq, 0.55)
    labels = (rng.random((n, CLASSES)) < freq).astype(np.int8)
    empty = ~labels.any(1)
    labels[empty, rng.integers(0, CLASSES, empty.sum())] = 1  # every image has a label
    protos = rng.standard_normal((CLASSES, BITS)).astype(np.float32)
    h = labels.astype(np.float32) @ protos + NOISE * rng.standard_normal((n, BITS)).astype(np.float32)
    b = eval_hash.to_codes(h)
    return b[:NUM_QUERY], b[NUM_QUERY:], labels[:NUM_QUERY], labels[NUM_QUERY:]


def loop_ap(qb, rb, ql, rl, topk):
    """AP@K of each query the plain way: relevance and Hamming distance to the whole set,
    np.argsort(kind='stable'), AP@K of the top K. rb, rl: float32 (cast once, outside)."""
    L = qb.shape[1]
    aps = []
    for q, y in zip(qb.astype(np.float32), ql.astype(np.float32)):
        rel = (rl @ y) > 0
        hamm = 0.5 * (L - rb @ q)
        order = np.argsort(hamm, kind='stable')
        r = rel[order[:topk]]
        R = r.sum()
        hits = np.cumsum(r)
        aps.append(float(np.sum(hits / np.arange(1, len(r) + 1) * r) / R) if R else 0.0)
    return aps


def main():
    configure(globals())
    eval_hash.WORKERS = WORKERS
    rng = np.random.default_rng(SEED)
    qb, rb, ql, rl = make_data(rng)
    n_dist = len(np.unique(rb, axis=0))
    print(f'data: {NUM_QUERY} queries x {NUM_RETRIEVAL} items, {BITS} bits ({n_dist} distinct retrieval codes), '
          f'{CLASSES} labels ({rl.sum(1).mean():.2f} per image), MAP@{TOPK}; {os.cpu_count()} CPU cores')
    D = ((BITS - qb[:100].astype(np.float32) @ rb.T.astype(np.float32)) / 2).astype(np.int16)
    d_k = np.partition(D, TOPK - 1, axis=1)[:, TOPK - 1]
    print(f'ties: the distance at rank {TOPK} is shared by {np.mean((D == d_k[:, None]).sum(1)):.0f} items '
          f'on average (first 100 queries)')
    sub = min(BASELINE_QUERIES, NUM_QUERY)
    rbf, rlf = rb.astype(np.float32), rl.astype(np.float32)

    # ROUNDS interleaved rounds, so that the loop and the fast path share whatever load the
    # machine has: each round times the loop on 1/ROUNDS of its `sub` queries and
    # mean_average_precision on 1/ROUNDS of all queries (a separate call each: packing included)
    loop_cut = np.linspace(0, sub, ROUNDS + 1).astype(int)
    fast_cut = np.linspace(0, NUM_QUERY, ROUNDS + 1).astype(int)
    t_loop = t_fast = cpu_loop = cpu_fast = 0.0
    aps, map_sum = [], 0.0
    for i in range(ROUNDS):
        t, cpu = time.perf_counter(), time.process_time()
        aps += loop_ap(qb[loop_cut[i]:loop_cut[i + 1]], rbf, ql[loop_cut[i]:loop_cut[i + 1]], rlf, TOPK)
        t_loop, cpu_loop = t_loop + time.perf_counter() - t, cpu_loop + time.process_time() - cpu
        q = slice(fast_cut[i], fast_cut[i + 1])
        t, cpu = time.perf_counter(), time.process_time()
        map_sum += eval_hash.mean_average_precision(qb[q], rb, ql[q], rl, TOPK) * (q.stop - q.start)
        t_fast, cpu_fast = t_fast + time.perf_counter() - t, cpu_fast + time.process_time() - cpu
    map_fast = map_sum / NUM_QUERY
    scale = NUM_QUERY / sub
    speedup, cpu_speedup = t_loop * scale / t_fast, cpu_loop * scale / cpu_fast
    print(f'loop (per-query stable argsort): {t_loop / sub * 1e3:.2f} ms/query timed on {sub} queries, '
          f'scaled to {NUM_QUERY} queries: {t_loop * scale:.1f} s')
    print(f'eval_hash.mean_average_precision: {t_fast:.2f} s for all {NUM_QUERY} queries '
          f'({t_fast / NUM_QUERY * 1e3:.3f} ms/query, {WORKERS} threads), MAP@{TOPK} = {map_fast:.4f}')
    print(f'speedup x{speedup:.1f} wall clock, x{cpu_speedup:.1f} cpu time (all threads); '
          f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')

    map_loop = float(np.mean(aps))
    map_fast_sub = eval_hash.mean_average_precision(qb[:sub], rb, ql[:sub], rl, TOPK)
    diff = abs(map_fast_sub - map_loop)
    print(f'agreement on the same {sub} queries: loop {map_loop:.12f} fast {map_fast_sub:.12f} |diff| {diff:.2e}')

    tracemalloc.start()  # memory of one call (a separate, untimed run)
    eval_hash.mean_average_precision(qb, rb, ql, rl, TOPK)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'memory: peak {peak_mb:.0f} MiB allocated during the call (tracemalloc), '
          f'process max RSS {rss_mb:.0f} MiB (data and loop included)')

    ok = diff <= TOLERANCE
    print(f'bench_eval nq={NUM_QUERY} nr={NUM_RETRIEVAL} bits={BITS} topk={TOPK} loop_queries={sub} '
          f'loop_ms_per_query={t_loop / sub * 1e3:.3f} fast_s={t_fast:.3f} workers={WORKERS} speedup={speedup:.1f} '
          f'cpu_speedup={cpu_speedup:.1f} load={os.getloadavg()[0]:.1f} '
          f'max_abs_diff={diff:.3e} peak_mib={peak_mb:.0f} maxrss_mib={rss_mb:.0f} ok={ok}')
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
