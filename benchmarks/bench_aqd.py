"""Speed of eval_hash's asymmetric-quantizer-distance ranking (the quantization baselines' MAP@K:
DQN, DVSQ, DTQ) against faiss's IndexPQ search with the same codebooks and codes, and against the
Hamming ranking of 64-bit codes, on generated data of the CIFAR-10 shape (10,000 queries, 50,000
retrieval items, 64 bits = 8 codebooks of 256 words over a 64-d embedding, top 1,000).

    python benchmarks/bench_aqd.py                    # about a minute on 2 CPU cores
    python benchmarks/bench_aqd.py --metric=l2

eval_hash ranks as it runs here (the compiled kernel of hamming.py when numba is installed,
KERNEL='auto' at this size) and by its numpy path beside it; both must give the same lists and
distances to the bit. faiss's IndexPQ computes the same distances from its own lookup tables: the
benchmark asserts that the distances agree within TOLERANCE and that the top-K lists differ only
where neighbouring distances are that close (faiss adds in float32, eval_hash in float64). Every
method runs ROUNDS times, interleaved (the order turning round), with WORKERS threads (faiss:
its OpenMP threads, the same number), and the fastest round is reported. The last line is one
parseable result.
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
ROUNDS = 3                # interleaved timing rounds; the fastest is reported
WORKERS = 2               # eval_hash.WORKERS threads, and faiss's OpenMP threads
SEED = 0                  # seed of the generated codebooks, codes and queries


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def with_kernel(kernel, fn):
    """fn() with eval_hash.KERNEL set to `kernel`."""
    keep, eval_hash.KERNEL = eval_hash.KERNEL, kernel
    try:
        return fn()
    finally:
        eval_hash.KERNEL = keep


def main():
    configure(globals())
    import faiss
    eval_hash.WORKERS = WORKERS
    faiss.omp_set_num_threads(WORKERS)
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
    kernel = 'numba' if eval_hash._compiled(NUM_QUERY * NUM_RETRIEVAL) is not None else 'numpy'
    print(f"{NUM_QUERY:,} queries x {NUM_RETRIEVAL:,} items, {m} codebooks x 256 words ({BITS} bits), AQD {METRIC}, "
          f"top {TOPK}, {faiss.omp_get_max_threads()} faiss threads, {eval_hash.WORKERS} eval_hash workers, "
          f"eval_hash path in use: {kernel}")
    t_first = timed(lambda: with_kernel(kernel, lambda: eval_hash.aqd_rank_topk(queries[:2], codes, codebooks, TOPK,
                                                                                 METRIC)))[0]
    runs = dict(ours=lambda: eval_hash.aqd_rank_topk(queries, codes, codebooks, TOPK, METRIC),
                numpy=lambda: with_kernel('numpy', lambda: eval_hash.aqd_rank_topk(queries, codes, codebooks, TOPK,
                                                                                    METRIC)),
                faiss=lambda: index.search(queries, TOPK), hamming=lambda: eval_hash.hamming_rank_topk(b_q, b_r, TOPK))
    best, out = {name: np.inf for name in runs}, {}
    for r in range(ROUNDS):  # interleaved, so each sees the same machine load
        names = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        for name in names:
            t, out[name] = timed(runs[name])
            best[name] = min(best[name], t)
    (idx, dist), (d_f, i_f) = out['ours'], out['faiss']
    same_paths = bool(np.array_equal(idx, out['numpy'][0]) and np.array_equal(dist, out['numpy'][1]))
    d_f = -d_f if METRIC == 'ip' else d_f
    diff = float(np.abs(d_f - dist).max())
    gap = np.abs(np.diff(dist, axis=1)) <= TOLERANCE  # neighbours whose order float32 sums may swap
    near = np.zeros(dist.shape, bool)
    near[:, 1:] |= gap
    near[:, :-1] |= gap
    near[:, -1] = True  # the K-th may tie with the (K+1)-th, which neither list shows
    moved = idx != i_f
    same = bool(not (moved & ~near).any())  # every position the two lists differ at is a near tie
    ok = diff <= TOLERANCE and same and same_paths
    print(f"top-{TOPK} by AQD: ours ({kernel}) {NUM_QUERY / best['ours']:,.0f} queries/s (ties by index), the numpy "
          f"path {NUM_QUERY / best['numpy']:,.0f} q/s (the same lists and distances: {same_paths}), faiss IndexPQ "
          f"{NUM_QUERY / best['faiss']:,.0f} q/s; ours / faiss time {best['ours'] / best['faiss']:.2f}, numpy path / "
          f"faiss {best['numpy'] / best['faiss']:.2f}; first call {t_first:.2f} s; "
          f"Hamming top-{TOPK} of {BITS}-bit codes {NUM_QUERY / best['hamming']:,.0f} q/s; max |distance "
          f"difference| {diff:.1e}, same lists but for near ties: {same} ({moved.mean():.2%} of positions differ, "
          f"all within {TOLERANCE:g} of a neighbour)")
    print(f"bench_aqd queries={NUM_QUERY} retrieval={NUM_RETRIEVAL} bits={BITS} metric={METRIC} kernel={kernel} "
          f"workers={WORKERS} ours_s={best['ours']:.3f} numpy_s={best['numpy']:.3f} faiss_s={best['faiss']:.3f} "
          f"hamming_s={best['hamming']:.3f} numpy_ratio_faiss={best['numpy'] / best['faiss']:.2f} "
          f"first_call_s={t_first:.2f} max_abs_diff={diff:.2e} same_paths={same_paths} ok={ok} "
          f"ratio_faiss={best['ours'] / best['faiss']:.2f}")
    if not ok:
        raise SystemExit('error: our AQD ranking and faiss IndexPQ disagree')


if __name__ == '__main__':
    main()
