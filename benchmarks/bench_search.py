"""Speed of search.py's exact Hamming search (eval_hash's ranking) against faiss's IndexBinaryFlat, and
of its approximate indexes (IVF, HNSW) with their recall, on generated codes: 1,000,000 64-bit codes
drawn like trained hash codes (clustered: a centre per class, each bit flipped with FLIP), top-10 of
NUM_QUERY queries from the same distribution.

    python benchmarks/bench_search.py                  # about 3 minutes on 2 CPU cores
    python benchmarks/bench_search.py --num_codes=100000

Recall@10 is tie-aware: the share of an approximate index's hits that are no farther than the exact
10th hit (with Hamming distances many codes tie, and any of them is an equally right answer). The
exact search must find faiss's distances at every rank (it asserts so). Every method runs ROUNDS
times, interleaved, and the fastest round is reported. The last line is one parseable result.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import search  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_aqd import timed  # noqa: E402  (the benchmarks' one timer)
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
NUM_CODES = 1_000_000     # codes in the index
BITS = 64                 # code length
NUM_QUERY = 5000          # queries (top-10 each)
TOPK = 10                 # hits per query
CLASSES = 1000            # centres of the generated codes
FLIP = 0.1                # probability that a bit of a code differs from its centre's
ROUNDS = 2                # interleaved timing rounds; the fastest is reported
IVF_LISTS = 0             # search.py's IVF lists; 0 -> 4 x sqrt(NUM_CODES)
IVF_PROBE = 16            # lists an IVF query visits
HNSW_M = 32               # HNSW neighbours a node
HNSW_EF = 64              # HNSW candidates while searching
THREADS = 0               # faiss threads; 0 leaves its default (every core)
SEED = 0                  # seed of the generated codes


def generate(n, rng):
    centres = rng.random((CLASSES, BITS)) < 0.5
    bits = centres[rng.integers(0, CLASSES, n)] ^ (rng.random((n, BITS)) < FLIP)
    return np.packbits(bits, axis=1)


def main():
    configure(globals())
    import faiss
    if THREADS:
        faiss.omp_set_num_threads(THREADS)
    for k, v in dict(IVF_LISTS=IVF_LISTS, IVF_PROBE=IVF_PROBE, HNSW_M=HNSW_M, HNSW_EF=HNSW_EF, TOPK=TOPK).items():
        setattr(search, k, v)
    rng = np.random.default_rng(SEED)
    codes, queries = generate(NUM_CODES, rng), generate(NUM_QUERY, rng)
    print(f"{NUM_CODES:,} codes of {BITS} bits ({codes.nbytes / 2**20:.1f} MiB), {NUM_QUERY:,} queries, top-{TOPK}, "
          f"{faiss.omp_get_max_threads()} faiss threads")

    flat = faiss.IndexBinaryFlat(BITS)
    flat.add(codes)
    best = dict(ours=np.inf, faiss_flat=np.inf)
    for r in range(ROUNDS):  # interleaved, so each sees the same machine load
        t, (d_exact, i_exact) = timed(lambda: search.search(codes, queries, TOPK, 'exact'))
        best['ours'] = min(best['ours'], t)
        t, (d_flat, _) = timed(lambda: flat.search(queries, TOPK))
        best['faiss_flat'] = min(best['faiss_flat'], t)
    assert np.array_equal(d_flat, d_exact)  # the same distances at every rank (ours also orders ties by index)
    print(f"exact top-{TOPK}: ours {NUM_QUERY / best['ours']:,.0f} queries/s (eval_hash's ranking, ties by index), "
          f"faiss IndexBinaryFlat {NUM_QUERY / best['faiss_flat']:,.0f} q/s; ours / faiss time "
          f"{best['ours'] / best['faiss_flat']:.2f}")

    def one_query_ms(fn):  # one query at a time, as the search page asks: the median of 20, in ms
        return 1e3 * float(np.median([timed(lambda: fn(queries[j:j + 1]))[0] for j in range(20)]))
    exact_ms = one_query_ms(lambda q: search.search(codes, q, TOPK, 'exact'))
    print(f"one query at a time: exact {exact_ms:.1f} ms")

    approx = {}
    for kind in ('ivf', 'hnsw'):
        t_build, index = timed(lambda: search.approximate_index(codes, kind))
        t_search = min(timed(lambda: index.search(queries, TOPK))[0] for _ in range(ROUNDS))
        d, _ = index.search(queries, TOPK)
        recall = float(np.mean(d <= d_exact[:, -1:]))
        size = len(faiss.serialize_index_binary(index)) / 2**20
        approx[kind] = dict(build=t_build, qps=NUM_QUERY / t_search, recall=recall, speedup=best['ours'] / t_search,
                            mib=size, one_ms=one_query_ms(lambda q: index.search(q, TOPK)))
        print(f"{kind}: build {t_build:.1f} s, {NUM_QUERY / t_search:,.0f} queries/s, "
              f"{best['ours'] / t_search:.1f}x the exact search, recall@{TOPK} {recall:.4f} (tie-aware), index "
              f"{size:.1f} MiB; one query at a time {approx[kind]['one_ms']:.2f} ms")
        index = None  # freed before the next index is built
    print(f"bench_search codes={NUM_CODES} bits={BITS} queries={NUM_QUERY} ours_qps={NUM_QUERY / best['ours']:.0f} "
          f"faiss_flat_qps={NUM_QUERY / best['faiss_flat']:.0f} exact_one_ms={exact_ms:.1f} "
          f"ivf_one_ms={approx['ivf']['one_ms']:.2f} "
          f"ivf_recall={approx['ivf']['recall']:.4f} ivf_speedup={approx['ivf']['speedup']:.1f} "
          f"ivf_build_s={approx['ivf']['build']:.1f} ivf_mib={approx['ivf']['mib']:.1f} "
          f"hnsw_recall={approx['hnsw']['recall']:.4f} hnsw_speedup={approx['hnsw']['speedup']:.1f} "
          f"hnsw_build_s={approx['hnsw']['build']:.1f} hnsw_mib={approx['hnsw']['mib']:.1f}")


if __name__ == '__main__':
    main()
