"""What reproduce.py tells about the paper's tables: each cell's numbers (measured / paper / difference,
marked when outside tolerance), the estimated GPU time of what a --dry_run would run, and the one
document of `reproduce.py --table=all`, REPORT.md: every table and figure of the paper beside what this
code measured, a summary, and the provenance of every cell.

reproduce.py decides what the cells are and renders each table; this module imports nothing of it. A
cell here is anything with table, row (id, label), dataset, bits, seed, result (its results line or
None), measured, paper, status and why; the figures are drawn from the run folders the results name.
Nothing in REPORT.md depends on when it is built: its date is the newest result's, and the figures'
evaluation is cached (curves.json), so rebuilding it from the same results gives the same document.
"""
import glob
import io
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from contextlib import redirect_stdout

import numpy as np

import cache
import eval_hash
import external
import figures
import provenance
from cache import save_json, save_text
from models import pretrained_tag

_TOLERANCE = 0.01   # |measured - paper| beyond which a one-seed cell is marked (several seeds: 2 std)
_STD_TOLERANCE = 2  # ... beyond this many standard deviations over seeds


# -----------------------------------------------------------------------------
# a cell's numbers
def summary(values):
    """(mean, std) of MAP over seeds; std is the sample std (n - 1), None for one seed."""
    if not values:
        return None, None
    v = np.asarray(values, float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def outside(values, paper):
    """Is the mean of `values` farther from the paper's value than 2 std over seeds (0.01 with one seed)?"""
    mean, std = summary(values)
    if mean is None or paper is None:
        return False
    return abs(mean - paper) > (_STD_TOLERANCE * std if std is not None else _TOLERANCE)


def cell_text(values, paper, n_seeds=1, status='', hamming=()):
    """'0.925 ± 0.003 / 0.931 / -0.006': measured, paper, difference; '–' where there is none; the
    difference in bold when it is outside tolerance (`outside`). With `hamming` (--released: the measured
    value is the continuous-output MAP) the Hamming MAP follows in brackets: '0.812 (Hamming 0.660) / ...'."""
    mean, std = summary(values)
    if mean is None:
        measured = status or '–'
    else:
        measured = f'{mean:.3f}' + (f' ± {std:.3f}' if std is not None else '')
        if len(values) < n_seeds:
            measured += f' (n={len(values)})'
        if hamming:
            measured += f' (Hamming {summary(hamming)[0]:.3f})'
    paper_s = f'{paper:.3f}' if paper is not None else '–'
    diff = f'{mean - paper:+.3f}' if mean is not None and paper is not None else '–'
    return f"{measured} / {paper_s} / {f'**{diff}**' if outside(values, paper) else diff}"


def _table_cells(cells):
    """{(table, row id, dataset, bits): [cells over seeds]} in the cells' order."""
    out = OrderedDict()
    for c in cells:
        out.setdefault((c.table, c.row.id, c.dataset, c.bits), []).append(c)
    return out


def _where(cells):
    """'Table 1 rows a, b on cifar10, folder at 16, 64 bits, seed 0' of a group of cells."""
    def uniq(key):
        return ', '.join(str(v) for v in OrderedDict.fromkeys(key(c) for c in cells))
    seeds = OrderedDict.fromkeys(c.seed for c in cells)
    return (f"{uniq(lambda c: _table_name(c.table))} row{'s' * (len({c.row.id for c in cells}) > 1)} "
            f"{uniq(lambda c: c.row.id)} on {uniq(lambda c: c.dataset)} at {uniq(lambda c: c.bits)} bits, "
            f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}")


def absent_lines(cells):
    """Lines saying which cells of a table have no measurement, and why (their `why`)."""
    missing = [c for c in cells if c.result is None]
    if not missing:
        return []
    head = ('No cell of this table was measured: the paper\'s numbers stand alone' if len(missing) == len(cells)
            else f'{len(missing)} of {len(cells)} runs of this table are not measured')
    by_why = OrderedDict()
    for c in missing:
        by_why.setdefault(c.why or ('failed' if c.status == 'failed' else 'not run'), []).append(c)
    return ['', f'**{head}.**', ''] + [f'- {_where(cs)}: {why}' for why, cs in by_why.items()]


def recorded(results):
    """What the results lines say of where and when they were made: (machines, commits, newest date), each
    a string ('not recorded' where no line says)."""
    def listing(values):
        counts = OrderedDict()
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        return '; '.join(f'{v} ({n})' if len(counts) > 1 else v for v, n in counts.items()) or 'not recorded'
    machines = listing((r.get('machine') or {}).get('hardware', 'not recorded') for r in results)
    commits = listing(r.get('commit', 'not recorded') for r in results)
    dates = sorted(r['date'] for r in results if r.get('date'))
    return machines, commits, (dates[-1] if dates else 'not recorded')


# -----------------------------------------------------------------------------
# the GPU time of what would run: an ESTIMATE by arithmetic, not a measurement
# (benchmarks/estimate_gpu_time.py explains each rate; its settings override them)
GPU_RATES = dict(
    GPU_NAME='RTX 4090',      # the GPU the rates below are for: timm's published AMP forward rates, batch 1024
    GPU_VIT_B16=2269.68,      # images/s, CLIP ViT-B/16 image tower
    GPU_VIT_B32=8389.12,      # images/s, CLIP ViT-B/32 image tower
    GPU_VGG16=2165.35,        # images/s, VGG-16
    CPU_CORES=8,              # CPU cores of the GPU machine: one DataLoader worker each
    CPU_VIT_B16=4.2,          # images/s of the ViT-B/16 image tower on this project's 2 cores (bench_extract.py)
    WORKER_PHOTO=291.0,       # images/s one worker decodes and preprocesses: photos (bench_extract.py)
    WORKER_CIFAR=1114.0,      # ... 32 x 32 images (CIFAR-10)
    STEP_S=0.00185,           # a training step's fixed CPU cost (bench_train.py step_overhead_ms)
    KERNELS_PER_STEP=700,     # CUDA kernels a step launches ...
    LAUNCH_S=4e-6,            # ... at this cost each (assumed)
    EVAL_S=dict(cifar10=3.7, nuswide=4.0, flickr25k=2.6, mscoco=5.7),  # s a code length (bench_train.py)
    PROCESS_S=8.0,            # a train.py process's fixed cost: imports, loading, CUDA start
    CPU_TEXT_PROMPTS=189.7,   # prompts/s of the ViT-B/16 text tower on the CPU (bench_nouns.py)
    NOUNS_CPU_S=36.0,         # nouns_embed.py's CPU-side work on WordNet
    KMEANS_CPU_S=19.6,        # K-means of WordNet's features into 800 clusters (bench_kmeans.py)
    IMAGES=dict(cifar10=60000, nuswide=195834, flickr25k=20015, mscoco=122218),  # images of each dataset
    TRAIN=dict(cifar10=5000, nuswide=10500, flickr25k=5000, mscoco=10000),       # training images of each
    AUG_VIEWS=120,            # augmented views of every train image (dataset_extract.py's default)
    WORDNET_WORDS=117798,     # words of WordNet's noun lemmas
)
WORDS = dict(wordnet=GPU_RATES['WORDNET_WORDS'], imagenet=1000)  # words of nouns_embed.py's own vocabularies


def _gpu_images_per_s(r, backbone):
    return {'ViT-B-16': r['GPU_VIT_B16'], 'ViT-B-32': r['GPU_VIT_B32'], 'vgg16': r['GPU_VGG16']}.get(
        backbone, r['GPU_VIT_B16'])


def extract_s(r, d, backbone, views):
    """dataset_extract.py: every image's plain view and `views` augmented views of each train image, made on
    the GPU from one decode; the slower of the GPU and CPU_CORES decoding workers sets the pace."""
    plain = r['WORKER_CIFAR'] if d == 'cifar10' else r['WORKER_PHOTO']
    gpu, decode = _gpu_images_per_s(r, backbone), r['CPU_CORES'] * plain
    return r['IMAGES'][d] / min(gpu, decode) + r['TRAIN'][d] * max(views / gpu, 1 / decode)


def nouns_s(r, words):
    """nouns_embed.py: 7 prompts a word through the text tower, K-means, selection; the GPU's work is the
    CPU's divided by the GPU's speed-up on the image tower, the CPU-side work scales with the words."""
    speedup = r['GPU_VIT_B16'] / r['CPU_VIT_B16']
    gpu = (7 * words / r['CPU_TEXT_PROMPTS'] + r['KMEANS_CPU_S'] * words / r['WORDNET_WORDS']) / speedup
    return gpu + r['NOUNS_CPU_S'] * words / r['WORDNET_WORDS']


def process_s(r, d, n_bits, trained, epochs, batch_size):
    """One train.py process: its start, then per code length `epochs` x steps of training and the evaluation."""
    steps = math.ceil(r['TRAIN'][d] / batch_size)
    step = r['STEP_S'] + r['KERNELS_PER_STEP'] * r['LAUNCH_S']
    return r['PROCESS_S'] + n_bits * ((epochs * steps * step if trained else 0.0) + r['EVAL_S'][d])


def estimate(r, features, vocabs, processes, epochs, batch_size):
    """Seconds of each step: features {(dataset, backbone): augmented views}, vocabs {key: words},
    processes {name: (dataset, code lengths, trained?[, its epochs, its batch size])}: a process without its own
    schedule trains `epochs` of `batch_size` (a competitor's own steps are costed as DUH-EG's: a lower bound)."""
    ext = sum(extract_s(r, d, b, views) for (d, b), views in features.items())
    nouns = sum(nouns_s(r, w) for w in vocabs.values())
    trains = sum(process_s(r, d, len(bits), trained, *(own or (epochs, batch_size)))
                 for d, bits, trained, *own in processes.values())
    return dict(extract_s=ext, nouns_s=nouns, train_s=trains, total_s=ext + nouns + trains)


def hm(seconds):
    """'–', '0.3 s', '12 s', '7 min' or '1.3 h'."""
    if not seconds:
        return '–'
    if seconds < 60:
        return f'{seconds:.1f} s' if seconds < 10 else f'{seconds:.0f} s'
    return f'{seconds / 60:.0f} min' if seconds < 3600 else f'{seconds / 3600:.1f} h'


def _words(vocab):
    """Words of a vocabulary: nouns_embed.py's own, or a word-list file's lines."""
    if vocab in WORDS:
        return WORDS[vocab]
    with open(vocab, encoding='utf-8', errors='replace') as f:
        return sum(1 for line in f if line.strip())


def print_plan(todo, vocabs, n_cells, results_path, epochs, batch_size, r=GPU_RATES):
    """--dry_run's lines: each train.py run to do (`todo`: dicts of reproduce.plan_cells), what it reads that
    is ready or missing and the command that makes it, its command; then the GPU time of all of it, estimated
    (`vocabs`: more [(vocabulary, CLIP)] to embed, Table 4's)."""
    features, words, processes, unknown = OrderedDict(), OrderedDict.fromkeys(vocabs), OrderedDict(), set()
    for g in todo:
        bits = sorted({c.bits for c in g['cells']})
        rows = ', '.join(OrderedDict.fromkeys(f'table {c.table} row {c.row.id} ({c.row.label})' for c in g['cells']))
        print(f"to train: {g['dataset']} seed {g['seed']}, {','.join(map(str, bits))} bits: {rows}")
        d = g['paper_dataset']
        for backbone, feeds_hv, why, cmd in g['features']:
            print(f'  features: missing ({why}); would run first: {cmd}')
            key = (d, backbone)
            features[key] = max(r['AUG_VIEWS'] if feeds_hv else 0, features.get(key, 0))
        if not g['features']:
            print('  features: ready')
        ready, vocab, clip, cmd = g['nouns'] or (True, None, None, None)
        if not ready:
            words[(vocab, clip)] = None
        print(f"  nouns: {'not needed' if vocab is None else 'ready' if ready else 'missing; would run first: ' + cmd}")
        print(f"would run: {g['command']}")
        processes[g['process']] = (d, bits, g['trained'], g['epochs'], g['batch_size'])
        unknown |= {d} - set(r['TRAIN'])
    n = sum(len(g['cells']) for g in todo)
    print(f"dry run: {n_cells - n} of {n_cells} cells in {results_path}; {n} to train in {len(todo)} train.py runs; "
          f"first to extract: {len(features)} feature set(s), to embed: {len(words)} vocabularies")
    features = {k: v for k, v in features.items() if k[0] not in unknown}
    processes = {k: v for k, v in processes.items() if v[0] not in unknown}
    e = estimate(r, features, {k: _words(k[0]) for k in words}, processes, epochs, batch_size)
    print(f"estimated GPU time (an ESTIMATE by benchmarks/estimate_gpu_time.py's arithmetic for one {r['GPU_NAME']} "
          f"and {r['CPU_CORES']} CPU cores, not a measurement): extraction {hm(e['extract_s'])}, nouns "
          f"{hm(e['nouns_s'])}, training and evaluation {hm(e['train_s'])}; in all {hm(e['total_s'])}"
          + (f" (without {', '.join(sorted(unknown))}: the estimate has no sizes for it; --paper_as=D=cifar10 counts "
             f"D as CIFAR-10)" if unknown else ''))
    print('nothing was written (--dry_run)')


# -----------------------------------------------------------------------------
# Figures 3-4 (precision-recall, precision@N) and 6-7 (retrieval examples, top nouns) from the run folders
def _codes_key(result):
    path = os.path.join(result['run_dir'], 'codes.npz')
    if not os.path.exists(path):
        return path, None
    st = os.stat(path)
    return path, f'{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}'


def _evaluate(path):
    """The PR curve over ranks and precision@N of one codes.npz (eval_hash.evaluate_all, or evaluate_quantized
    for product-quantized codes: every metric, of which Figures 3-4 draw two), and the seconds it took."""
    t0 = time.time()
    with np.load(path) as z:
        z = {k: z[k] for k in z.files}
    if 'codebooks' in z:
        m = eval_hash.evaluate_quantized(z['query_h'], z['retrieval_h'], z['retrieval_codes'], z['codebooks'],
                                         z['query_labels'], z['retrieval_labels'], int(z['topk']), str(z['aqd']))
    else:
        m = eval_hash.evaluate_all(z['query_h'], z['retrieval_h'], z['query_labels'], z['retrieval_labels'],
                                   int(z['topk']))
    return dict(pr=m['pr_curve_rank'], pn=m['p_at_n'], map=m['map'], seconds=round(time.time() - t0, 2))


def fill_curves(results, store):
    """Put into `store` (curves.json) the curves of every results line's codes.npz it does not hold for that
    very file, evaluated side by side in processes of eval_hash.WORKERS threads each, as the cores allow."""
    todo = OrderedDict((key, path) for path, key in map(_codes_key, results) if key and key not in store)
    workers = min(len(todo), max(1, (os.cpu_count() or 1) // eval_hash.WORKERS))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
            store.update(zip(todo, pool.map(_evaluate, todo.values())))
    else:
        store.update((key, _evaluate(path)) for key, path in todo.items())


def _safe(d):
    """A file name's part for a dataset's label: 'CIFAR-10' -> 'cifar10', 'folder (paper: ...)' -> 'folder'."""
    return d.split(' ')[0].lower().replace('-', '')


def figure_curves(out_dir, runs, store):
    """Figures 3 and 4: per dataset one PNG of precision-recall and one of precision@N, a line per row
    (`runs`: {dataset: [(label, result)]}). Returns (lines, {dataset: (figure 3 PNG, figure 4 PNG)})."""
    lines, pngs = [], {}
    fill_curves([r for rows in runs.values() for _, r in rows], store)
    for d, rows in runs.items():
        curves = [(label, store.get(_codes_key(r)[1])) for label, r in rows]
        curves = [(label, c) for label, c in curves if c]
        if not curves:
            lines.append(f'- {d}: no run of these tables at this code length was measured (or its codes.npz is gone)')
            continue
        pngs[d] = (f'figure3_{_safe(d)}.png', f'figure4_{_safe(d)}.png')
        for png, kind, title in zip(pngs[d], ('pr', 'pn'), ('precision-recall', 'precision@N')):
            figures.plot_curves({label: c[kind] for label, c in curves}, os.path.join(out_dir, png), kind,
                                  f'{d}: {title}')
        lines.append(f'- {d}: ' + ', '.join(f"{label} (MAP {c['map']:.3f})" for label, c in curves))
    return lines, pngs


def plot_figure5(panels, path, bits):
    """Figure 5: a panel per (name, x label, ticks, lines, the x of a red vertical line or None), each line
    (label, paper's name, (colour, marker), measured [(x, mean, std)], paper [(x, MAP)]): the measured
    points with their std over seeds, a star at the best, the paper's hollow."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.2 * len(panels), 4))
    for j, (name, xlabel, ticks, lines, red) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for label, paper_name, (colour, marker), measured, paper in lines:
            if measured:
                xs, ys, es = zip(*measured)
                ax.errorbar(xs, ys, yerr=es if any(es) else None, color=colour, marker=marker, ms=5, capsize=2,
                            label=label)
                best = int(np.argmax(ys))
                ax.plot(xs[best], ys[best], marker='*', ms=16, color=colour, markeredgecolor='k', zorder=5)
            if paper:
                ax.plot(*zip(*paper), linestyle='none', marker=marker, ms=8, markerfacecolor='none', color=colour,
                        label=f'paper, {paper_name}')
        if red is not None:
            ax.axvline(red, color='red', lw=1)
        if len(ticks) <= 12:
            ax.set_xticks([float(t) for t in ticks], ticks, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f'MAP ({bits} bits)')
        ax.set_title(f"{name} measured; star: best measured, hollow: paper", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)


def figure_examples(out_dir, runs, bits, n):
    """Figures 6 and 7 for the first `n` queries of one run per dataset (`runs`: {dataset: result or why
    there is none}), drawn by figures.draw_examples and copied beside the report. Returns ({dataset:
    [Figure 6 PNGs]}, {dataset: [Figure 7 PNGs]}, {dataset: why there is no picture})."""
    six, seven, why = {}, {}, {}
    for d, r in runs.items():
        if not isinstance(r, dict):
            why[d] = r
            continue
        run = os.path.dirname(os.path.normpath(r['run_dir']))
        out = io.StringIO()
        try:
            with np.load(os.path.join(r['run_dir'], 'codes.npz')) as z, redirect_stdout(out):
                z = {k: z[k] for k in z.files}
                drawn = figures.draw_examples(run, bits, z, eval_hash.rank_topk(z, min(10, len(z['retrieval_index'])),
                                                                                n)[0])
        except (OSError, ValueError, KeyError, SystemExit) as e:
            drawn, out = [], io.StringIO(f'no Figure 6-7 pictures: {str(e)[:200]}')
        said = [l for l in out.getvalue().splitlines() if l.startswith('no Figure')]
        for p in drawn:
            fig = 6 if os.path.basename(p).startswith('top10') else 7
            name = f"figure{fig}_{_safe(d)}_{os.path.basename(p).split('query')[1]}"
            shutil.copyfile(p, os.path.join(out_dir, name))
            (six if fig == 6 else seven).setdefault(d, []).append(name)
        if said:
            why[d] = '; '.join(said)
    return six, seven, why


# -----------------------------------------------------------------------------
# time per step: what extraction (its config), nouns_embed.py (selection.json) and train.py recorded
def _extractions(results):
    """{(cache, dataset, backbone, weights): dataset_extract.py's record} of the features the results read."""
    out = {}
    for r in results:
        cfg = r.get('config') or {}
        for backbone, weights in ((cfg.get('BACKBONE'), cfg.get('BACKBONE_PRETRAINED')),
                                  (cfg.get('CLIP_MODEL'), cfg.get('CLIP_PRETRAINED'))):
            key = (cfg.get('CACHE_DIR'), cfg.get('DATASET'), backbone, pretrained_tag(weights))
            if None in key or key in out:
                continue
            out[key] = None
            for path in sorted(glob.glob(os.path.join(cache.dataset_dir(key[0], key[1]), 'extract_*_config.json'))):
                with open(path) as f:
                    rec = json.load(f)
                if rec.get('BACKBONE') == backbone and pretrained_tag(rec.get('BACKBONE_PRETRAINED')) == key[3]:
                    out[key] = rec
    return out


def _selections(results):
    """{vocabulary folder: [selection.json of each selection a result read]}."""
    out, seen = OrderedDict(), set()
    for r in results:
        cfg = r.get('config') or {}
        try:
            path = external.vocabulary_path(cfg) if cfg.get('EXTERNAL') == 'efc' else None
        except KeyError:  # an older line without every setting
            path = None
        sel = path and os.path.join(os.path.dirname(path), 'selection.json')
        if sel and sel not in seen and os.path.exists(sel):
            seen.add(sel)
            with open(sel) as f:
                out.setdefault(os.path.dirname(os.path.dirname(sel)), []).append((sel, json.load(f)))
    return out


def step_times(results, figure_seconds):
    """Seconds and counts of each step the results come from: extraction (every feature set read, once),
    nouns (per vocabulary its embedding and clustering once, each selection), training and evaluation
    (train.py's records; older lines without eval_seconds count as training) and the figures' evaluation."""
    ext, selections, nouns = [r for r in _extractions(results).values() if r], _selections(results), 0.0
    for sels in selections.values():
        secs = [s.get('seconds') or {} for _, s in sels]
        nouns += max(s.get('embedding', 0) for s in secs) + max(s.get('clustering', 0) for s in secs)
        nouns += sum(s.get('selection', 0) for s in secs)
    evals = sum(r.get('eval_seconds', 0) for r in results)
    return dict(extraction=(sum(r.get('seconds', 0) for r in ext), len(ext)),
                nouns=(nouns, sum(len(v) for v in selections.values())),
                training=(sum(r.get('seconds', 0) for r in results) - evals, len(results)),
                evaluation=(evals + figure_seconds, len(results)),
                machines=sorted({r.get('hardware', 'not recorded') for r in ext}))


# -----------------------------------------------------------------------------
# provenance: the code, the machines, the settings, inputs and weights of every results line
_NOT_SETTINGS = ('RUN_DIR', 'RESULTS', 'BITS', 'DATASET', 'SEED', 'METHOD', 'FORCE')  # columns of their own, or paths


def flag(k, v):
    """--key=value of a setting (booleans true/false, tuples comma-separated)."""
    if isinstance(v, bool):
        v = 'true' if v else 'false'
    elif isinstance(v, (tuple, list)):
        v = ','.join(str(x) for x in v)
    return f'--{k.lower()}={v}'


def _settings(results):
    """(the settings every results line shares, as --key=value, [each line's other settings])."""
    cfgs = [{k: json.dumps(v, default=str) for k, v in (r.get('config') or {}).items() if k not in _NOT_SETTINGS}
            for r in results]
    keys = sorted({k for c in cfgs for k in c})
    common = [k for k in keys if cfgs and all(k in c and c[k] == cfgs[0][k] for c in cfgs)]
    shown = lambda k, text: flag(k, json.loads(text))
    return ([shown(k, cfgs[0][k]) for k in common],
            [' '.join(shown(k, c[k]) for k in keys if k in c and k not in common) for c in cfgs])


def _short(text, n=12):
    return f'`{text[:n]}`' if text else ''


def provenance_lines(out_dir, results, users):
    """The provenance section: `results` the distinct results lines of the report, `users` {id: the table
    cells each serves}."""
    machines = OrderedDict()
    for r in results:
        m = provenance.describe(r.get('machine'))
        machines[m] = machines.get(m, 0) + 1
    _, commits, date = recorded(results)
    common, own = _settings(results)
    lines = ['## Provenance', '',
             f'- This report: assembled by commit {provenance.git_commit()} of this code from {len(results)} results '
             f'lines (train.py runs), the newest written {date}.',
             f'- The runs were trained by commit: {commits}.',
             '- Machines (results lines): ' + ('; '.join(f'{m} ({n})' for m, n in machines.items()) or 'none') + '.',
             '- Settings every run shares (train.py): ' + (' '.join(f'`{a}`' for a in common) or 'none') + '.',
             '- To rerun a run: `python train.py` with the shared settings, the run\'s own settings and its '
             '`--dataset`, `--method`, `--bits`, `--seed`; its run key (sha256 of its settings and inputs) is the '
             'run folder\'s `run.json`. Inputs are named by their fingerprints (the sha256 their cache sidecars '
             'record), the trained heads by the sha256 of `heads.pt`.', '',
             '| # | table cells | dataset | method | bits | seed | MAP | own settings | date | commit | seconds '
             '(train + eval) | run key | run folder | features | vocabulary | heads.pt sha256 |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for i, (r, mine) in enumerate(zip(results, own), 1):
        inputs, secs, ev = r.get('inputs') or {}, r.get('seconds'), r.get('eval_seconds')
        took = '–' if secs is None else f'{secs - ev:.1f} + {ev:.1f}' if ev is not None else f'{secs:.1f}'
        folder = os.path.relpath(os.path.dirname(os.path.normpath(r.get('run_dir', '.'))), out_dir)
        cfg, hashes = r.get('config') or {}, [_short(r.get('run_key')), _short(inputs.get('features')),
                                                _short(inputs.get('vocabulary'))]
        lines.append(f"| {i} | {users[id(r)]} | {r.get('dataset')} | {r.get('method', 'duheg')} | {r.get('bits')} | "
                     f"{cfg.get('SEED', '–')} | {r['map']:.4f} | {mine or '–'} | {r.get('date', 'not recorded')} | "
                     f"{r.get('commit', 'not recorded')} | {took} | {hashes[0] or '–'} | `{folder}` | "
                     f"{hashes[1] or '–'} | {hashes[2] or '–'} | "
                     f"{_short(r.get('heads_sha256'), 16) or 'not recorded'} |")
    seen = OrderedDict()
    for r in results:
        for name, fp in sorted((r.get('inputs') or {}).items()):
            seen[(name, fp)] = seen.get((name, fp), 0) + 1
    lines += ['', 'Every input file the runs read, by fingerprint:', '', '| input | sha256 | runs |', '|---|---|---|']
    return lines + [f'| {name} | `{fp}` | {n} |' for (name, fp), n in seen.items()]


# -----------------------------------------------------------------------------
# REPORT.md
_FIGURE5_PAPER = ("The paper gives Figure 5 only as a plot; its text gives the best T1 (0.9 on every dataset) "
                  "and each dataset's best T2 (CIFAR-10 0.99, NUS-WIDE 0.98, Flickr25k 0.97, MS-COCO 0.95): the hollow "
                  "markers are Table 1's numbers at those points, the only ones the paper prints.")
_FIGURE7_PAPER = ("The paper's Figure 7 (one Flickr25k image) lists as its top-5 nouns without the selection "
                  "Round_shape, Ovoid, Hair_ball, Cat_sleep and Back_circle; with the selection, of its five nouns the "
                  "text gives Black_catechu and Raised_doughnut. Ours are other images and another vocabulary "
                  "draw: compare the kind of noun, not the words.")


def _table_name(t):
    return ('Figure ' + t[3:]) if t.startswith('fig') else 'Baselines' if t == 'baselines' else f'Table {t}'


def _anchor(title):
    """GitHub's anchor of a heading."""
    keep = ''.join(ch for ch in title.lower() if ch.isalnum() or ch in ' -_')
    return keep.replace(' ', '-')


def _results_of(cells):
    """(the distinct results lines of the cells in order, {id: the table cells each serves})."""
    out, users = OrderedDict(), {}
    for c in cells:
        if c.result is not None:
            out.setdefault(id(c.result), c.result)
            users.setdefault(id(c.result), []).append(f'{_table_name(c.table)} row {c.row.id}')
    return list(out.values()), {k: '; '.join(OrderedDict.fromkeys(v)) for k, v in users.items()}


def summary_lines(cells, results, figure_seconds):
    """The summary: cells measured and within tolerance, the largest gaps, the time of each step."""
    groups = _table_cells(cells)
    measured = {k: [c.measured for c in v if c.result is not None] for k, v in groups.items()}
    compared = [(k, measured[k], v[0].paper) for k, v in groups.items() if measured[k] and v[0].paper is not None]
    within = sum(not outside(vals, paper) for _, vals, paper in compared)
    gaps = sorted(compared, key=lambda x: -abs(summary(x[1])[0] - x[2]))[:5]
    t = step_times(results, figure_seconds)
    total = sum(t[k][0] for k in ('extraction', 'nouns', 'training', 'evaluation'))
    machines, _, _ = recorded(results)
    lines = ['## Summary', '',
             f'- **Cells**: {len(groups)} table cells (a row on a dataset at a code length, mean over its seeds); '
             f'{sum(1 for v in measured.values() if v)} measured, {sum(1 for v in measured.values() if not v)} not '
             f'(see [missing cells](#missing-cells)). Of the {len(compared)} measured cells with a paper number, '
             f'**{within} lie within tolerance** of it and {len(compared) - within} outside (more than 2 std over '
             f'seeds from it, or 0.01 with one seed; their difference is in bold).',
             '- **Largest gaps** (measured / paper / difference): ' + ('; '.join(
                 f'{_table_name(k[0])} row {k[1]}, {k[2]}, {k[3]} bits: {cell_text(vals, paper)}'
                 for k, vals, paper in gaps) or 'none') + '.',
             f'- **Time spent**, as each step recorded it: {hm(total)} in all; extraction {hm(t["extraction"][0])} '
             f'({_n(t["extraction"][1], "feature set")}, on {", ".join(t["machines"]) or "not recorded"}), nouns '
             f'{hm(t["nouns"][0])} ({_n(t["nouns"][1], "selection")}), training {hm(t["training"][0])} and evaluation '
             f'{hm(t["evaluation"][0])} ({t["training"][1]} train.py runs, on {machines}; evaluation includes '
             f'{hm(figure_seconds)} of Figures 3-4).']
    return lines


def _n(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def _figure_lines(number, title, pngs, note, absent):
    lines = [f'## Figure {number}: {title}', '', note, '']
    for d, names in pngs.items():
        lines += [f'**{d}**', ''] + [f'![Figure {number}, {d}]({n})' for n in names] + ['']
    return lines + [f'- {d}: {why}' for d, why in absent.items()] + ([''] if absent else [])


def write_report(out_dir, tables, figure5, cells, curve_runs, example_runs, bits, n_examples):
    """Write out_dir/REPORT.md: `tables` [the Markdown lines of each] in order, `figure5` (its lines, its PNG
    name or None), `cells` every cell of them, `curve_runs` {dataset: [(row label, result)]} for Figures 3-4
    and `example_runs` {dataset: result, or why there is none} for Figures 6-7, at `bits`. Returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    store_path = os.path.join(out_dir, 'curves.json')
    store = {}
    if os.path.exists(store_path):
        with open(store_path) as f:
            store = json.load(f)
    curve_lines, pngs = figure_curves(out_dir, curve_runs, store)
    save_json(store_path, store)
    used = {_codes_key(r)[1] for rows in curve_runs.values() for _, r in rows} - {None}
    figure_seconds = sum(store[k]['seconds'] for k in used if k in store)
    six, seven, why = figure_examples(out_dir, example_runs, bits, n_examples)
    results, users = _results_of(cells)
    head = ['# Reproducing "Deep Unsupervised Hashing via External Guidance" (ICML 2025)', '',
             'Every table and figure of the paper beside what this code measured (`python reproduce.py --table=all`; '
             '`--report_only` rebuilds this file from the results file and run folders). Each cell: measured '
             '(mean ± std over seeds) / paper / measured − paper. The paper\'s numbers are copied from its tables; '
             'nothing here is invented, and where a measurement is absent the place says so.', '']
    head += summary_lines(cells, results, figure_seconds)
    lines = []
    for table in tables:
        lines += table + ['']
    fig34 = (f'One line per row of Table 1 and the baselines table that ran at {bits} bits (first seed). The paper '
             'gives Figures 3 and 4 only as plots, so no paper points are drawn (none are invented). Curves '
             '(eval_hash.evaluate_all on each run\'s codes.npz):')
    lines += _figure_lines(3, f'precision-recall curves, {bits} bits', {d: [p[0]] for d, p in pngs.items()},
                           fig34 + '\n\n' + '\n'.join(curve_lines), {})
    lines += _figure_lines(4, f'precision at the top N, {bits} bits', {d: [p[1]] for d, p in pngs.items()},
                           'The runs of Figure 3; the paper gives Figure 4 only as a plot.', {})
    lines += ['## Figure 5: MAP as T1 (a) and T2 (b) vary', '', _FIGURE5_PAPER, '']
    lines += ([f'![Figure 5]({figure5[1]})', ''] if figure5[1] else ['Figure 5 is not drawn here.', '']) + figure5[0]
    lines += _figure_lines(6, f'top-10 retrievals, {bits} bits', six, 'The first queries of Table 1\'s CLIP row '
                           '(T2 = 0.97); a green frame: the item shares a label with the query, red: it does not. '
                           '(The paper sets HHCH\'s top 10 beside DUH-EG\'s; here DUH-EG\'s alone.)',
                           {d: w for d, w in why.items() if d not in six})
    lines += _figure_lines(7, 'top-5 nouns of an image (Eq. 6), with and without the selection', seven,
                           _FIGURE7_PAPER, {d: why.get(d, 'this run has no nouns to draw (not an EFC run)')
                                            for d in example_runs if d not in seven})
    missing = [absent_lines([c for c in cells if c.table == t])[1:] for t in OrderedDict.fromkeys(c.table
                                                                                                 for c in cells)]
    lines += ['## Missing cells', ''] + (sum(missing, []) or ['None: every cell was measured.']) + ['']
    lines += provenance_lines(out_dir, results, users)
    contents = [f"- [{h.split(':')[0].split(' (')[0]}](#{_anchor(h)})" for h in (l[3:] for l in lines
                                                                              if l.startswith('## '))]
    path = os.path.join(out_dir, 'REPORT.md')
    save_text(path, head + ['', '## Contents', ''] + contents + [''] + lines)
    return path
