"""The cost of `reproduce.py --table=all --report_only` (REPORT.md, every table and figure) for the full set
of cells: every table's rows x 4 datasets x 3 code lengths x SEEDS seeds, from a generated results file and
run folders (each line as train.py writes it, and a codes.npz in every run Figures 3-4 draw: the first
seed's 64-bit runs of Table 1 and the baselines table), beside the training those cells take on one GPU
(report.estimate's arithmetic: an ESTIMATE, not a measurement).

    python benchmarks/bench_report.py                 # about a minute on 2 CPU cores
    python benchmarks/bench_report.py --paper_shapes  # the figures' codes at the datasets' real sizes (long)

Each round runs reproduce.py twice in its own process, as a user does: first without curves.json (Figures
3-4 evaluated), then with it (the report rebuilt); the fastest round of each is reported, and both
reports must be the same document. The last line is one parseable result.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import baselines  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402
import train  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
SEEDS = 3                   # seeds of every cell (reproduce.py --seeds)
NUM_QUERY = 200             # queries of every codes.npz the figures evaluate
NUM_RETRIEVAL = 5000        # retrieval items of each
PAPER_SHAPES = False        # instead each dataset's own query and retrieval sizes (Section 4.1.1)
CLASSES = 10                # classes of the generated labels
ROUNDS = 2                  # timing rounds; the fastest is reported
OUT = ''                    # the generated folder; '' -> a temporary one, removed afterwards
SEED = 0                    # seed of the generated MAP values and codes

_DATASETS = ('cifar10', 'nuswide', 'flickr25k', 'mscoco')
_SHAPES = dict(cifar10=(10000, 50000), nuswide=(2100, 193734), flickr25k=(2000, 18015), mscoco=(5000, 117218))


def cells(out):
    """Every cell of --table=all on the four datasets (Table 5 with ConceptNet and GloVe word lists)."""
    words = []
    for name in ('conceptnet', 'glove'):
        words.append(f'{name}={os.path.join(out, name + ".txt")}')
        with open(words[-1].split('=')[1], 'w') as f:
            f.write('cat\ndog\n')
    for k, v in dict(DATASETS=_DATASETS, SEEDS=tuple(range(SEEDS)), VOCAB_FILES=tuple(words),
                     CACHE_DIR=os.path.join(out, 'cache'), OUT_DIR=os.path.join(out, 'reproduce')).items():
        setattr(reproduce, k, v)
    defaults = reproduce.train_defaults()
    return [c for t in reproduce._ALL if t != '4' for c in reproduce.make_cells(t, defaults, {})], words


def write_codes(run_dir, nq, nr, rng):
    """codes.npz as train.py saves it: 64-bit outputs whose sign half knows the class, one-hot labels."""
    os.makedirs(run_dir, exist_ok=True)
    y = rng.integers(0, CLASSES, nq + nr)
    h = rng.standard_normal((len(y), 64)).astype(np.float32) + np.eye(CLASSES, 64, dtype=np.float32)[y] * 2
    labels = np.eye(CLASSES, dtype=np.int8)[y]
    np.savez(os.path.join(run_dir, 'codes.npz'), query_h=h[:nq], retrieval_h=h[nq:], query_labels=labels[:nq],
             retrieval_labels=labels[nq:], topk=1000)


def write_runs(out, rng):
    """A results file with one line per distinct cell (as train.py writes it) and the run folders' codes."""
    all_cells, words = cells(out)
    machine = dict(hardware='generated (bench_report.py)', torch='-', cuda=None, driver=None, python='-')
    lines, codes = {}, 0
    for c in all_cells:
        name = reproduce.run_name(c.cfg)
        if (name, c.bits) in lines:
            continue
        run_dir = os.path.join(reproduce.OUT_DIR, 'runs', name, f'{c.bits}bits')
        m = float(rng.uniform(0.7, 0.95))
        lines[name, c.bits] = dict(
            dataset=c.dataset, method=c.cfg['METHOD'], supervised=False, bits=c.bits, topk=1000, ranking='hamming',
            map=round(m, 6), map_continuous=round(m - 0.01, 6), seconds=30.0, eval_seconds=4.0,
            date=f'2026-01-01T00:{len(lines) // 60:02d}:{len(lines) % 60:02d}+0000', commit='0000000',
            machine=machine, run_dir=run_dir, run_key=f'{len(lines):064x}', config=dict(c.cfg, RUN_DIR=run_dir),
            inputs=dict(features='%064x' % 1, vocabulary='%064x' % 2), heads_sha256='%064x' % 3)
        if c.bits == 64 and c.seed == 0 and c.table in reproduce._CURVE_TABLES:
            write_codes(run_dir, *(_SHAPES[c.dataset] if PAPER_SHAPES else (NUM_QUERY, NUM_RETRIEVAL)), rng)
            codes += 1
    path = os.path.join(reproduce.OUT_DIR, 'results.jsonl')
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in lines.values())
    return all_cells, lines, words, codes


def timed_report(out, words):
    args = [sys.executable, os.path.join(ROOT, 'reproduce.py'), '--table=all', '--report_only',
            f"--datasets={','.join(_DATASETS)}", f"--seeds={','.join(map(str, range(SEEDS)))}",
            f"--cache_dir={os.path.join(out, 'cache')}", f"--out_dir={os.path.join(out, 'reproduce')}",
            f"--vocab_files={','.join(words)}"]
    t = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'reproduce.py --report_only failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}')
    with open(os.path.join(out, 'reproduce', 'REPORT.md')) as f:
        return time.perf_counter() - t, f.read()


def main():
    configure(globals())
    out = OUT or tempfile.mkdtemp(prefix='bench_report_')
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    all_cells, lines, words, codes = write_runs(out, rng)
    shape = 'each dataset\'s size' if PAPER_SHAPES else f'{NUM_QUERY} x {NUM_RETRIEVAL}'
    print(f"{len(all_cells)} cells of every table x {len(_DATASETS)} datasets x 3 code lengths x {SEEDS} seeds; "
          f"{len(lines)} results lines; {codes} codes.npz of {shape} in the figures' runs; in {out}")
    best, doc = dict(first=np.inf, cached=np.inf), None
    curves = os.path.join(out, 'reproduce', 'curves.json')
    for _ in range(ROUNDS):
        if os.path.exists(curves):
            os.remove(curves)
        first, text = timed_report(out, words)
        cached, again = timed_report(out, words)
        assert text == again and (doc is None or doc == text), 'the report is not the same document twice'
        doc = text
        best = dict(first=min(best['first'], first), cached=min(best['cached'], cached))
    with open(curves) as f:
        figure_s = sum(v['seconds'] for v in json.load(f).values())
    processes = {}
    for c in all_cells:  # the training of every cell, as reproduce.py runs it: a process per run name
        processes.setdefault(reproduce.run_name(c.cfg), (c.dataset, set(), c.cfg['METHOD'] not in
                                                                    baselines.UNTRAINED))[1].add(c.bits)
    train_s = report.estimate(report.GPU_RATES, {}, {}, processes, reproduce.EPOCHS, train.BATCH_SIZE)['train_s']
    print(f"report from {len(lines)} results lines: {best['first']:.1f} s with Figures 3-4 evaluated "
          f"({figure_s:.1f} s of it), {best['cached']:.1f} s rebuilt; the training of these cells on one GPU "
          f"(ESTIMATE) {train_s / 3600:.1f} h")
    if not OUT:
        shutil.rmtree(out)
    print(f"bench_report cells={len(all_cells)} results={len(lines)} codes={codes} paper_shapes={PAPER_SHAPES} "
          f"num_query={NUM_QUERY} num_retrieval={NUM_RETRIEVAL} first_s={best['first']:.2f} "
          f"cached_s={best['cached']:.2f} figures_s={figure_s:.2f} train_estimate_s={train_s:.0f} "
          f"ratio_first={best['first'] / train_s:.5f} ratio_cached={best['cached'] / train_s:.5f} same=True")


if __name__ == '__main__':
    main()
