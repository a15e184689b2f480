"""Step 4: the paper's tables and figures, one command each, with the paper's numbers beside ours.

    python reproduce.py --table=1                     # Table 1: DUH-EG (VGG-16 / CLIP, T2 = 0.97 and best T2) and
                                                      # every competitor row (ours measured, or the paper's, copied)
    python reproduce.py --table=2 --datasets=cifar10,mscoco --seeds=0,1,2
    python reproduce.py --table=3                     # IMGAUG, IMGK, EK, IMGCLS, EFC
    python reproduce.py --table=5 --vocab_files=conceptnet=words/conceptnet.txt,glove=words/glove.txt
    python reproduce.py --table=6                     # CLIP ViT-B/32 against ViT-B/16
    python reproduce.py --table=fig5                  # Figure 5a (T1) and 5b (T2) at 64 bits, a PNG
    python reproduce.py --table=4                     # pre-processing time of each vocabulary
    python reproduce.py --table=baselines             # DUH-EG and every baseline of train.py on one protocol
    python reproduce.py --table=all                   # every table and figure, and one report: OUT_DIR/REPORT.md
    python reproduce.py --table=all --report_only     # the report again from what has run; trains nothing
    python reproduce.py --table=all --dry_run         # what is ready, what is missing, the GPU time; writes nothing

Every cell (row x dataset x code length x seed) is one `python train.py ...` run of its own
process (one process per row, dataset and seed trains its missing code lengths), so no setting
leaks from one cell into the next and a kill loses at most the cell in progress. train.py appends
each finished cell to RESULTS; a cell whose settings match a line there is not trained again.
Cells print one line each as they finish (`cell table=... map=... paper=... diff=...`); the table
is printed as Markdown and written to OUT_DIR/table<N>.md; --table=all also writes REPORT.md (report.py):
every table and figure beside the paper's, a summary and each cell's provenance. Features must be
extracted first (dataset_extract.py); the noun selection (nouns_embed.py) is run here where a cell
needs it. How long a table takes on one GPU: --dry_run estimates what is left (report.py's arithmetic,
benchmarks/estimate_gpu_time.py's from empty caches; an estimate, no GPU timed it).
"""
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import baselines
import cache
import dataset
import models
import nouns_embed
import report
import runs
import train  # train.py's settings: their defaults and types, and T2_BEST (Figure 5b)
from cache import feature_dir, save_text, selection_dir, vocab_dir, vocab_sample
from configurator import check_choice, check_ranges, configure, released_defaults
from models import hardware, pretrained_tag
from paper import BEST, PAPER, PAPER_BITS, PAPER_DATASETS, PAPER_TABLE4, T2_COMMON, TABLES, Row
from provenance import git_commit
from report import cell_text, flag, summary
from runs import read_results

# what to reproduce
TABLE = '1'                 # 1 | 2 | 3 | 4 | 5 | 6 | fig5a | fig5b | fig5 (both) | baselines | all (every table and
                            # figure, and OUT_DIR/REPORT.md)
ROWS = ()                   # only these rows of the table (row ids: see the ROW column); () = all
DATASETS = ('cifar10', 'nuswide', 'flickr25k', 'mscoco')  # the table's columns
BITS = (16, 32, 64)         # code lengths
SEEDS = (0,)                # train.py --seed; several: each cell is mean +- std over them
# features and models (what dataset_extract.py wrote to CACHE_DIR)
CACHE_DIR = nouns_embed.CACHE_DIR  # dataset_extract.py's and nouns_embed.py's files
CLIP_MODEL = nouns_embed.CLIP_MODEL  # the CLIP of every CLIP row: the image backbone and the space of the nouns:
                            # ViT-B-16 | ViT-B-32 | tiny-test (a tiny CLIP for quick runs and tests)
CLIP_PRETRAINED = nouns_embed.CLIP_PRETRAINED  # its weights: tag, checkpoint file or 'random' (no download)
CNN_BACKBONE = 'vgg16'      # Table 1's CNN row (its external features still come from CLIP_MODEL)
CNN_PRETRAINED = 'imagenet' # its weights: 'imagenet', a .pth file or 'random'
ALT_CLIP = 'ViT-B-32'       # Table 6's other CLIP: backbone and space of the nouns both
ALT_CLIP_PRETRAINED = CLIP_PRETRAINED  # its weights
# the method's settings where a table's rows do not vary them
EXTERNAL = 'efc'            # efc = the paper; imgk needs no nouns_embed.py (quick checks)
RELEASED = False            # every cell as the authors' released code: train.py and nouns_embed.py --released (run
                            # dataset_extract.py --released first: their views live in <backbone>-<weights>-released)
T1_READING = ''             # Eq. 3 reading of every cell and of Figure 5a's sweep: distance | similarity; '':
                            # train.py's
                            # (distance, or similarity with --released)
VOCAB = 'wordnet'           # nouns_embed.py vocabulary: wordnet | imagenet | a word-list file; wordnet:2000 a sample
                            # of 2,000 of its words (quick runs; nouns_embed.py --vocab)
VOCAB_FILES = ()            # Tables 4-5 word lists, name=path: conceptnet=a.txt,glove=b.txt (one word a line)
N_K = train.N_K             # clusters of the noun selection (Eq. 3); nouns_embed.py's default
T1 = train.T1               # threshold of representative nouns (Eq. 3); nouns_embed.py's default
EPOCHS = train.EPOCHS       # T_max; train.py's default
TRAIN_ARGS = ''             # more train.py settings for every cell, e.g. "--batch_size=64 --warmup=2"
NOUNS_ARGS = ''             # more nouns_embed.py settings, where it has to run
# Figure 5 (the paper's grids are only drawn, not printed: these are ours)
T1_VALUES = (0.7, 0.8, 0.9, 1.0, 1.1)                                              # 5a, at each dataset's best T2
T2_VALUES = (0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.00)     # 5b (paper: 0.90 to 1.00)
FIG5_BITS = 64              # code length of Figure 5
# baselines
METHODS = ('duheg', 'ssdh', 'cibhash', 'dhn', 'dch', 'dqn', 'dvsq', 'dtq', 'lsh', 'itq', 'hhch', 'mecoq', 'cghash')
                            # train.py --method of each baselines row; Table 1 trains the competitors named here
                            # (the others' rows are left out)
COMPETITOR_EPOCHS = 0       # hhch, mecoq, cghash cells: 0 = their authors' schedules (80, 50, 400 epochs); N: N epochs
                            # each (quick checks; EPOCHS is DUH-EG's and the baselines')
# output
OUT_DIR = 'runs/reproduce'  # table<N>.md, figure5*.png, REPORT.md and its figures, logs/, runs/
RESULTS = ''                # '' -> OUT_DIR/results.jsonl; shared by all tables, so a shared cell trains once
PAPER_AS = ()               # compare dataset A with dataset B's paper numbers (and best T2): A=B (quick checks)
DRY_RUN = False             # each train.py run to do: its rows, what is ready and missing, its command, and the
                            # estimated GPU time of it all; writes nothing
REPORT_ONLY = False         # train nothing: the tables (and REPORT.md) from RESULTS and the run folders, the missing
                            # cells named
EXAMPLES = 1                # REPORT.md: queries of each dataset drawn in Figures 6 (top 10) and 7 (top-5 nouns)
FIGURE_BITS = 64            # REPORT.md: code length of Figures 3, 4, 6 and 7 (the paper's 64)
TABLE4_CACHE_DIR = ''       # Table 4: '' reads CACHE_DIR's selection.json; an empty folder times every step anew

_ROOT = os.path.dirname(os.path.abspath(__file__))
_ALL = ('4', '1', '2', '3', '5', '6', 'fig5a', 'fig5b', 'baselines')  # --table=all (Table 4 first: its nouns)
_REPORT_ORDER = ('1', '2', '3', '4', '5', '6', 'baselines')  # REPORT.md's tables; then Figures 3-7
_CURVE_TABLES = ('1', 'baselines')  # the rows drawn in Figures 3-4, one line each

# a --vocab_files name compared with the paper's row of that vocabulary (imagenet21k: the paper's 21,843 names)
VOCAB_PAPER_ROWS = {'conceptnet': 'table5 conceptnet', 'glove': 'table5 glove', 'imagenet21k': 'table5 imagenet'}
METHOD_NAMES = {'duheg': 'DUH-EG (T2 = 0.97)', 'cibhash': 'CIBHash', 'hhch': 'HHCH, its authors\' loop',
                'mecoq': 'MeCoQ, its authors\' loop (product quantization, AQD ranking)',
                'cghash': 'CGHash, its authors\' loop'}  # the baselines rows' labels (else upper case)
NAMES = {'cifar10': 'CIFAR-10', 'nuswide': 'NUS-WIDE', 'flickr25k': 'Flickr25k', 'mscoco': 'MS-COCO'}

def vocab_rows():
    """Table 4-5 rows: ImageNet-1k class names, WordNet, then each VOCAB_FILES word list."""
    rows = [Row('imagenet', 'ImageNet-1k class names (paper: 21,843 names)', 'table5 imagenet',
                dict(VOCAB='imagenet', EXTERNAL='efc', T2=BEST)),
            Row('wordnet', 'WordNet nouns', 'table1 best', dict(VOCAB='wordnet', EXTERNAL='efc', T2=BEST))]
    for name, path in vocab_files().items():
        paper = VOCAB_PAPER_ROWS.get(name.lower())
        rows.append(Row(name, f'{name} ({os.path.basename(path)})', paper, dict(VOCAB=path, EXTERNAL='efc', T2=BEST)))
    return rows


def table_rows(table):
    """The rows of `table`, restricted to ROWS when given."""
    if table == '5':
        rows = vocab_rows()
    elif table == 'fig5a':  # the paper's curve passes through Table 1's best-T2 row at T1 = 0.9
        rows = [Row(f'{t:g}', f'T1 = {t:g}', 'table1 best' if math.isclose(t, 0.9) else None,
                    dict(T1=t, EXTERNAL='efc', T2=BEST)) for t in T1_VALUES]
    elif table == 'fig5b':  # ... and 5b through Table 1's rows at T2 = 0.97 and at the best T2
        rows = [Row(f'{t:g}', f'T2 = {t:g}', {d: ('table1 best' if math.isclose(t, train.T2_BEST[d]) else
                                                  'table1 clip' if math.isclose(t, T2_COMMON) else None)
                                              for d in PAPER_DATASETS}, dict(T2=t)) for t in T2_VALUES]
    elif table == 'baselines':
        rows = [Row(m, METHOD_NAMES.get(m, m.upper()), 'table1 clip' if m == 'duheg' else None,
                    dict(METHOD=m, T2=T2_COMMON)) for m in METHODS]
        if 'cibhash' in METHODS:  # CIBHash's own protocol: frozen VGG-16 features, as the paper's Table 1 row
            rows.append(Row('cibhash-vgg16', 'CIBHash, VGG-16 features', 'table1 cibhash',
                            dict(METHOD='cibhash', BACKBONE='cnn', T2=T2_COMMON)))
        rows = [r._replace(label=r.label + ' (supervised: reads labels' + (
            '; product quantization, AQD ranking)' if r.settings['METHOD'] in baselines.QUANTIZED else ')'))
                if r.settings['METHOD'] in baselines.SUPERVISED else r for r in rows]
    else:  # Table 1's competitor rows: only the methods of METHODS
        rows = [r for r in TABLES[table][1] if (r.settings or {}).get('METHOD', 'duheg') in METHODS + ('duheg',)]
    if ROWS:
        unknown = [r for r in ROWS if r not in [row.id for row in rows]]
        if unknown:
            raise SystemExit(f"error: --rows: table {table} has no row {', '.join(unknown)}; its rows: "
                             f"{', '.join(r.id for r in rows)}")
        rows = [r for r in rows if r.id in ROWS]
    return rows


# -----------------------------------------------------------------------------
# cells: the train.py settings of each, and the config train.py records for it
def paper_dataset(d):
    return dict(p.split('=', 1) for p in PAPER_AS).get(d, d)


def vocab_files():
    out = OrderedDict()
    for item in VOCAB_FILES:
        name, eq, path = item.partition('=')
        if not eq or not name or not path:
            raise SystemExit(f"error: --vocab_files takes name=path pairs, got {item!r}")
        out[name] = os.path.abspath(path)
    return out


def paper_value(row, d, bits):
    key = row.paper.get(paper_dataset(d)) if isinstance(row.paper, dict) else row.paper
    values = PAPER.get((key, paper_dataset(d)))
    return values[PAPER_BITS.index(bits)] if values and bits in PAPER_BITS else None


def t1_reading():
    """The reading of Eq. 3 of every cell: T1_READING, else train.py's (by RELEASED)."""
    return released_defaults(dict(T1_READING=T1_READING, RELEASED=RELEASED), train.RELEASED_DEFAULTS)['T1_READING']


def train_defaults():
    """train.py's settings and their defaults, as its `configure` sees them."""
    g = {k: v for k, v in vars(train).items()}
    return configure(g, [])


def train_args():
    """TRAIN_ARGS as typed train.py settings (checked against train.py's own settings)."""
    argv = shlex.split(TRAIN_ARGS)
    g = {k: v for k, v in vars(train).items()}
    try:
        configure(g, argv)
    except SystemExit as e:
        raise SystemExit(f"error in --train_args={TRAIN_ARGS!r}: {str(e.code).removeprefix('error: ')}") from None
    keys = [a[2:].partition('=')[0].replace('-', '_').upper() for a in argv]
    return {k: g[k] for k in keys}


def cell_settings(row, d, seed, extra):
    """train.py settings (UPPER_CASE names, typed values) of `row` on dataset `d` with `seed`."""
    s = dict(METHOD='duheg', DATASET=d, SEED=seed, CACHE_DIR=os.path.abspath(CACHE_DIR), EPOCHS=EPOCHS,
             EXTERNAL=EXTERNAL, VOCAB=VOCAB, N_K=N_K, T1=T1, T2=T2_COMMON)
    if RELEASED:
        s['RELEASED'] = True
    if T1_READING:
        s['T1_READING'] = T1_READING
    s.update(extra)
    s.update(row.settings)
    if s['METHOD'] in baselines.COMPETITORS:  # a competitor: its authors' schedule, unless COMPETITOR_EPOCHS
        s.pop('EPOCHS')
        s.update({'EPOCHS': COMPETITOR_EPOCHS} if COMPETITOR_EPOCHS else {})
    backbone = s.pop('BACKBONE', 'clip')
    clip = (ALT_CLIP, ALT_CLIP_PRETRAINED) if backbone == 'alt' else (CLIP_MODEL, CLIP_PRETRAINED)
    s['BACKBONE'], s['BACKBONE_PRETRAINED'] = (CNN_BACKBONE, CNN_PRETRAINED) if backbone == 'cnn' else clip
    s['CLIP_MODEL'], s['CLIP_PRETRAINED'] = clip
    if s['T2'] == BEST:
        s['T2'] = train.T2_BEST.get(paper_dataset(d), T2_COMMON)
    if vocab_sample(s['VOCAB'])[0] not in ('wordnet', 'imagenet'):  # a word-list file, or a sample of one
        s['VOCAB'] = os.path.abspath(s['VOCAB'])
    return s


def expected_config(settings, bits, defaults):
    """The config train.py records for these settings: its defaults, the settings, and what
    train.main resolves (BACKBONE_PRETRAINED '' and TAU2 0 mean 'the default for this case')."""
    cfg = dict(defaults, **settings, BITS=bits)
    cfg['BACKBONE_PRETRAINED'] = cfg['BACKBONE_PRETRAINED'] or models.default_weights(cfg['BACKBONE'])
    cfg['TAU2'] = train.tau2_for(cfg['DATASET'], cfg['TAU2'])
    cfg.update(released_defaults(cfg, train.RELEASED_DEFAULTS))
    cfg.update(train.method_config(cfg, settings))  # a competitor: its schedule unless given, its settings
    return cfg


def _same(a, b):
    a, b = json.loads(json.dumps(a, default=str)), json.loads(json.dumps(b, default=str))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def matches(result, cfg, defaults):
    """Does the results line `result` hold the cell whose config is `cfg`? Every setting but
    runs.NOT_RESULT must agree; a setting the line does not record (an older train.py) must be at its default."""
    got = result.get('config') or {}
    if result.get('dataset') != cfg['DATASET'] or result.get('bits') != cfg['BITS'] \
            or result.get('method', 'duheg') != cfg['METHOD'] or not isinstance(result.get('map'), (int, float)):
        return False
    for k, v in cfg.items():
        if k in runs.NOT_RESULT:
            continue
        if k not in got:
            if k not in defaults or not _same(v, defaults[k]):
                return False
        elif not (type(got[k]) is type(v) and got[k] == v) and not _same(got[k], v):  # the plain case first: fast
            return False
    return True


def changed_inputs(result, cfg):
    """The inputs of a results line (train.input_paths: features, views, split, vocabulary) whose
    fingerprint is no longer what the line recorded: the same rule as every cache's."""
    recorded = result.get('inputs') or {}
    return [name for name, path in train.input_paths(cfg).items()
            if name in recorded and os.path.exists(path) and cache.fingerprint(path) != recorded[name]]


def find_result(cell, results, defaults):
    for r in reversed(results):  # the latest matching line
        if matches(r, cell.cfg, defaults):
            changed = changed_inputs(r, cell.cfg)
            if changed:
                cell.why = f"trained again: its {', '.join(changed)} changed since the results line"
                return None
            return r
    return None


def compared(result):
    """The MAP of a results line that is compared with the paper's: the Hamming MAP of the sign codes
    (the paper's text), or with --released the authors' own metric, the continuous-output MAP
    (their evaluation ranks the tanh outputs by np.argsort; train.py's map_continuous equals it)."""
    return result['map_continuous'] if RELEASED and result.get('method', 'duheg') == 'duheg' else result['map']


class Cell:
    def __init__(self, table, row, d, bits, seed, settings, defaults):
        self.table, self.row, self.dataset, self.bits, self.seed = table, row, d, bits, seed
        self.settings = settings
        self.cfg = expected_config(settings, bits, defaults)
        self.result, self.status, self.why = None, 'pending', ''

    @property
    def paper(self):
        return paper_value(self.row, self.dataset, self.bits)

    @property
    def measured(self):
        return compared(self.result) if self.result else None

    def line(self):
        m = compared(self.result) if self.result else None
        p = self.paper
        fmt = lambda x, f: 'none' if x is None else format(x, f)
        diff = m - p if m is not None and p is not None else None
        metric = 'map_continuous' if RELEASED else 'map'  # the released evaluation's metric, or the paper's
        hamming = f" hamming_map={fmt(self.result['map'], '.4f')}" if RELEASED and self.result else ''
        text = (f"cell table={self.table} row={self.row.id} dataset={self.dataset} bits={self.bits} seed={self.seed} "
                f"{metric}={fmt(m, '.4f')} paper={fmt(p, '.3f')} diff={fmt(diff, '+.4f')}{hamming} "
                f"status={self.status}")
        return text + (f" why={self.why!r}" if self.why else '')


def make_cells(table, defaults, extra):
    """Every cell of `table` (a copied row, settings None, has none: nothing of it is measured)."""
    return [Cell(table, row, d, bits, seed, cell_settings(row, d, seed, extra), defaults)
            for row in table_rows(table) if row.settings is not None for d in DATASETS
            for bits in (BITS if not table.startswith('fig5') else (FIG5_BITS,))
            for seed in SEEDS]


# -----------------------------------------------------------------------------
# inputs a cell needs: features (dataset_extract.py, checked) and nouns (nouns_embed.py, run here)
def missing_feature_sets(s):
    """[(backbone, weights, why, the dataset_extract.py command)] of the features a cell reads that are missing."""
    need = [(s['BACKBONE'], s['BACKBONE_PRETRAINED']), (s['CLIP_MODEL'], s['CLIP_PRETRAINED'])]
    recipe = released_defaults(s, train.RELEASED_DEFAULTS)['VIEW_RECIPE']
    out = []
    for backbone, weights in OrderedDict.fromkeys(need):
        path = os.path.join(feature_dir(s['CACHE_DIR'], s['DATASET'], backbone, weights, recipe), 'images.npy.json')
        if not os.path.exists(path):
            extra = f" --clip_model={s['CLIP_MODEL']} --clip_pretrained={s['CLIP_PRETRAINED']}" \
                if backbone not in models.CLIP_MODELS else ''
            extra += ' --released' if s.get('RELEASED') else (' --view_recipe=released' if recipe == 'released' else '')
            out.append((backbone, weights, f"{path} is missing", f"python dataset_extract.py --dataset={s['DATASET']} "
                        f"--backbone={backbone} --backbone_pretrained={weights}{extra} --cache_dir={s['CACHE_DIR']}"))
    return out


def missing_features(s):
    """'' when the features a cell reads are extracted, else what is missing and the command that makes it."""
    for backbone, _, why, cmd in missing_feature_sets(s)[:1]:
        return f"no {backbone} features of {s['DATASET']} ({why}): run {cmd}"
    return ''


def nouns_command(cache_dir, vocab, clip_model, clip_pretrained, n_k, t1, released=False, reading=None):
    cmd = [sys.executable, os.path.join(_ROOT, 'nouns_embed.py'), f'--vocab={vocab}', f'--clip_model={clip_model}',
           f'--clip_pretrained={clip_pretrained}', f'--cache_dir={cache_dir}', f'--n_k={n_k}', f'--t1={t1}']
    return (cmd + (['--released=true'] if released else []) + ([f'--t1_reading={reading}'] if reading else [])
            + shlex.split(NOUNS_ARGS))


def run_nouns(cmd, log_path):
    """Run nouns_embed.py; returns (its last output line, '') or ('', why it failed)."""
    print('nouns: ' + shlex.join(['python'] + cmd[1:]), flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, 'a') as log:
        proc = subprocess.run(cmd, cwd=_ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                              preexec_fn=_die_with_parent)
        log.write(proc.stdout)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    if proc.returncode != 0:
        return '', f"nouns_embed.py failed ({proc.returncode}): {_tail(log_path)} (log: {log_path})"
    return (lines[-1] if lines else ''), ''


def needs_nouns(s):
    """Does the cell with train.py settings `s` read nouns_embed.py's output? (DUH-EG with EXTERNAL
    efc, ek or imgcls; imgk and none use no nouns, the baselines no external feature.)"""
    return s['METHOD'] == 'duheg' and s['EXTERNAL'] not in ('imgk', 'none')


def nouns_need(s):
    """(the file of nouns_embed.py a cell reads, the command that makes it), or None (needs_nouns)."""
    if not needs_nouns(s):
        return None
    released = bool(s.get('RELEASED', train.RELEASED))
    reading = released_defaults(s, train.RELEASED_DEFAULTS)['T1_READING']
    args = (s['CACHE_DIR'], s['VOCAB'], s['CLIP_MODEL'], s['CLIP_PRETRAINED'])
    if s['EXTERNAL'] == 'efc':
        path = os.path.join(selection_dir(*args, s['N_K'], s['T1'], released, reading), 'selected_feats.npy.json')
    else:
        path = os.path.join(vocab_dir(*args, released), 'noun_feats.npy.json')
    return path, nouns_command(*args, s['N_K'], s['T1'], released, reading)


def prepare_nouns(s, done):
    """Make the noun features / selection a cell reads (needs_nouns). Returns '' or why it cannot be made."""
    need = nouns_need(s)
    if need is None or os.path.exists(need[0]):
        return ''
    path, cmd = need
    if tuple(cmd) not in done:
        done[tuple(cmd)] = run_nouns(cmd, os.path.join(OUT_DIR, 'logs', 'nouns_embed.log'))[1]
    return done[tuple(cmd)] or ('' if os.path.exists(path) else f"nouns_embed.py ran but {path} is missing")


def missing_why(s):
    """'' when a cell's inputs are ready, else what is missing (features first, then nouns) and its command."""
    need = nouns_need(s)
    if missing_features(s) or need is None or os.path.exists(need[0]):
        return missing_features(s)
    return f"no noun selection ({need[0][:-5]} is missing): run {shlex.join(['python'] + need[1][1:])}"


# -----------------------------------------------------------------------------
# training: one train.py process per (row, dataset, seed), for the code lengths not yet in RESULTS
def _die_with_parent():
    """In the child: receive SIGTERM when reproduce.py dies (Linux), so a killed run leaves no trainer behind."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the child outlives a killed parent, nothing worse
        pass


def _tail(path, n=4):
    try:
        with open(path, errors='replace') as f:
            lines = [l.strip() for l in f.read().replace('\r', '\n').splitlines() if l.strip()]
    except OSError:
        return ''
    errors = [l for l in lines if l.startswith('error') or 'Error' in l]
    return ' | '.join((errors or lines)[-n:])[-600:]


def run_name(cfg):
    """<dataset>/<name>_<key8> of the train.py run of a cell's config `cfg` (runs.run_name; the key of its
    settings, all code lengths)."""
    cfg = dict(cfg, BITS=None)
    return runs.run_name(cfg, runs.digest(runs.result_settings(cfg)))


def train_command(cells, results_path):
    s = cells[0].settings
    run_dir = os.path.join(os.path.abspath(OUT_DIR), 'runs', run_name(cells[0].cfg))
    replace = ['--force=true'] if any(c.why.startswith('trained again') for c in cells) else []  # inputs changed
    return [sys.executable, os.path.join(_ROOT, 'train.py'), *(flag(k, v) for k, v in s.items()),
            '--bits=' + ','.join(str(b) for b in sorted({c.bits for c in cells})), f'--results={results_path}',
            f'--run_dir={run_dir}', *replace]


def pending(cells, results_path, defaults):
    """Each cell's results line (those found are skipped, said); the others grouped by the train.py run that
    trains them (its run name: one run for cells of several tables with the same settings)."""
    results, groups = read_results(results_path), OrderedDict()
    for c in cells:
        c.result = find_result(c, results, defaults)
        if c.result:
            c.status = 'skipped'
            print(c.line(), flush=True)
        else:
            groups.setdefault(run_name(c.cfg), []).append(c)
    return groups


def run_cells(cells, results_path, defaults):
    """Skip the cells RESULTS holds, train the others; every cell ends trained, skipped or failed."""
    groups = pending(cells, results_path, defaults)
    n_todo = sum(len(g) for g in groups.values())
    print(f"{len(cells) - n_todo} of {len(cells)} cells already in {results_path}; {n_todo} to train in "
          f"{len(groups)} train.py runs", flush=True)
    nouns_done = {}
    for group in groups.values():
        results = read_results(results_path)  # a cell two rows share may have been trained meanwhile
        for c in group:
            c.result = find_result(c, results, defaults)
            if c.result:
                c.status = 'skipped'
                print(c.line(), flush=True)
        group = [c for c in group if not c.result]
        if not group:
            continue
        cmd = train_command(group, results_path)
        why = missing_features(group[0].settings) or prepare_nouns(group[0].settings, nouns_done)
        if why:
            for c in group:
                c.status, c.why = 'failed', why
                print(c.line(), flush=True)
            continue
        train_group(group, cmd, results_path, defaults)


def train_group(group, cmd, results_path, defaults):
    log_path = os.path.join(OUT_DIR, 'logs', run_name(group[0].cfg).replace('/', '_') + '.log')
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print('train: ' + shlex.join(['python'] + cmd[1:]), flush=True)

    def collect():
        results = read_results(results_path)
        for c in group:
            if not c.result:
                c.result = find_result(c, results, defaults)
                if c.result:
                    c.status = 'trained'
                    print(c.line(), flush=True)

    with open(log_path, 'a') as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                                preexec_fn=_die_with_parent)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith('result '):
                collect()
            else:
                print('  | ' + line.rstrip(), flush=True)
        rc = proc.wait()
    collect()
    for c in group:
        if not c.result:
            c.status, c.why = 'failed', f"train.py exited with {rc}: {_tail(log_path)} (log: {log_path})"
            print(c.line(), flush=True)


# -----------------------------------------------------------------------------
# --dry_run (what is ready, what is missing, what would run and its estimated GPU time) and --report_only
def plan_cells(cells, results_path, defaults, table4=()):
    """--dry_run: each train.py run still to do with its rows, its inputs ready or missing (and what makes
    them) and its command, then the estimated GPU time of it all (report.print_plan). Writes nothing."""
    todo = []
    for group in pending(cells, results_path, defaults).values():
        s, need = group[0].settings, nouns_need(group[0].settings)
        todo.append(dict(
            cells=group, dataset=s['DATASET'], paper_dataset=paper_dataset(s['DATASET']), seed=s['SEED'],
            features=[(b, b == s['BACKBONE'], why, cmd) for b, _, why, cmd in missing_feature_sets(s)],
            nouns=need and (os.path.exists(need[0]), s['VOCAB'], s['CLIP_MODEL'], shlex.join(['python'] + need[1][1:])),
            command=shlex.join(['python'] + train_command(group, results_path)[1:]),
            process=run_name(group[0].cfg), trained=s['METHOD'] not in baselines.UNTRAINED,
            epochs=group[0].cfg['EPOCHS'], batch_size=group[0].cfg['BATCH_SIZE']))
    vocabs = [(vocab, CLIP_MODEL) for _, vocab, path, _ in table4 if not os.path.exists(path)]
    report.print_plan(todo, vocabs, len(cells), results_path, EPOCHS, train_args().get('BATCH_SIZE', train.BATCH_SIZE))


def find_cells(cells, results_path, defaults):
    """--report_only: each cell's results line, or why it has none: its missing inputs (status failed, as a run
    would leave it), else not trained yet."""
    results = read_results(results_path)
    for c in cells:
        c.result = find_result(c, results, defaults)
        why = '' if c.result else missing_why(c.settings)
        c.status = 'skipped' if c.result else 'failed' if why else 'not run'
        if not c.result:
            c.why = why or c.why or f'not in {results_path}: run without --report_only to train it'
    missing = [c for c in cells if not c.result]
    by_table = [[c for c in missing if c.table == t] for t in OrderedDict.fromkeys(c.table for c in missing)]
    print(f"{len(cells) - len(missing)} of {len(cells)} cells in {results_path}" + (
        '; missing:\n' + '\n'.join(l for cs in by_table for l in report.absent_lines(cs)[3:]) if missing else ''))


def write_tables(cells, extra):
    """Each table's Markdown (printed, and written to OUT_DIR/table<N>.md), and Figure 5's PNG; {table: lines}."""
    out = {}
    for t, cs in cells.items():
        lines = markdown_table(TABLES[t][0], measured_on(cs, extra), table_rows(t), DATASETS,
                               (FIG5_BITS,) if t.startswith('fig5') else BITS, cs, len(SEEDS), table_notes(t))
        out[t] = lines + report.absent_lines(cs)
        path = os.path.join(OUT_DIR, (f'table{t}' if t[0].isdigit() else t.replace('fig', 'figure')) + '.md')
        save_text(path, out[t])
        print('\n' + '\n'.join(out[t]) + f'\n(written to {path})', flush=True)
    parts = [(t, cs) for t, cs in cells.items() if t.startswith('fig5')]
    if parts:
        png = os.path.join(OUT_DIR, 'figure5.png' if len(parts) == 2 else f'figure{parts[0][0][3:]}.png')
        plot_figure5(parts, png)
        print(f'figure written to {png}')
    return out


def write_report(cells, lines):
    """OUT_DIR/REPORT.md (report.write_report): the tables in the paper's order, Figure 5, and the runs of
    Figures 3-4 (every row of _CURVE_TABLES at FIGURE_BITS, first seed) and 6-7 (Table 1's CLIP row)."""
    first = lambda c: c.bits == FIGURE_BITS and c.seed == SEEDS[0]
    curves = OrderedDict((dataset_label(d), []) for d in DATASETS)
    seen = set()
    for t in _CURVE_TABLES:
        for c in cells.get(t, []):
            if first(c) and c.result and c.result.get('run_dir') not in seen:
                seen.add(c.result.get('run_dir'))
                curves[dataset_label(c.dataset)].append((c.row.label.split(' (')[0], c.result))
    examples = OrderedDict()
    for d in DATASETS:
        c = next((c for c in cells.get('1', []) if first(c) and c.row.id == 'clip' and c.dataset == d), None)
        examples[dataset_label(d)] = c.result if c and c.result else (
            f"Table 1's CLIP row at {FIGURE_BITS} bits is not measured" + (f': {c.why}' if c and c.why else ''))
    tables = [lines[t] for t in _REPORT_ORDER if t in lines]
    fig5 = [l.replace('## ', '### ', 1) for t in ('fig5a', 'fig5b') for l in lines.get(t, []) + ['']]
    return report.write_report(OUT_DIR, tables, (fig5, 'figure5.png' if 'fig5a' in lines else None),
                               [c for cs in cells.values() for c in cs], curves, examples, FIGURE_BITS, EXAMPLES)


# -----------------------------------------------------------------------------
# the Markdown table: measured (mean +- std over seeds) / paper / measured - paper
def dataset_label(d):
    pd = paper_dataset(d)
    name = NAMES.get(d, d)
    return name if pd == d else f'{name} (paper: {NAMES.get(pd, pd)})'


def markdown_table(title, header, rows, datasets, bits, cells, n_seeds, notes=()):
    """Lines of the Markdown table: one line per row and dataset, a column per code length."""
    by_key = OrderedDict()
    for c in cells:
        by_key.setdefault((c.row.id, c.dataset, c.bits), []).append(c)
    lines = [f'## {title}', '', header, '',
             '| row | id | dataset | ' + ' | '.join(f'{b} bits' for b in bits) + ' |',
             '|---|---|---|' + '---|' * len(bits)]
    for row in rows:
        for d in datasets:
            texts = []
            for b in bits:
                if row.settings is None:  # the paper's number only
                    p = paper_value(row, d, b)
                    texts.append(f'copied: {p:.3f}' if p is not None else '–')
                    continue
                group = by_key.get((row.id, d, b), [])
                values = [compared(c.result) for c in group if c.result]
                hamming = [c.result['map'] for c in group if c.result and RELEASED and compared(c.result) !=
                           c.result['map']]
                status = 'failed' if any(c.status == 'failed' for c in group) else 'not run' if group else '–'
                texts.append(cell_text(values, paper_value(row, d, b), n_seeds, status, hamming))
            lines.append(f'| {row.label} | {row.id} | {dataset_label(d)} | ' + ' | '.join(texts) + ' |')
    return lines + [''] + [f'- {n}' for n in notes]


def measured_on(cells, extra):
    """The header line: on what data and with which settings the table was measured."""
    mapped = [f'{d} against {paper_dataset(d)}' for d in DATASETS if paper_dataset(d) != d]
    times = [c.result.get('seconds', 0) for c in cells if c.result]
    done = sum(1 for c in cells if c.result)
    machines, commits, date = report.recorded([c.result for c in cells if c.result])
    return (f"Measured on {', '.join(DATASETS)} (features in {os.path.abspath(CACHE_DIR)}; CLIP {CLIP_MODEL}/"
            f"{pretrained_tag(CLIP_PRETRAINED)}), {EPOCHS} epochs, seeds {', '.join(map(str, SEEDS))}, external "
            f"{EXTERNAL} / vocabulary {VOCAB} unless a row says otherwise, best T2 (Fig. 5b) "
            + ', '.join(f"{d} {train.T2_BEST.get(paper_dataset(d), T2_COMMON)}" for d in DATASETS)
            + (f", train.py {' '.join(flag(k, v) for k, v in extra.items())}" if extra else '')
            + f"; {done} of {len(cells)} cells measured ({sum(times):.0f} s of training and evaluation) on "
            f"{machines}, commit {commits}, the newest {date}. "
            + ("--released: the measured value is the authors' own metric, the continuous-output MAP@K (their "
               "evaluation ranks the tanh outputs with np.argsort, no sign), compared with the paper's numbers as "
               "their code produced them; the Hamming MAP@K of the binary codes follows in brackets"
               if RELEASED else "MAP@K of binary codes (Hamming ranking, as the paper's text says)")
            + " (K = 1000 CIFAR-10, 5000 others). Each cell: measured (mean ± std over seeds) / paper / "
            "measured − paper, in bold when more than 2 std over seeds (0.01 with one seed) from the paper's; "
            "paper numbers are copied from the paper's tables"
            + (f" (paper numbers of another dataset: {', '.join(mapped)})" if mapped else '') + '.')


_IMAGENET_NOTE = ("The paper's ImageNet vocabulary has 21,843 words (Table 4), the ImageNet-21k class names; "
                 "--vocab=imagenet is the 1,000 ImageNet-1k class names, a smaller vocabulary than the paper's. "
                 "A word list of the 21k names passed as --vocab_files=imagenet21k=FILE is compared with the "
                 "paper's ImageNet row.")


def competitor_notes():
    """How Table 1's and the baselines table's HHCH, MeCoQ and CGHash rows train."""
    schedule = (f"{COMPETITOR_EPOCHS} epochs each (--competitor_epochs)" if COMPETITOR_EPOCHS else
                "their authors' schedules (HHCH 80 epochs of 64, MeCoQ 50 of 128, CGHash 200 + 200 of 1024)")
    return [f"HHCH, MeCoQ and CGHash: ports of their authors' code, checked against it (methods/<name>.py lists the "
            f"commit, the defaults and every departure), trained on their authors' loops, {schedule}, on the same "
            f"features, split, views and MAP@K as DUH-EG. MeCoQ as its paper (codebooks trained, loss per row; the "
            f"release: --method_args='--train_codebooks=false --per_row_loss=false'), ranked by AQD (inner product). "
            f"CGHash's clusters: the classes or labels, CIFAR-10 10, NUS-WIDE 21, Flickr25k 24, MS-COCO 80."]


def table_notes(table):
    notes = [_IMAGENET_NOTE] if table == '5' else []
    if table == '1':
        notes += ["'our port' rows are measured here, on our VGG-16 features (the paper quotes each method's own "
                  "paper: its backbone and split, so measured − paper mixes protocol and port); *HHCH on CLIP "
                  "ViT-B/16, as the DUH-EG authors ran it. * rows: the DUH-EG authors' runs on CLIP ViT-B/16.",
                  *competitor_notes(),
                  "'copied' rows: the paper's numbers only, nothing measured (no usable public code; FSCH's has no "
                  "loss or trainer, DSCH's misses its loss file; HiHPQ's is public but not ported)."]
    if table == '5' and not {'conceptnet', 'glove'} <= {n.lower() for n in vocab_files()}:
        notes.append('ConceptNet and GloVe rows: pass --vocab_files=conceptnet=FILE,glove=FILE (one word a line); '
                     'any name=FILE adds a row, compared with the paper where the name is conceptnet or glove.')
    if table == 'fig5a':
        notes.append('T1 is varied at each dataset\'s best T2; the paper gives the curve only as a plot, so its value '
                     'is shown only at T1 = 0.9, where it is Table 1\'s best-T2 row.')
    if table == 'fig5b':
        notes.append('The paper gives the curve only as a plot: its value is shown at T2 = 0.97 (Table 1, CLIP row) '
                     'and at each dataset\'s best T2 (Table 1, best-T2 row).')
    if table == 'baselines':
        supervised = ', '.join(sorted(baselines.SUPERVISED))
        quantized = ', '.join(m.upper() for m in sorted(baselines.QUANTIZED - set(baselines.COMPETITORS))) + ', MeCoQ'
        notes.append(f"Supervised methods ({supervised}) read the training labels; the others do not. {quantized} "
                     "store product-quantized codes (8 bits a codebook) and rank by asymmetric quantizer distance; "
                     "every other row ranks binary codes by Hamming distance; the MAP code is the same. Every row "
                     "but HHCH, MeCoQ and CGHash trains our MLP head on train.py's loop, all on the same frozen "
                     "features (CLIP ViT-B/16 unless named). The paper's only "
                     "baseline row here is CIBHash (Table 1, VGG-16 features, the protocol this paper follows), "
                     "compared with 'CIBHash, VGG-16 features'; the SSDH README's CIFAR-10 MAP@5000 (0.2511 / 0.2414 "
                     "at 16 / 32 bits, VGG-16 trained end to end, its own split) and the DeepHash papers' numbers "
                     "(AlexNet fine-tuned, other splits and K) are other protocols and are not compared; Table 1 "
                     "compares the competitors' ports with the paper's numbers.")
        notes += competitor_notes()
    return notes


# -----------------------------------------------------------------------------
# Figure 5: MAP at FIG5_BITS bits as T1 (a) and T2 (b) vary, best measured value starred
STYLE = {'cifar10': ('tab:red', 'o'), 'nuswide': ('tab:blue', 's'), 'flickr25k': ('tab:orange', '^'),
         'mscoco': ('tab:green', 'v')}


def plot_figure5(parts, path):
    """Figure 5 at FIG5_BITS (report.plot_figure5): each part (table, cells) a panel, a line per dataset."""
    panels = []
    for table, cells in parts:
        rows, lines = table_rows(table), []
        for k, d in enumerate(DATASETS):
            measured, paper = [], []
            for row in rows:
                mean, std = summary([c.measured for c in cells if c.row.id == row.id and c.dataset == d and c.result])
                if mean is not None:
                    measured.append((float(row.id), mean, std or 0.0))
                if paper_value(row, d, FIG5_BITS) is not None:
                    paper.append((float(row.id), paper_value(row, d, FIG5_BITS)))
            lines.append((dataset_label(d), NAMES.get(paper_dataset(d), paper_dataset(d)),
                          STYLE.get(paper_dataset(d), (f'C{k + 4}', 'D')), measured, paper))
        xlabel = f'{t1_reading()} threshold T1 (Eq. 3)' if table == 'fig5a' else 'similarity threshold T2 (Eq. 8)'
        panels.append((f'({table[-1]})', xlabel, [r.id for r in rows], lines, T2_COMMON if table == 'fig5b' else None))
    report.plot_figure5(panels, path, FIG5_BITS)


# -----------------------------------------------------------------------------
# Table 4: pre-processing time of each vocabulary (nouns_embed.py's selection.json)
def selection_numbers(sel):
    """From nouns_embed.py's selection.json: words read, unique, selected (t_com), and the seconds of
    embedding, clustering, selection and their total (None where absent)."""
    counts, secs = sel.get('counts') or sel, sel.get('seconds')  # counts nested or at the top level
    secs = secs if isinstance(secs, dict) else dict(total=secs)
    return ([counts.get(k) for k in ('read', 'unique', 't_com')],
            [secs.get(k) for k in ('embedding', 'clustering', 'selection', 'total')])


def table4_rows():
    """[(name, vocabulary, its selection.json, the nouns_embed.py command that makes it)] of Table 4."""
    cache_dir = os.path.abspath(TABLE4_CACHE_DIR or CACHE_DIR)
    rows = [('imagenet', 'imagenet'), ('wordnet', 'wordnet')] + list(vocab_files().items())
    return [(name, vocab, os.path.join(selection_dir(cache_dir, vocab, CLIP_MODEL, CLIP_PRETRAINED, N_K, T1, RELEASED,
                                                     t1_reading()), 'selection.json'),
             nouns_command(cache_dir, vocab, CLIP_MODEL, CLIP_PRETRAINED, N_K, T1, RELEASED, T1_READING or None))
            for name, vocab in rows if not ROWS or name in ROWS]


def table4():
    cache = TABLE4_CACHE_DIR or CACHE_DIR
    rows = table4_rows()
    lines = ['## Table 4: pre-processing time of the vocabulary (embedding every word with CLIP, K-means, selection)',
             '', f"Measured with CLIP {CLIP_MODEL}/{pretrained_tag(CLIP_PRETRAINED)}, N_k = {N_K}, T1 = {T1}, from "
             f"selection.json under {os.path.abspath(cache)}; commit {git_commit()}. The paper names no hardware.", '',
             '| vocabulary | words read / unique | selected t_com | seconds: embed / cluster / select / total | '
             'paper words | paper seconds | measured − paper (s) | hardware |', '|---|---|---|---|---|---|---|---|']
    failed = False
    for name, vocab, path, cmd in rows:
        sel, why, where = None, '', ''
        if not os.path.exists(path) and not (DRY_RUN or REPORT_ONLY):
            why = run_nouns(cmd, os.path.join(OUT_DIR, 'logs', 'nouns_embed.log'))[1]
            where = hardware()  # measured just now, here
        elif DRY_RUN and not os.path.exists(path):
            print(f'table 4 row {name}: would run: ' + shlex.join(['python'] + cmd[1:]))
        if os.path.exists(path):
            with open(path) as f:
                sel = json.load(f)
        paper_words, paper_s = PAPER_TABLE4.get(name.lower().replace('imagenet21k', 'imagenet'), (None, None))
        if sel is None:
            failed = failed or not (DRY_RUN or REPORT_ONLY)
            lines.append(f"| {name} | {why or 'not run'} | – | – | {paper_words or '–'} | {paper_s or '–'} | "
                         f"– | – |")
            continue
        (read, unique, com), (emb, clu, sec, total) = selection_numbers(sel)
        hw = sel.get('hardware') or where or f'{hardware()} (this machine; selection.json does not say)'
        f = lambda x: '–' if x is None else f'{x:.2f}'
        diff = f'{total - paper_s:+.2f}' if total is not None and paper_s is not None else '–'
        lines.append(f"| {name} | {read or '–'} / {unique or '–'} | {com or '–'} | {f(emb)} / {f(clu)} / "
                     f"{f(sec)} / {f(total)} | {paper_words or '–'} | {paper_s or '–'} | {diff} | {hw} |")
        print(f"vocab table=4 row={name} seconds={f(total)} paper={paper_s or 'none'} diff={diff}", flush=True)
    lines += ['', '- ' + _IMAGENET_NOTE]
    if not {'conceptnet', 'glove'} <= {r[0].lower() for r in rows}:
        lines += ['- ConceptNet and GloVe rows: pass --vocab_files=conceptnet=FILE,glove=FILE (one word a line).']
    return lines, failed


# -----------------------------------------------------------------------------
def check_settings():
    """Every setting checked before any work; the tables to make."""
    check_ranges(globals(), dict(BITS='[1, 1024]', SEEDS='[0, inf)', N_K='[1, inf)', EPOCHS='[1, inf)',
                                 T2_VALUES='(-1, 1]', FIG5_BITS='[1, 1024]'))
    if T1_READING and T1_READING not in nouns_embed.T1_RANGES:
        raise SystemExit(f"error: --t1_reading={T1_READING!r}: choose one of {', '.join(nouns_embed.T1_RANGES)}, "
                         f"or '' for train.py's")
    nouns_embed.check_t1(T1, t1_reading())
    tables = ('fig5a', 'fig5b') if TABLE == 'fig5' else _ALL if TABLE == 'all' else (TABLE,)
    if TABLE == 'all' and ROWS:
        raise SystemExit("error: --rows picks rows of one table; --table=all runs every row of every table")
    if 'fig5a' in tables:
        nouns_embed.check_t1(T1_VALUES, t1_reading(), '--t1_values')
    check_choice('table', TABLE, sorted({*TABLES, '4', 'fig5', 'all'}))
    unknown = [d for d in DATASETS if d not in dataset.DATASETS]
    if unknown or not DATASETS or not SEEDS or not BITS:
        raise SystemExit(f"error: --datasets={','.join(DATASETS)}: choose from {', '.join(dataset.DATASETS)}; "
                         f"--seeds and --bits must not be empty")
    if any('=' not in p for p in PAPER_AS):
        raise SystemExit("error: --paper_as takes dataset=paper_dataset pairs, e.g. folder=cifar10")
    for name, path in vocab_files().items():
        if not os.path.isfile(path):
            raise SystemExit(f"error: --vocab_files: {name}={path} is not a file")
    return tables


def checked_train_args(tables):
    """TRAIN_ARGS as train.py settings, refused where reproduce.py sets them itself (its own settings, the
    rows of these tables) or where train.py's warm-up does not fit EPOCHS."""
    extra = train_args()
    owned = {'DATASET', 'SEED', 'BITS', 'CACHE_DIR', 'BACKBONE', 'BACKBONE_PRETRAINED', 'CLIP_MODEL',
             'CLIP_PRETRAINED', 'EPOCHS', 'EXTERNAL', 'VOCAB', 'N_K', 'T1', 'T2', 'METHOD', 'RESULTS', 'RUN_DIR'}
    owned |= {k for t in tables if t != '4' for row in table_rows(t) for k in row.settings or {}}
    clash = sorted(owned & set(extra))
    if clash:
        raise SystemExit(f"error: --train_args sets {', '.join('--' + k.lower() for k in clash)}, which reproduce.py "
                         f"sets itself (its own --datasets, --seeds, --bits, --epochs, --cache_dir, --clip_model, "
                         f"--external, --vocab, --t1, --n_k settings, or the rows of this table)")
    warmup = extra.get('WARMUP', train.WARMUP)
    if EPOCHS <= warmup:
        raise SystemExit(f"error: --epochs={EPOCHS} must exceed train.py's warm-up ({warmup} epochs): pass "
                         f"--train_args=--warmup=N with N < {EPOCHS}")
    return extra


def main():
    configure(globals())
    tables = check_settings()
    if tables == ('4',):
        lines, failed = table4()
        if not DRY_RUN:
            save_text(os.path.join(OUT_DIR, 'table4.md'), lines)
            print('\n'.join(lines))
        raise SystemExit(1 if failed else 0)
    extra = checked_train_args(tables)
    defaults = train_defaults()
    results_path = os.path.abspath(RESULTS or os.path.join(OUT_DIR, 'results.jsonl'))
    print(f"reproduce table={TABLE} datasets={','.join(DATASETS)} seeds={','.join(map(str, SEEDS))} "
          f"results={results_path}", flush=True)
    cells = OrderedDict((t, make_cells(t, defaults, extra)) for t in tables if t != '4')
    every = [c for t in cells for c in cells[t]]
    if DRY_RUN:
        return plan_cells(every, results_path, defaults, table4_rows() if '4' in tables else [])
    lines = {'4': table4()[0]} if '4' in tables else {}  # Table 4 first: it makes the vocabularies' nouns
    (find_cells if REPORT_ONLY else run_cells)(every, results_path, defaults)
    lines.update(write_tables(cells, extra))
    if TABLE == 'all':
        print(f'report written to {write_report(cells, lines)}', flush=True)
    failed = [c for c in every if c.status == 'failed']
    if failed and not REPORT_ONLY:
        raise SystemExit(f"{len(failed)} cells failed (see the 'why' of their cell lines); rerun to retry them")


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit('interrupted: the cells finished so far are in the results file; rerun the same command '
                         'to go on')
