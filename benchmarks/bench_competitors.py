"""Training time of Table 1's competitors (HHCH, MeCoQ, CGHash, each on its authors' loop, batch and schedule)
beside DUH-EG's, on NUS-WIDE's training shape (10,500 images x 512-d CLIP features, two stored views each, 512-d
external features for DUH-EG), measured in one run: a few epochs of each, their seconds per epoch, and the time of
each method's whole default schedule projected from them (DUH-EG 60 epochs of batches of 512, HHCH 80 of 64 with a
hierarchical hyperbolic K-Means of the train set every epoch, MeCoQ 50 of 128, CGHash 200 + 200 of 1024).

    python benchmarks/bench_competitors.py                 # about 2 minutes on 2 idle cores
    python benchmarks/bench_competitors.py --device=cuda

It calls train.train_heads (DUH-EG) and train.train_competitor (the others) as train.py's main does, with
train.py's module settings set from the constants below. An epoch starts where train_heads calls train.lr_at and
where train_competitor calls the module's epoch_start (both once an epoch, before its batches); the first epoch
carries the one-off costs (CGHash's k-NN mining, first allocations) and is kept apart: the whole schedule is
setup + first epoch + the other epochs x the median of the timed ones, per phase (CGHash's two phases are timed
each: its SCAN_EPOCHS is set to half the timed epochs here). The methods run in turns, the order flipping every
round. The last line is one parsable result; `<method>_vs_duheg` is the ratio of whole schedules.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines  # noqa: E402
import train  # noqa: E402
from configurator import configure  # noqa: E402
from models import resolve_device  # noqa: E402

# data: NUS-WIDE's training shape (Section 4.1.1: 21 concepts, 500 train images each)
N_TRAIN = 10500            # training images
DIM = 512                  # image features (CLIP ViT-B/16)
E_DIM = 512                # DUH-EG's external features e (CLIP's space, Eq. 5-6)
VIEWS = 2                  # stored augmented views per training image
CLASSES = 21               # concepts: CGHash's clusters on NUS-WIDE (methods/cghash.py CLUSTERS)
# training
METHODS = ('duheg', 'hhch', 'mecoq', 'cghash')  # DUH-EG first: the ratios are to its time
BITS = 64                  # code length
DUHEG_EPOCHS = train.EPOCHS  # DUH-EG's schedule (T_max); the competitors' are their modules' EPOCHS
TIMED_EPOCHS = 3           # epochs run per method and round (CGHash: half in each phase, at least 2 each)
ROUNDS = 2                 # rounds of every method in turn; the medians pool them
# system
DEVICE = 'cpu'             # cpu | cuda | auto
THREADS = 1                # torch threads (1: stable on a shared machine; 0: torch's default)
SEED = 0                   # seed of the generated features


def full_schedule(method):
    """[(phase, epochs)] of a method's default schedule (train.py's, or its authors')."""
    if method == 'duheg':
        return [('all', DUHEG_EPOCHS)]
    own = baselines.COMPETITORS[method]
    if method == 'cghash':
        return [('scan', own.SCAN_EPOCHS), ('selflabel', own.SELFLABEL_EPOCHS)]
    return [('all', own.EPOCHS)]


def timed_run(method, x, aug, e, device, epochs):
    """One call of train.py's training of `method` for `epochs` epochs: (setup s, [epoch s], [phase of each])."""
    stamps, phases = [], []
    if method == 'duheg':
        train.METHOD, train.EPOCHS, train.BATCH_SIZE, train.WARMUP = 'duheg', epochs, 512, min(10, epochs - 1)
        lr_at = train.lr_at
        train.lr_at = lambda *a, **k: (stamps.append(time.perf_counter()), phases.append('all'), lr_at(*a, **k))[2]
        call = lambda: train.train_heads(BITS, x, aug, e, device, 0.8, 0.98)
        undo = lambda: setattr(train, 'lr_at', lr_at)
    else:
        own = baselines.COMPETITORS[method]
        start = own.epoch_start
        train.METHOD, train.EPOCHS, train.BATCH_SIZE = method, epochs, own.BATCH_SIZE

        def stamped(head, x_train, aug_, epoch, gen, dev):
            stamps.append(time.perf_counter())
            phases.append(own.phase(epoch) if method == 'cghash' else 'all')
            return start(head, x_train, aug_, epoch, gen, dev)
        own.epoch_start = stamped
        call = lambda: train.train_competitor(BITS, x, aug, device, CLASSES)
        undo = lambda: setattr(own, 'epoch_start', start)
    t0 = time.perf_counter()
    try:
        call()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
    finally:
        undo()
    return stamps[0] - t0, np.diff(stamps + [time.perf_counter()]).tolist(), phases


def project(method, runs):
    """(median s per epoch after the first, whole default schedule s) from the timed runs of a method."""
    setup = np.mean([s for s, _, _ in runs])
    first = np.mean([ep[0] for _, ep, _ in runs])
    rest = {}
    for _, ep, ph in runs:
        for t, p in zip(ep[1:], ph[1:]):
            rest.setdefault(p, []).append(t)
    med = {p: float(np.median(v)) for p, v in rest.items()}
    total, left_first = setup + first, True
    for p, n in full_schedule(method):
        total += (n - 1 if left_first else n) * med[p]
        left_first = False
    return float(np.median([t for v in rest.values() for t in v])), float(total), med


def main():
    configure(globals())
    if N_TRAIN < 2 or VIEWS < 2 or TIMED_EPOCHS < 2 or ROUNDS < 1 or not METHODS or METHODS[0] != 'duheg':
        raise SystemExit('error: --n_train >= 2, --views >= 2, --timed_epochs >= 2, --rounds >= 1; --methods starts '
                         'with duheg (the ratios are to its time)')
    unknown = [m for m in METHODS[1:] if m not in baselines.COMPETITORS]
    if unknown:
        raise SystemExit(f"error: --methods: {', '.join(unknown)} not among duheg, {', '.join(baselines.COMPETITORS)}")
    device = resolve_device(DEVICE)
    if THREADS:
        torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(device == 'cpu')
    train.SEED, train.DATASET, train.RELEASED, train.SIM = SEED, 'nuswide', False, True
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((N_TRAIN, DIM), np.float32)
    aug = (x[:, None] + 0.3 * rng.standard_normal((N_TRAIN, VIEWS, DIM), np.float32)).astype(np.float16)
    e = F.normalize(torch.randn(N_TRAIN, E_DIM, generator=torch.Generator().manual_seed(SEED)), dim=1).numpy()
    cghash = baselines.COMPETITORS['cghash']
    scan = cghash.SCAN_EPOCHS
    print(f'data: {N_TRAIN} train x {DIM} (+{VIEWS} views), {BITS} bits, device {device}, {torch.get_num_threads()} '
          f'thread(s), {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}')
    timed = {m: [] for m in METHODS}
    for r in range(ROUNDS):
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
            epochs = max(TIMED_EPOCHS, 4) if m == 'cghash' else TIMED_EPOCHS
            cghash.SCAN_EPOCHS = epochs // 2  # both phases timed
            try:
                timed[m].append(timed_run(m, x, aug, e, device, epochs))
            finally:
                cghash.SCAN_EPOCHS = scan
            setup, ep, _ = timed[m][-1]
            print(f'round {r + 1}/{ROUNDS} {m}: setup {setup:.2f} s, epochs ' + ' '.join(f'{t:.2f}' for t in ep)
                  + f' s; load {os.getloadavg()[0]:.1f}', flush=True)
    out, base = [], None
    for m in METHODS:
        per_epoch, total, med = project(m, timed[m])
        base = base or total
        sched = ' + '.join(f'{n} {p}' if p != 'all' else str(n) for p, n in full_schedule(m))
        print(f'{m}: {per_epoch:.2f} s an epoch (median; ' + ', '.join(f'{p} {v:.2f} s' for p, v in med.items())
              + f'), its whole schedule ({sched} epochs) {total:.0f} s projected, {total / base:.2f} x DUH-EG\'s')
        out.append(f'{m}_s_per_epoch={per_epoch:.3f} {m}_full_s={total:.1f} {m}_vs_duheg={total / base:.3f}')
    print(f'bench_competitors n_train={N_TRAIN} dim={DIM} views={VIEWS} bits={BITS} device={device} '
          f'threads={torch.get_num_threads()} timed_epochs={TIMED_EPOCHS} rounds={ROUNDS} ' + ' '.join(out)
          + f' load={os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main()
