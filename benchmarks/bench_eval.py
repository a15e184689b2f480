"""Speed of eval_hash.mean_average_precision against the plain per-query loop (one stable
argsort of the whole retrieval set per query, as in the DeepHash / SSDH evaluation code) and against
its floor, on random codes of the MS-COCO shape (5,000 queries, 117,218 retrieval items, 64 bits, 80 labels).

    python benchmarks/bench_eval.py                       # 30-60 s on 2 CPU cores
    python benchmarks/bench_eval.py --baseline_queries=5000   # time the loop on every query
    python benchmarks/bench_eval.py --num_query=2100 --num_retrieval=193734 --classes=21 --device=cuda  # NUS-WIDE

The fast path is eval_hash's as it runs here: the compiled kernels of hamming.py when numba is
installed (KERNEL='auto' at this size), its numpy path otherwise; the numpy path is timed beside it
in the same run. Each has its floor: the Hamming distance of every query-retrieval pair and nothing
else, by the same path's own distance kernel (hamming.distances one query at a time, or eval_hash's
tiled numpy kernel), the same threads and chunks. floor_ratio is the fast path's time over its floor's,
numpy_floor_ratio the numpy path's over its own; every time is the fastest of REPEATS full runs
interleaved in one process (the machine is shared: only ratios measured side by side mean anything).
The loop is timed on BASELINE_QUERIES queries and scaled to all of them (the output says so), in
rounds interleaved with the rest; both are run on that subset and must agree exactly (the fast path
does the loop's floating-point operations in its order), and the two paths must agree exactly on
every query. --device=cuda also times the torch path on the GPU and checks it returns the same MAP.
The last line is one parseable result.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_aqd import timed, with_kernel  # noqa: E402  (the benchmarks' timer and kernel switch)

# -----------------------------------------------------------------------------
NUM_QUERY = 5000          # MS-COCO query set
NUM_RETRIEVAL = 117218    # MS-COCO retrieval set
BITS = 64                 # code length
CLASSES = 80              # MS-COCO labels
LABELS_PER_IMAGE = 2.9    # mean labels per image (MS-COCO: about 2.9, one class in half the images)
NOISE = 1.0               # noise added before sign() (1.0 gives MAP@5000 about 0.88, near the paper's MS-COCO)
TOPK = 5000               # K of MAP@K (MS-COCO)
BASELINE_QUERIES = 500    # queries the slow loop is timed on (then scaled to NUM_QUERY)
TOLERANCE = 0.0           # largest allowed |MAP(fast) - MAP(loop)| on the same queries
ROUNDS = 10               # interleaved timing rounds of the loop (the fast path and the floor run in REPEATS of them)
REPEATS = 3               # full runs of the fast path and of the floor, interleaved; the fastest of each counts
DEVICE = ''               # also time the torch path there ('cuda'; 'cpu' for a dry run); '' = numpy only
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


def floor(qb, rb, h):
    """The Hamming distances of every query-retrieval pair and nothing else: the kernel, threads and chunks of
    eval_hash's path (h: hamming.py's compiled kernels, or None: numpy). Packing the codes is left out."""
    qw, rw, L = eval_hash._code_words(qb, rb)
    if h is not None:  # one query at a time into one row, as the compiled ranking computes them
        qw, rw = eval_hash._wide(qw), eval_hash._wide(rw)
        eval_hash._compiled_run(h.distances, qw.shape[1], (qw, rw), lambda: h.scratch(rw.shape[1], 1, L)[:1], 'floor')
        return

    def block(lo, hi, bar):
        for _ in eval_hash._distance_chunks(qw[:, lo:hi], rw, L, bar=bar):
            pass
    eval_hash._blocks(block, qw.shape[1], 'floor')


def peak_of(fn):
    """MiB allocated at most while fn() runs (tracemalloc: numpy's arrays, the compiled kernels' scratch included)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return peak


def timed_rounds(qb, rb, ql, rl, sub, h):
    """ROUNDS interleaved rounds, so that the loop, the two paths and their floors share whatever load the
    machine has: each round times the loop on 1/ROUNDS of its `sub` queries; REPEATS of them also time
    mean_average_precision on all queries (packing included) by the path in use and by the numpy path, and each
    one's floor (and the torch path), in an order that turns round. Returns (loop APs, loop s, {name: fastest s},
    {name: MAP}) with names fast, numpy, floor, numpy_floor (device)."""
    rbf, rlf = rb.astype(np.float32), rl.astype(np.float32)
    loop_cut = np.linspace(0, sub, ROUNDS + 1).astype(int)
    fast_rounds = np.linspace(0, ROUNDS - 1, min(REPEATS, ROUNDS)).round().astype(int).tolist()
    runs = dict(fast=lambda: eval_hash.mean_average_precision(qb, rb, ql, rl, TOPK),
                numpy=lambda: with_kernel('numpy', lambda: eval_hash.mean_average_precision(qb, rb, ql, rl, TOPK)),
                floor=lambda: floor(qb, rb, h), numpy_floor=lambda: floor(qb, rb, None))
    if DEVICE:
        runs['device'] = lambda: eval_hash.mean_average_precision(qb, rb, ql, rl, TOPK, device=DEVICE)
    best, maps, t_loop, aps = {name: np.inf for name in runs}, {}, 0.0, []
    for i in range(ROUNDS):
        t = time.perf_counter()
        aps += loop_ap(qb[loop_cut[i]:loop_cut[i + 1]], rbf, ql[loop_cut[i]:loop_cut[i + 1]], rlf, TOPK)
        t_loop += time.perf_counter() - t
        if i in fast_rounds:
            names = list(runs)
            turn = fast_rounds.index(i) % len(names)
            for name in names[turn:] + names[:turn]:
                t, maps[name] = timed(runs[name])
                best[name] = min(best[name], t)
    return aps, t_loop, best, maps


def describe(qb, rb, rl):
    """Print the data's shape and how much the distances tie at rank TOPK."""
    n_dist = len(np.unique(rb, axis=0))
    print(f'data: {NUM_QUERY} queries x {NUM_RETRIEVAL} items, {BITS} bits ({n_dist} distinct retrieval codes), '
          f'{CLASSES} labels ({rl.sum(1).mean():.2f} per image), MAP@{TOPK}; {os.cpu_count()} CPU cores')
    D = ((BITS - qb[:100].astype(np.float32) @ rb.T.astype(np.float32)) / 2).astype(np.int16)
    d_k = np.partition(D, min(TOPK, NUM_RETRIEVAL) - 1, axis=1)[:, min(TOPK, NUM_RETRIEVAL) - 1]
    print(f'ties: the distance at rank {TOPK} is shared by {np.mean((D == d_k[:, None]).sum(1)):.0f} items '
          f'on average (first 100 queries)')


def main():
    configure(globals())
    eval_hash.WORKERS = WORKERS
    rng = np.random.default_rng(SEED)
    qb, rb, ql, rl = make_data(rng)
    describe(qb, rb, rl)
    sub = min(BASELINE_QUERIES, NUM_QUERY)
    t_first, h = timed(lambda: eval_hash._compiled(NUM_QUERY * NUM_RETRIEVAL))
    kernel = 'numba' if h is not None else 'numpy'
    first = [timed(lambda: with_kernel(k, lambda: eval_hash.mean_average_precision(
        qb[:WORKERS], rb, ql[:WORKERS], rl, TOPK)))[0] for k in (kernel, 'numpy')]
    t_first += first[0]
    print(f'path in use: {kernel} (eval_hash.KERNEL={eval_hash.KERNEL!r}); its first call (loading or compiling '
          f'kernels, then 2 queries) {t_first:.2f} s')

    aps, t_loop, best, maps = timed_rounds(qb, rb, ql, rl, sub, h)
    t_fast, t_floor, map_fast = best['fast'], best['floor'], maps['fast']
    scale = NUM_QUERY / sub
    speedup = t_loop * scale / t_fast
    print(f'loop (per-query stable argsort): {t_loop / sub * 1e3:.2f} ms/query timed on {sub} queries, '
          f'scaled to {NUM_QUERY} queries: {t_loop * scale:.1f} s')
    print(f'eval_hash.mean_average_precision ({kernel}): {t_fast:.3f} s for all {NUM_QUERY} queries '
          f'({t_fast / NUM_QUERY * 1e3:.3f} ms/query, {WORKERS} threads, fastest of {min(REPEATS, ROUNDS)}), '
          f'MAP@{TOPK} = {map_fast:.4f}; the numpy path {best["numpy"]:.3f} s, MAP the same: '
          f'{maps["numpy"] == map_fast}')
    print(f'floor (Hamming distances of all pairs, nothing else), {kernel}: {t_floor:.3f} s, fast path / floor '
          f'{t_fast / t_floor:.2f}; numpy floor {best["numpy_floor"]:.3f} s, numpy path / numpy floor '
          f'{best["numpy"] / best["numpy_floor"]:.2f}, fast path / numpy floor {t_fast / best["numpy_floor"]:.2f}; '
          f'speedup over the loop x{speedup:.1f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
    dev_ok = True
    if DEVICE:
        dev_ok = maps['device'] == map_fast
        print(f'torch path on {DEVICE}: {best["device"]:.3f} s, MAP@{TOPK} = {maps["device"]:.4f}, the same as the '
              f'CPU path: {dev_ok}')

    map_loop = float(np.mean(aps))
    map_fast_sub = with_kernel(kernel, lambda: eval_hash.mean_average_precision(qb[:sub], rb, ql[:sub], rl, TOPK))
    diff = abs(map_fast_sub - map_loop)
    print(f'agreement on the same {sub} queries: loop {map_loop:.12f} fast {map_fast_sub:.12f} |diff| {diff:.2e}')

    peak_mb, numpy_peak_mb = (peak_of(lambda: with_kernel(k, lambda: eval_hash.mean_average_precision(
        qb, rb, ql, rl, TOPK))) for k in (eval_hash.KERNEL, 'numpy'))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'memory: peak {peak_mb:.0f} MiB allocated during the call, {numpy_peak_mb:.0f} MiB by the numpy path '
          f'(tracemalloc; codes, labels and the buffers of {WORKERS} threads), process max RSS {rss_mb:.0f} MiB '
          f'(data and loop included)')

    ok = diff <= TOLERANCE and dev_ok and maps['numpy'] == map_fast
    print(f'bench_eval nq={NUM_QUERY} nr={NUM_RETRIEVAL} bits={BITS} topk={TOPK} kernel={kernel} loop_queries={sub} '
          f'loop_ms_per_query={t_loop / sub * 1e3:.3f} fast_s={t_fast:.3f} floor_s={t_floor:.3f} '
          f'numpy_s={best["numpy"]:.3f} numpy_floor_s={best["numpy_floor"]:.3f} '
          f'numpy_floor_ratio={best["numpy"] / best["numpy_floor"]:.2f} '
          f'fast_vs_numpy_floor={t_fast / best["numpy_floor"]:.2f} first_call_s={t_first:.2f} workers={WORKERS} '
          f'speedup={speedup:.1f} load={os.getloadavg()[0]:.1f} max_abs_diff={diff:.3e} peak_mib={peak_mb:.0f} '
          f'numpy_peak_mib={numpy_peak_mb:.0f} maxrss_mib={rss_mb:.0f}'
          + (f' device={DEVICE} device_s={best["device"]:.3f}' if DEVICE else '')
          + f' ok={ok} floor_ratio={t_fast / t_floor:.2f}')
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
