"""Seconds per epoch and for the whole schedule of train.py's DUH-EG training (Algorithm 2)
at each code length, on random features of NUS-WIDE's training size (10,500 images x 512,
two augmented views, 512-d external features, batch 512), then the final encoding and MAP of
NUS-WIDE's evaluation shape (2,100 queries x 193,734 retrieval items, MAP@5000).

    python benchmarks/bench_train.py                      # 6 epochs a code length, scaled to 60: ~1 min on 2 idle cores
    python benchmarks/bench_train.py --timed_epochs=0 --threads=0   # all 60 epochs x 3 code lengths: 2-3 min
    python benchmarks/bench_train.py --device=cuda --bits=64

It calls train.train_heads itself, with train.py's module settings set from the constants
below, and train.encode, eval_hash.mean_average_precision and eval_hash.map_continuous as
train.py's main does after training. Epoch times come from the calls train_heads makes to
train.lr_at, once at the start of each epoch. Random features cost what real ones do: every
step is dense (the positives of Eq. 8 are a full N x N mask whatever their number).

Torch's default thread count and one thread are timed side by side: on a shared machine the
default's threads wait for each other at every small op, so another process on the cores can
stretch its epochs many times over (min and max epoch show it), while one thread just gets its
share. The last lines are one parseable result per code length.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_hash  # noqa: E402
import train  # noqa: E402
from configurator import configure  # noqa: E402
from models import resolve_device  # noqa: E402

# -----------------------------------------------------------------------------
# data: NUS-WIDE's shape (Section 4.1.1: 21 concepts, 500 train and 100 query images each)
N_TRAIN = 10500            # training images
DIM = 512                  # image features (CLIP ViT-B/16)
E_DIM = 512                # external features e (CLIP's space, Eq. 5-6)
VIEWS = 2                  # augmented views per training image (dataset_extract.py AUG_VIEWS)
NUM_QUERY = 2100           # query images
NUM_RETRIEVAL = 193734     # the rest of the usual 195,834-image 21-concept NUS-WIDE
CLASSES = 21               # concepts
LABELS_PER_IMAGE = 1.9     # mean labels per image (speed does not depend on it)
TOPK = 5000                # MAP@5000
# training (train.py's settings)
BITS = (16, 32, 64)        # code lengths, one training each
EPOCHS = train.EPOCHS      # the schedule the time is reported for (T_max)
TIMED_EPOCHS = 6           # epochs run per code length (and thread count), scaled to EPOCHS by the median epoch;
                           # 0 = all EPOCHS in one call each
BATCH_SIZE = train.BATCH_SIZE  # mini-batch size (train.py's)
TAU2 = 0.8                 # Eq. 9 temperature (the authors' NUS-WIDE value)
T2 = train.T2_BEST['nuswide']  # Eq. 8 threshold
# system
DEVICE = 'cpu'             # cpu | cuda | auto
DETERMINISTIC = True       # deterministic algorithms on the CPU, as train.py sets them
THREADS = (0, 1)           # torch thread counts timed side by side; 0 = torch's default (the headline figures)
ROUNDS = 3                 # TIMED_EPOCHS are split over this many calls of train_heads, interleaved over the
                           # code lengths and thread counts in an order that flips every round
EVAL = True                # also time the final encoding and MAP of NUS-WIDE's shape
OVERHEAD_STEPS = 500       # also time this many steps on tiny tensors (batch 4, 8-d, 1 thread): the fixed cost of
                           # a step's op calls (420 from Python, 700 at the bottom: torch.profiler), i.e. what a
                           # step costs where kernels take next to no time (a GPU); 0: skip
SEED = 0                   # seed of the generated features and labels


def make_labels(rng, n):
    labels = (rng.random((n, CLASSES)) < LABELS_PER_IMAGE / CLASSES).astype(np.int8)
    empty = ~labels.any(1)
    labels[empty, rng.integers(0, CLASSES, empty.sum())] = 1  # every image has a label
    return labels


def time_training(counts, jobs, rounds, per_call, x_train, aug, e, device):
    """Algorithm 2: train_heads itself, every (threads, bits) once a round, the order flipping. Returns each job's
    epoch times, its setup times (before the first epoch) and its image head."""
    stamps, lr_at = [], train.lr_at  # epoch boundaries: train_heads calls train.lr_at at the start of each epoch

    def timed_lr_at(*args, **kw):
        stamps.append(time.perf_counter())
        return lr_at(*args, **kw)
    train.lr_at = timed_lr_at
    epochs, setup, heads = {j: [] for j in jobs}, {j: [] for j in jobs}, {}
    for r in range(rounds):
        for t, bits in (jobs if r % 2 == 0 else jobs[::-1]):
            torch.set_num_threads(t)
            stamps.clear()
            t0 = time.perf_counter()
            hv = train.train_heads(bits, x_train, aug, e, device, TAU2, T2)[0]
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            epochs[t, bits] += np.diff(stamps + [time.perf_counter()]).tolist()
            setup[t, bits].append(stamps[0] - t0)
            heads[t, bits] = hv
        print(f'round {r + 1}/{rounds}: median epoch ' + ', '.join(
            f'{b} bits {t} thread{"s" if t > 1 else ""} {np.median(epochs[t, b][-per_call:]):.3f} s' for t, b in jobs)
            + f'; load {os.getloadavg()[0]:.1f}')
    train.lr_at = lr_at
    torch.set_num_threads(counts[0])
    return epochs, setup, heads


def epoch_stats(jobs, epochs, setup, full):
    """Each job's (median epoch, whole schedule) in seconds: measured whole, or setup + EPOCHS x the median."""
    stat = {}
    for t, bits in jobs:
        ep = np.array(epochs[t, bits])
        med = float(np.median(ep))
        total = float(np.sum(setup[t, bits]) + ep.sum()) if full else float(np.mean(setup[t, bits])) + EPOCHS * med
        stat[t, bits] = med, total
        print(f'{bits} bits, {t} thread{"s" if t > 1 else ""}: epoch median {med:.3f} s, min {ep.min():.3f} s, max '
              f'{ep.max():.3f} s ({len(ep)} epochs); {EPOCHS} epochs {total:.1f} s{"" if full else " (extrapolated)"}')
    return stat


def step_overhead(rng, device, threads):
    """The fixed cost of a step: the same ops on tiny tensors, where compute is ~nothing (seconds a step)."""
    torch.set_num_threads(1)
    train.EPOCHS, train.WARMUP, train.BATCH_SIZE = 1, 0, 4
    xs = rng.standard_normal((4 * OVERHEAD_STEPS, 8), np.float32)
    augs = (xs[:, None] + 0.3 * rng.standard_normal((len(xs), VIEWS, 8), np.float32)).astype(np.float32)
    es = F.normalize(torch.randn(len(xs), 8), dim=1).numpy()
    best = []
    for _ in range(3):  # the least disturbed of three
        t = time.perf_counter()
        train.train_heads(BITS[0], xs, augs, es, device, TAU2, T2)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        best.append((time.perf_counter() - t) / OVERHEAD_STEPS)
    train.BATCH_SIZE = BATCH_SIZE
    torch.set_num_threads(threads)
    print(f'step overhead: {min(best) * 1e3:.2f} ms a step on tiny tensors (batch 4, 8-d, 1 thread; best of 3 '
          f'x {OVERHEAD_STEPS} steps); a {EPOCHS}-epoch schedule of {-(-N_TRAIN // BATCH_SIZE)} steps an epoch '
          f'costs at least {min(best) * EPOCHS * -(-N_TRAIN // BATCH_SIZE):.1f} s of it on any device')
    return min(best)


def time_evaluation(hv, data, device, threads, bits):
    """As train.py's main after training: encode the query and retrieval sets, binary MAP@K and the released code's
    continuous-output MAP@K (NUS-WIDE's full evaluation shape). Returns the three times in seconds."""
    q_feats, r_feats, q_labels, r_labels = data
    t = time.perf_counter()
    h_q, h_r = train.encode(hv, q_feats, device), train.encode(hv, r_feats, device)
    enc_s = time.perf_counter() - t
    t = time.perf_counter()
    m = eval_hash.mean_average_precision(eval_hash.to_codes(h_q), eval_hash.to_codes(h_r), q_labels, r_labels, TOPK)
    map_s = time.perf_counter() - t
    t = time.perf_counter()
    eval_hash.map_continuous(h_q, h_r, q_labels, r_labels, TOPK)
    cont_s = time.perf_counter() - t
    print(f'{bits} bits: encode {NUM_QUERY} + {NUM_RETRIEVAL} features {enc_s:.2f} s, binary MAP@{TOPK} '
          f'{map_s:.2f} s (value {m:.4f}, random data), continuous-output MAP@{TOPK} {cont_s:.2f} s '
          f'({threads} threads); load {os.getloadavg()[0]:.1f}')
    return enc_s, map_s, cont_s


def main():
    configure(globals())
    if not BITS or N_TRAIN < 2 or BATCH_SIZE < 2 or EPOCHS < 1 or not 0 <= TIMED_EPOCHS <= EPOCHS or VIEWS < 2:
        raise SystemExit('error: --bits, --n_train and --batch_size >= 2, --epochs >= 1, 0 <= --timed_epochs <= '
                         '--epochs, --views >= 2')
    if not THREADS or ROUNDS < 1:
        raise SystemExit('error: --threads needs at least one count (0: torch default) and --rounds >= 1')
    device = resolve_device(DEVICE)
    train.deterministic(DETERMINISTIC and device == 'cpu')
    default_threads = torch.get_num_threads()
    counts = list(dict.fromkeys(t or default_threads for t in THREADS))  # the first is the headline
    full = TIMED_EPOCHS in (0, EPOCHS)
    rounds = 1 if full else min(ROUNDS, TIMED_EPOCHS)
    per_call = EPOCHS if full else -(-TIMED_EPOCHS // rounds)
    train.EPOCHS, train.BATCH_SIZE, train.SEED = per_call, BATCH_SIZE, SEED
    train.WARMUP = min(train.WARMUP, per_call - 1)  # the learning rate does not change the cost
    train.METHOD, train.SIM, train.RELEASED = 'duheg', True, False

    rng = np.random.default_rng(SEED)
    x_train = rng.standard_normal((N_TRAIN, DIM), np.float32)
    aug = (x_train[:, None] + 0.3 * rng.standard_normal((N_TRAIN, VIEWS, DIM), np.float32)).astype(np.float32)
    e = F.normalize(torch.randn(N_TRAIN, E_DIM, generator=torch.Generator().manual_seed(SEED)), dim=1).numpy()
    print(f'data: {N_TRAIN} train x {DIM} (+{VIEWS} views), external {E_DIM}-d, batch {BATCH_SIZE} '
          f'({-(-N_TRAIN // BATCH_SIZE)} steps an epoch); eval {NUM_QUERY} queries x {NUM_RETRIEVAL} retrieval, '
          f'MAP@{TOPK}; device {device}, torch threads {counts}, {os.cpu_count()} CPU cores, '
          f'deterministic {DETERMINISTIC}, load {os.getloadavg()[0]:.1f}')
    if not full:
        print(f'note: {rounds * per_call} of {EPOCHS} epochs run per code length and thread count ({rounds} calls of '
              f'{per_call}); the {EPOCHS}-epoch time is setup + {EPOCHS} x the median epoch, extrapolated')

    jobs = [(t, b) for t in counts for b in BITS]
    epochs, setup, heads = time_training(counts, jobs, rounds, per_call, x_train, aug, e, device)
    stat = epoch_stats(jobs, epochs, setup, full)
    overhead = step_overhead(rng, device, counts[0]) if OVERHEAD_STEPS else float('nan')
    if EVAL:
        data = (rng.standard_normal((NUM_QUERY, DIM), np.float32),
                rng.standard_normal((NUM_RETRIEVAL, DIM), np.float32),
                make_labels(rng, NUM_QUERY), make_labels(rng, NUM_RETRIEVAL))
    lines = []
    for bits in BITS:
        nan = float('nan')
        enc_s, map_s, cont_s = time_evaluation(heads[counts[0], bits], data, device, counts[0], bits) if EVAL else (
            nan, nan, nan)
        med, total = stat[counts[0], bits]
        others = ''.join(f' s_per_epoch_threads{t}={stat[t, bits][0]:.3f} train_s_threads{t}={stat[t, bits][1]:.1f}'
                         for t in counts[1:])
        lines.append(f'bench_train bits={bits} n_train={N_TRAIN} dim={DIM} e_dim={E_DIM} views={VIEWS} '
                     f'batch={BATCH_SIZE} device={device} threads={counts[0]} deterministic={DETERMINISTIC} '
                     f'epochs={EPOCHS} timed_epochs={len(epochs[counts[0], bits])} extrapolated={not full} '
                     f's_per_epoch={med:.3f} train_s={total:.1f}{others} nq={NUM_QUERY} nr={NUM_RETRIEVAL} '
                     f'topk={TOPK} step_overhead_ms={overhead * 1e3:.2f} encode_s={enc_s:.2f} map_s={map_s:.2f} '
                     f'map_cont_s={cont_s:.2f} '
                     f'total_s={total + (enc_s + map_s + cont_s if EVAL else 0):.1f} load={os.getloadavg()[0]:.1f}')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
