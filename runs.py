"""Training runs: how a run is keyed (the settings that change its results and its inputs'
fingerprints), named, held and compared, and the results file every run appends its line to.
train.py writes runs; eval_hash.py, search.py and reproduce.py read them; none imports another for it.

A run folder runs/<dataset>/<name>_<key8> holds run.json (the key), one <L>bits/ folder per code
length (heads.pt, codes.npz, result.json), and eval_hash.py's metrics and pictures.
"""
import glob
import hashlib
import json
import os
import re
import shutil

from cache import atomic_write, hold, read_json, save_json

NOT_RESULT = frozenset({'DEVICE', 'RESULTS', 'RUN_DIR', 'FORCE', 'THREADS',  # settings that do not change a result
                        'CACHE_DIR'})  # where the inputs lie: what they hold is the run key's fingerprints


# -----------------------------------------------------------------------------
# the key of a run
def result_settings(cfg):
    """The settings of a config that change a result (every one but NOT_RESULT)."""
    return {k: v for k, v in cfg.items() if k not in NOT_RESULT}


def digest(obj):
    """sha256 of `obj` as canonical JSON: the one way a run's settings are hashed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_key(cfg, inputs):
    """What a run's results depend on: every setting that changes them and its inputs' fingerprints
    (the code length aside: a run folder holds one run at several). Returns (sha256, the key)."""
    key = dict(config={k: v for k, v in result_settings(cfg).items() if k != 'BITS'}, inputs=inputs)
    return digest(key), key


def key_differences(a, b):
    """What differs between two run keys (run_key): ([(NAME, a's value, b's value)], [input name])."""
    keys = sorted((set(a['config']) | set(b['config'])) - NOT_RESULT)  # an older key may hold CACHE_DIR
    settings = [(k, a['config'].get(k), b['config'].get(k)) for k in keys
                if json.dumps(a['config'].get(k), default=str) != json.dumps(b['config'].get(k), default=str)]
    inputs = [k for k in sorted(set(a['inputs']) | set(b['inputs'])) if a['inputs'].get(k) != b['inputs'].get(k)]
    return settings, inputs


def run_name(cfg, sha):
    """<dataset>/<what the run is, in words>_<key8> of a train.py config (its settings resolved)."""
    released = cfg.get('RELEASED')
    mine = '_'.join(filter(None, ['t1sim' if cfg.get('T1_READING') == 'similarity' else None,
                                  'viewsrel' if cfg.get('VIEW_RECIPE') == 'released' else None,
                                  'norm' if cfg.get('NORM_INPUTS') else None]))
    parts = [cfg['METHOD'], cfg['BACKBONE'], cfg['EXTERNAL'] if cfg['EXTERNAL'] != 'efc' else None,
             f"vocab-{os.path.basename(str(cfg['VOCAB']))}" if cfg['VOCAB'] != 'wordnet' else None, f"t2-{cfg['T2']}",
             None if cfg['SIM'] else 'nosim', None if cfg['AUG'] else 'noaug', 'released' if released else None,
             None if released else mine or None, f"seed{cfg['SEED']}"]
    return os.path.join(cfg['DATASET'], '_'.join(p for p in parts if p) + f'_{sha[:8]}')


# -----------------------------------------------------------------------------
# a run folder: held by one train.py, never two runs in it
_RUN_FILES = re.compile(r'(\d+bits|run\.json|metrics\.json|pr_curve\.png|p_at_n\.png|top10_query\d+\.png|'
                        r'nouns_query\d+\.png)')


def claim_run_dir(run_dir, sha, key, force=False):
    """Hold `run_dir` for this run until the process ends (a lock: a second train.py into it stops).
    A folder that holds a run made from other settings or inputs is refused with what differs, or with
    `force` emptied of that run first, so a folder never mixes two runs."""
    hold(run_dir, f"another train.py is writing {run_dir}: wait for it, or give another --run_dir")
    path = os.path.join(run_dir, 'run.json')
    old = read_json(path) if os.path.exists(path) else None
    ours = [f for f in os.listdir(run_dir) if _RUN_FILES.fullmatch(f)]
    old_sha = old and run_key(old['key']['config'], old['key']['inputs'])[0]  # keyed anew: an older key held CACHE_DIR
    if (old or ours) and old_sha != sha:
        if old is None:
            why = 'an older train.py (it has no run.json)'
        else:
            settings, inputs = key_differences(old['key'], key)
            diff = [f"--{k.lower()}={was} (now {now})" for k, was, now in settings] + [f"other {k}" for k in inputs]
            why = ', '.join(diff[:3]) + (f" and {len(diff) - 3} more" if len(diff) > 3 else '')
        if not force:
            raise SystemExit(f"error: {run_dir} holds a run made from other settings or inputs ({why}): give "
                             f"another --run_dir, or --force to replace that run whole")
        print(f"replacing the run in {run_dir} ({why})")
        for f in ours:
            p = os.path.join(run_dir, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    save_json(path, dict(sha256=sha, key=key))


def bits_dirs(run):
    """{code length: its <run>/<L>bits folder} of a training run."""
    return {int(m.group(1)): d for d in glob.glob(os.path.join(run, '*bits'))
            if (m := re.fullmatch(r'(\d+)bits', os.path.basename(d)))}


def code_lengths(run):
    """The code lengths of a run folder whose codes are there (<L>bits/codes.npz), sorted."""
    return sorted(b for b, d in bits_dirs(run).items() if os.path.isfile(os.path.join(d, 'codes.npz')))


def run_dataset(run, bits):
    """The dataset a run was trained on (its result.json), or '?' when it does not say."""
    try:
        with open(os.path.join(run, f'{bits}bits', 'result.json')) as f:
            return json.load(f).get('dataset', '?')
    except (OSError, ValueError):
        return '?'


def mixed_runs(run, bits):
    """'' when every code length of a run folder comes from one run (run_key of its result.json),
    else what differs between the first two that do not (an older train.py could leave such a folder)."""
    results = {}
    for b in bits:
        try:
            with open(os.path.join(run, f'{b}bits', 'result.json')) as f:
                results[b] = json.load(f)
        except (OSError, ValueError):
            continue
    keys = {b: run_key(r.get('config') or {}, r.get('inputs') or {}) for b, r in results.items()}
    if not keys:
        return ''
    b0, (sha0, key0) = next(iter(keys.items()))
    for b, (sha, key) in keys.items():
        if sha != sha0:
            settings, inputs = key_differences(key0, key)
            diff = [f"{k.lower()} {was} / {now}" for k, was, now in settings] + [f"other {k}" for k in inputs]
            return f"{b0} bits and {b} bits: " + ', '.join(diff[:3])
    return ''


# -----------------------------------------------------------------------------
# the results file: one JSON line per run and code length
def read_results(path):
    """The JSON lines of `path` (a line cut short by a kill is left out, with a note)."""
    if not os.path.exists(path):
        return []
    out, bad = [], []
    with open(path, encoding='utf-8', errors='replace') as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    bad.append(n)
    if bad:
        print(f"note: {len(bad)} unreadable line(s) in {path} left out: {path}:{bad[0]} is not a whole JSON line "
              f"(left by an interrupted write?)")
    return out


def write_result(path, result):
    """Put `result` into the JSON-lines file `path` as one whole line: the file is rewritten into a
    temporary file and renamed, so a full disk or a kill leaves the old file; a partial line an older
    writer left is dropped (and said); a line of the same run (same run_key: settings and inputs, the
    cache's path aside; same code length) is replaced, not repeated."""
    import fcntl
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    key = lambda r: digest([r.get('dataset'), r.get('bits'), r.get('method', 'duheg'),
                            run_key(r.get('config') or {}, r.get('inputs') or {})[0]])
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time
        lines = read_results(path)
        same = [r for r in lines if key(r) == key(result)]
        if same:
            print(f"note: {path} held this run already ({len(same)} line{'s' if len(same) > 1 else ''}); replaced")
        lines = [r for r in lines if key(r) != key(result)] + [result]
        atomic_write(path, lambda f: f.write(''.join(json.dumps(r, default=str) + '\n' for r in lines).encode()))
