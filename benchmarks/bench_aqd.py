"""Speed of eval_hash's asymmetric-quantizer-distance ranking (the quantization baselines' MAP@K:
DQN, DVSQ, DTQ) against faiss's IndexPQ search with the same codebooks and codes, and against the
Hamming ranking of 64-bit codes, on generated data of the CIFAR-10 shape (10,000 queries, 50,000
retrieval items, 64 bits = 8 codebooks of 256 words over a 64-d embedding, top 1,000).

    python benchmarks/bench_aqd.py                    # about a minute on 2 CPU cores
    python benchmarks/bench_aqd.py --metric=l2

faiss's IndexPQ computes the same distances from its own lookup tables: the benchmark asserts
that the distances agree within TOLERANCE and that the two top-K lists differ only where
neighbouring distances are that close (faiss adds in float32, eval_hash in float64). Every method
runs ROUNDS times, interleaved, and the fastest round is reported. The last line is one parseable
result.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_hash  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
NUM_QUERY = 10000         # CIFAR-10 query set
NUM_RETRIEVAL = 50000     # CIFAR-10 retrieval set
DIM = 64                  # embedding D (methods/pq.py PQ_DIM)
BITS = 64                 # code length: BITS / 8 codebooks of 256 words
TOPK = 1000               # K of MAP@K (CIFAR-10)
METRIC = 'ip'             # AQD: ip (methods/pq.py AQD) | l2
TOLERANCE = 1e-4          # largest allowed |distance(ours) - distance(faiss)| (faiss adds in float32)
ROUNDS = 2                # interleaved timing rounds; the fastest is reported
SEED = 0                  # seed of the generated codebooks, codes and queries


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    configure(globals())
    import faiss
    rng = np.random.default_rng(SEED)
    m = BITS // 8
    codebooks = rng.standard_normal((m, 256, DIM // m)).astype(np.float32)
    codes = rng.integers(0, 256, (NUM_RETRIEVAL, m)).astype(np.uint8)
    queries = rng.standard_normal((NUM_QUERY, DIM)).astype(np.float32)
    index = faiss.IndexPQ(DIM, m, 8, faiss.METRIC_INNER_PRODUCT if METRIC == 'ip' else faiss.METRIC_L2)
    faiss.copy_array_to_vector(codebooks.ravel(), index.pq.centroids)
    index.is_trained = True
    index.add(np.concatenate([codebooks[j][codes[:, j]] for j in range(m)], 1))  # exact words: the same codes
    assert np.array_equal(faiss.vector_to_array(index.codes).reshape(NUM_RETRIEVAL, m), codes)
    b_q, b_r = (np.where(rng.random((k, BITS)) < 0.5, 1, -1).astype(np.int8) for k in (NUM_QUERY, NUM_RETRIEVAL))
    print(f"{NUM_QUERY:,} queries x {NUM_RETRIEVAL:,} items, {m} codebooks x 256 words ({BITS} bits), AQD {METRIC}, "
          f"top {TOPK}, {faiss.omp_get_max_threads()} faiss threads, {eval_hash.WORKERS} eval_hash workers")
    best = dict(ours=np.inf, faiss=np.inf, hamming=np.inf)
    for _ in range(ROUNDS):  # interleaved, so each sees the same machine load
        t, (idx, dist) = timed(lambda: eval_hash.aqd_rank_topk(queries, codes, codebooks, TOPK, METRIC))
        best['ours'] = min(best['ours'], t)
        t, (d_f, i_f) = timed(lambda: index.search(queries, TOPK))
        best['faiss'] = min(best['faiss'], t)
        t, _ = timed(lambda: eval_hash.hamming_rank_topk(b_q, b_r, TOPK))
        best['hamming'] = min(best['hamming'], t)
    d_f = -d_f if METRIC == 'ip' else d_f
    diff = float(np.abs(d_f - dist).max())
    gap = np.abs(np.diff(dist, axis=1)) <= TOLERANCE  # neighbours whose order float32 sums may swap
    near = np.zeros(dist.shape, bool)
    near[:, 1:] |= gap
    near[:, :-1] |= gap
    near[:, -1] = True  # the K-th may tie with the (K+1)-th, which neither list shows
    moved = idx != i_f
    same = bool(not (moved & ~near).any())  # every position the two lists differ at is a near tie
    ok = diff <= TOLERANCE and same
    print(f"top-{TOPK} by AQD: ours {NUM_QUERY / best['ours']:,.0f} queries/s (ties by index), faiss IndexPQ "
          f"{NUM_QUERY / best['faiss']:,.0f} q/s; ours / faiss time {best['ours'] / best['faiss']:.2f}; "
          f"Hamming top-{TOPK} of {BITS}-bit codes {NUM_QUERY / best['hamming']:,.0f} q/s; max |distance "
          f"difference| {diff:.1e}, same lists but for near ties: {same} ({moved.mean():.2%} of positions differ, "
          f"all within {TOLERANCE:g} of a neighbour)")
    print(f"bench_aqd queries={NUM_QUERY} retrieval={NUM_RETRIEVAL} bits={BITS} metric={METRIC} "
          f"ours_s={best['ours']:.3f} faiss_s={best['faiss']:.3f} hamming_s={best['hamming']:.3f} "
          f"ratio_faiss={best['ours'] / best['faiss']:.2f} max_abs_diff={diff:.2e} ok={ok}")
    if not ok:
        raise SystemExit('error: our AQD ranking and faiss IndexPQ disagree')


if __name__ == '__main__':
    main()
