"""Datasets, splits, augmentations, and the two small helpers every script shares:
`configure` (command-line overrides of a script's constants) and the cache files
(`save_array` / `load_array`: atomic writes with a metadata sidecar that later steps check).

Section 4.1.1 of the paper defines the datasets and splits.
"""
import glob
import hashlib
import json
import os
import re
import sys
import tempfile
import textwrap
import time

import numpy as np

# -----------------------------------------------------------------------------
# augmentation of the training views v1, v2 (Section 3.3; the paper does not print its
# recipe, these are the usual SimCLR-style ones)
AUG_CROP_SCALE = (0.5, 1.0)   # RandomResizedCrop area range
AUG_FLIP_P = 0.5              # horizontal flip probability
AUG_JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter brightness, contrast, saturation, hue
AUG_JITTER_P = 0.8            # probability of applying the colour jitter
AUG_GRAY_P = 0.2              # RandomGrayscale probability
AUG_BLUR_P = 0.5              # probability of a Gaussian blur
AUG_BLUR_SIGMA = (0.1, 2.0)   # blur sigma range

# splits (Section 4.1.1): per dataset, how query / train sets are drawn and MAP's K
DATASETS = {
    #              query             train              K for MAP@K   labels
    'cifar10':   dict(query_per_class=1000, train_per_class=500, topk=1000, multilabel=False),
    'nuswide':   dict(query_per_class=100, train_per_class=500, topk=5000, multilabel=True),
    'flickr25k': dict(query=2000, train=5000, topk=5000, multilabel=True),
    'mscoco':    dict(query=5000, train=10000, topk=5000, multilabel=True),
    # your own images: DATA_PATH/<class>/<image>; sizes are per-class settings
    'folder':    dict(query_per_class=10, train_per_class=20, topk=1000, multilabel=False),
}
NUSWIDE_CONCEPTS = 21  # NUS-WIDE keeps its 21 most frequent of 81 concepts
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


# -----------------------------------------------------------------------------
# configuration: `python script.py --key=value` overrides the constant KEY of the script
def _parse_value(key, text, default):
    """Turn `text` into a value of the same type as `default`, or raise a clear error."""
    def fail(kind):
        raise SystemExit(f"error: --{key.lower()}={text!r} is not {kind} (the default is {default!r})")
    if isinstance(default, bool):
        low = text.lower()
        if low in ('1', 'true', 'yes', 'on'):
            return True
        if low in ('0', 'false', 'no', 'off'):
            return False
        fail('a boolean (true/false)')
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            fail('an integer')
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            fail('a number')
    if isinstance(default, (tuple, list)):
        parts = [p for p in text.split(',') if p != '']
        if default and not isinstance(default[0], str):
            try:
                return tuple(_parse_value(key, p, default[0]) for p in parts)
            except SystemExit as e:
                why = str(e).split('=', 1)[1].rsplit(' (the default', 1)[0]
                raise SystemExit(f"error: --{key.lower()}={text!r}: {why} (the default is "
                                 f"{','.join(map(str, default))})") from None
        return tuple(parts)
    if default is None:  # optional setting: a number, a path, a name or a boolean
        if text.lower() == 'none':
            return None
        if text.lower() in ('true', 'false'):
            return text.lower() == 'true'
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text
    return text


def _source(path):
    """(lines, {line: (column, text)} of every comment, top-level statements) of the file `path`."""
    import ast
    import io
    import tokenize
    with open(path, encoding='utf-8') as f:
        src = f.read()
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip('#').strip())
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    return src.split('\n'), comments, ast.parse(src).body


def _public_names(s):
    """The public UPPER_CASE names a top-level statement assigns (NAME = ..., A = B = ...), unless
    it assigns a table (a dict or a set: data, not a setting)."""
    import ast
    if not isinstance(s, (ast.Assign, ast.AnnAssign)):
        return []
    table = isinstance(s.value, (ast.Dict, ast.DictComp, ast.Set, ast.SetComp)) or (
        isinstance(s.value, ast.Call) and getattr(s.value.func, 'id', '') in ('dict', 'set', 'frozenset'))
    targets = s.targets if isinstance(s, ast.Assign) else [s.target]
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    return [] if table else [n for n in names if n.isupper() and not n.startswith('_')]


def _first_def(body):
    import ast
    return next((s.lineno for s in body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))),
                float('inf'))


def settings_doc(path):
    """The settings block of the script `path`, read from its source: a list of (group, NAME,
    comment). The block is every top-level public UPPER_CASE assignment of a plain type (number,
    string, boolean, tuple, None) above the script's first function or class; names starting with
    `_` and tables (dicts, sets) are not settings. A comment line at column 0 starts
    a group (`# data`; `# ----` rules are skipped), an indented comment line right below a setting
    continues its comment. This one reading feeds --help and the command-line keys;
    `unreachable_settings` reports a constant it would miss, when the script starts."""
    lines, comments, body = _source(path)

    def header(n):  # the group a run of column-0 comment lines ending at line n names, or None
        run = []
        while n in comments and comments[n][0] == 0 and lines[n - 1].lstrip().startswith('#'):
            if comments[n][1].strip('-=# '):
                run.insert(0, comments[n][1])
            n -= 1
        return ' '.join(run) or None

    out, group, first_def = [], '', _first_def(body)
    for s, nxt in zip(body, body[1:] + [None]):
        names = _public_names(s)
        if s.lineno > first_def or not names:
            continue
        group = header(s.lineno - 1) or group
        end_comment = comments.get(s.end_lineno)
        comment = end_comment[1] if end_comment and end_comment[0] > 0 else ''
        for n in range(s.end_lineno + 1, nxt.lineno if nxt else len(lines) + 1):  # indented comment lines below
            if n not in comments or comments[n][0] == 0 or not lines[n - 1].lstrip().startswith('#'):
                break
            comment += ' ' + comments[n][1]
        out += [(group, n, comment.strip()) for n in names]
    return out


def unreachable_settings(path, g):
    """Constants of the script `path` that look like settings but that --key=value cannot set: a
    public UPPER_CASE constant of a plain type below the first function (settings_doc), each as
    'file:line: NAME ...'. (A table, a dict or a set, is data, never a setting.)"""
    lines, comments, body = _source(path)
    first_def, out = _first_def(body), []
    for s in body:
        for name in _public_names(s):
            plain = isinstance(g.get(name), _SETTING_TYPES)
            if s.lineno > first_def and plain:
                out.append(f"{path}:{s.lineno}: {name} is below the first function, where --key=value cannot set "
                           f"it: move it up into the settings, or name it _{name}")
    return out


_SETTING_TYPES = (int, float, str, bool, tuple, list, type(None))


def _setting_rows(g):
    """[(group, NAME, comment)] of the settings of the script whose globals are `g`: its settings
    block (settings_doc) when `g` comes from a file, else every UPPER_CASE constant; those of a plain
    type only."""
    path = g.get('__file__')
    rows = settings_doc(path) if path and str(path).endswith('.py') and os.path.isfile(path) \
        else [('', k, '') for k in g if k.isupper() and not k.startswith('_')]
    return [r for r in rows if r[1] in g and isinstance(g[r[1]], _SETTING_TYPES)]


def _setting_keys(g):
    """{lower-case key: NAME} of a script's settings (_setting_rows)."""
    return {n.lower(): n for _, n, _ in _setting_rows(g)}


def cli_value(v):
    """A setting's value as it is typed after --key= (tuples comma-separated, '' for empty)."""
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if v is None:
        return 'none'
    if isinstance(v, (tuple, list)):
        return ','.join(map(str, v)) or "''"
    return str(v) if v != '' else "''"


def help_text(g):
    """--help of a script: usage, the first paragraph of its docstring, then its settings in
    the file's groups, each as --key=default and the comment written beside the constant."""
    script = os.path.basename(g.get('__file__') or 'script.py')
    doc = (g.get('__doc__') or '').strip().split('\n\n')[0]
    out = [f"usage: python {script} [--key=value ...]", '', doc, '',
           "Settings (the constants at the top of the file; --flag alone sets a boolean to true):"]
    rows = _setting_rows(g)
    width = min(max((len(f"--{n.lower()}={cli_value(g[n])}") for _, n, _ in rows), default=0), 38)
    group = None
    for grp, name, comment in rows:
        if grp != group:
            out += [''] + textwrap.wrap(f"{grp}:" if grp else 'settings:', 100)
            group = grp
        arg = f"--{name.lower()}={cli_value(g[name])}"
        text = textwrap.wrap(comment, max(40, 100 - width - 4), break_on_hyphens=False, break_long_words=False) or ['']
        lines = [f"  {arg:<{width}}  {text[0]}"] if len(arg) <= width else [f"  {arg}", f"  {'':<{width}}  {text[0]}"]
        out += [s.rstrip() for s in lines] + [f"  {'':<{width}}  {t}" for t in text[1:]]
    return '\n'.join(out).rstrip() + '\n'


def released_defaults(settings, table):
    """The settings a script's RELEASED_DEFAULTS `table` names ({NAME: (default, the authors' released
    code's)}) resolved, in a script's globals or a run's config: a None (or '') value takes the
    default of its column, chosen by settings['RELEASED']. Returns {NAME: value}."""
    released = bool(settings.get('RELEASED'))
    return {k: v[released] if settings.get(k) in (None, '') else settings[k] for k, v in table.items()}


def check_ranges(g, ranges):
    """Every numeric setting of a script inside its interval, before any work: `ranges` maps a NAME
    to '(lo, hi)', '[lo, hi]' or a mix ('inf' allowed); None values pass (they mean a default), a
    tuple setting is checked item by item and may not repeat an item. The error names the setting,
    its value, its range and its meaning (the comment beside the constant)."""
    path = g.get('__file__')
    meaning = {n: c for _, n, c in settings_doc(path)} if path and os.path.isfile(path) else {}
    for name, spec in ranges.items():
        lo, hi = (float(x) for x in spec[1:-1].split(','))
        values = tuple(g[name]) if isinstance(g[name], (tuple, list)) else (g[name],)
        why = f" ({meaning[name]})" if meaning.get(name) else ''
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise SystemExit(f"error: --{name.lower()}={cli_value(g[name])}: {v!r} is not a number{why}")
            if not ((v > lo if spec[0] == '(' else v >= lo) and (v < hi if spec[-1] == ')' else v <= hi)):
                raise SystemExit(f"error: --{name.lower()}={cli_value(g[name])}: {v} is outside {spec}{why}")
        if len(set(values)) < len(values):
            twice = sorted({v for v in values if values.count(v) > 1})
            raise SystemExit(f"error: --{name.lower()}={cli_value(g[name])} repeats {', '.join(map(str, twice))}{why}")


def configure(g, argv=None):
    """Override the settings of a script (the UPPER_CASE constants of its settings block, in
    its globals `g`) from `--key=value` arguments (case-insensitive; `--flag` alone sets a
    boolean to True); --help or -h prints them and exits. Unknown keys (with the nearest known
    one) and values of the wrong type are errors. Returns the full configuration as a dict."""
    import difflib
    argv = sys.argv[1:] if argv is None else argv
    path = g.get('__file__')
    unreachable = unreachable_settings(path, g) if path and str(path).endswith('.py') and os.path.isfile(path) else []
    if unreachable:
        raise SystemExit('error: ' + '\n       '.join(unreachable))
    keys = _setting_keys(g)
    if '--help' in argv or '-h' in argv:
        print(help_text(g), end='')
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith('--'):
            raise SystemExit(f"error: arguments look like --key=value, got {arg!r} (--help lists the settings)")
        key, eq, text = arg[2:].partition('=')
        key = key.replace('-', '_').lower()
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
            raise SystemExit(f"error: unknown setting --{key}" + (f"; did you mean --{near[0]}?" if near else '')
                             + " (--help lists every setting with its default and meaning)")
        name = keys[key]
        if not eq:
            if not isinstance(g[name], bool):
                raise SystemExit(f"error: --{key} needs a value (--{key}=...)")
            text = 'true'
        g[name] = _parse_value(name, text, g[name])
    return {keys[k]: g[keys[k]] for k in sorted(keys)}


# -----------------------------------------------------------------------------
# cache files: an array `x.npy` is trusted only beside its sidecar `x.npy.json`, which
# holds the settings that made it, its shape, dtype and sha256. Both are written to a
# temporary file and renamed, the sidecar last, so a killed run leaves nothing trusted.
class CacheError(RuntimeError):
    pass


def user_error(e):
    """The one line `error: ...` a script ends with for an error the user can fix: the message of an
    error raised in a DataLoader worker without torch's wrapping and its traceback, a full disk or a
    read-only folder with the file it was writing."""
    import errno
    import shutil

    def disk_full(path):  # numpy's writers may fail without an errno when the disk fills
        d = os.path.dirname(os.path.abspath(str(path)))
        while d and not os.path.isdir(d):
            d = os.path.dirname(d)
        return shutil.disk_usage(d or '/').free < (1 << 20)
    if isinstance(e, OSError) and e.errno is None and e.filename and disk_full(e.filename):
        e.errno = errno.ENOSPC
    if isinstance(e, FileNotFoundError) and e.filename and os.path.islink(e.filename):
        return (f"error: {e.filename} is a broken symbolic link (its target {os.readlink(e.filename)} does not "
                f"exist): mend or remove the link, then run again")
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"error: {e.filename} does not exist ({e.strerror}): check the path, or the step that writes it"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"error: no space left on the device while writing {e.filename or 'a cache file'} (the disk is "
                f"full): free some space (or choose another --cache_dir) and run the same command again; nothing "
                f"half-written is kept, and an extraction resumes where it stopped")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"error: cannot write {e.filename or 'a cache file'} ({e.strerror}): choose a writable --cache_dir"
    msg = str(e)
    if 'Original Traceback' in msg:  # raised in a DataLoader worker: its last line is the original error
        msg = msg.strip().splitlines()[-1].split(': ', 1)[-1]
    return f"error: {msg}"


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _atomic(path, fill):
    """Call fill(temporary path) for a temporary file beside `path`, then rename it into place. On
    any failure (a full disk, a read-only folder, a kill) the temporary file is removed and `path`
    is as it was; an OSError names `path`."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=d)
        os.close(fd)
        fill(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and (e.filename is None or e.filename == tmp or str(e.filename).startswith(d)):
            e.filename = path  # name the file being written, not its temporary twin
        raise


def atomic_write(path, write):
    """Call write(file_object) on a temporary file beside `path`, fsync, then rename (see _atomic)."""
    def fill(tmp):
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, fill)


def save_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, default=str) + '\n').encode()))


def save_text(path, lines):
    atomic_write(path, lambda f: f.write(''.join(l + '\n' for l in lines).encode()))


def save_array(path, arr, settings, producer):
    """Write `arr` to `path` (.npy) with its sidecar; `settings` is what later steps check."""
    arr = np.ascontiguousarray(arr)
    if os.path.exists(path + '.json'):
        os.remove(path + '.json')  # the old sidecar must not vouch for the new file
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
    return _write_sidecar(path, settings, producer, arr.shape, arr.dtype)


def _write_sidecar(path, settings, producer, shape, dtype):
    """The sidecar that vouches for the array just written at `path` (written last)."""
    meta = dict(producer=producer, settings=settings, shape=list(shape), dtype=str(np.dtype(dtype)),
                sha256=sha256_file(path), written=time.strftime('%Y-%m-%d %H:%M:%S'))
    save_json(path + '.json', meta)
    return meta


def save_array_by_parts(path, shape, dtype, settings, producer, parts):
    """Like save_array for an array too large to hold at once: `parts` yields (index, values)
    written into a memory-mapped .npy of `shape` and `dtype` in a temporary file, which is renamed
    into place before its sidecar is written."""
    if os.path.exists(path + '.json'):
        os.remove(path + '.json')

    def fill(tmp):
        out = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=tuple(shape))
        for index, values in parts:
            out[index] = values
        out.flush()
        del out
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
    _atomic(path, fill)
    return _write_sidecar(path, settings, producer, shape, dtype)


def cache_status(path, settings):
    """'missing', 'ok', or a sentence saying why the file at `path` cannot be trusted."""
    if not os.path.exists(path + '.json'):
        return 'missing' if not os.path.exists(path) else f'{path} has no sidecar {path}.json (a killed run?)'
    with open(path + '.json') as f:
        meta = json.load(f)
    for k, v in settings.items():
        have = meta['settings'].get(k, '<not recorded>')
        if json.loads(json.dumps(have, default=str)) != json.loads(json.dumps(v, default=str)):
            return f"{path} was made with {k}={have!r}, but this run has {k}={v!r}"
    return 'ok'


def reusable(path, settings, force=False, producer='this step'):
    """True: `path` is a trusted cache made with `settings`, reuse it. False: build it (missing,
    left without its sidecar by a killed run, or `force`, which first removes the sidecar so that
    nothing vouches for the file until it is rewritten). Made with other settings: CacheError."""
    if force:
        try:
            os.remove(path + '.json')
        except FileNotFoundError:  # none, or another rank removed it first
            pass
    status = cache_status(path, settings)
    if status == 'ok':
        with open(path + '.json') as f:
            meta = json.load(f)
        if 'sha256' in meta and (not os.path.isfile(path) or sha256_file(path) != meta['sha256']):
            raise CacheError(f"{path} does not match the checksum in {path}.json (changed or truncated since it was "
                             f"written): rerun {producer} with --force to rebuild it")
        return True
    if status == 'missing' or not os.path.exists(path + '.json'):
        return False
    raise CacheError(f"stale cache: {status}. Rerun {producer} with --force to rebuild it, or use another --cache_dir")


def fingerprint(path):
    """What later products record of an input file: the sha256 its sidecar holds (a cached array),
    else the file's own sha256. A changed input changes it, so a product made from it is stale."""
    if os.path.exists(path + '.json'):
        with open(path + '.json') as f:
            return json.load(f)['sha256']
    return sha256_file(path)


def fingerprints(**paths):
    """{name: fingerprint(path)} of a product's input files (the 'inputs' of its settings)."""
    return {name: fingerprint(p) for name, p in paths.items()}


def load_array(path, settings=None, producer='the step that writes it', verify=True, mmap=False, companions=()):
    """Load a cached array after checking its sidecar against `settings`, its shape, dtype,
    checksum and finiteness, and that each companion file beside it (a word list written with it)
    still has the sha256 its sidecar recorded. Raises CacheError with what to do."""
    settings = settings or {}
    status = cache_status(path, settings)
    rerun = f"run {producer} (with --force to rebuild)"
    if status == 'missing':
        raise CacheError(f"{path} does not exist: {rerun}")
    if status != 'ok':
        raise CacheError(f"stale or incomplete cache: {status}. Rerun {producer} with --force, "
                         f"or change CACHE_DIR")
    with open(path + '.json') as f:
        meta = json.load(f)
    if verify and sha256_file(path) != meta['sha256']:
        raise CacheError(f"{path} does not match the checksum in {path}.json (changed or truncated): {rerun}")
    try:
        arr = np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any read failure means the file is bad
        raise CacheError(f"{path} cannot be read ({e}): {rerun}")
    if list(arr.shape) != meta['shape'] or str(arr.dtype) != meta['dtype']:
        raise CacheError(f"{path} has shape {list(arr.shape)} {arr.dtype}, its sidecar says "
                         f"{meta['shape']} {meta['dtype']}: {rerun}")
    if arr.dtype.kind == 'f' and not mmap and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)).all(1)).ravel()
        raise CacheError(f"{path} holds NaN or infinite values in {len(bad)} rows (first: {bad[:5].tolist()}): {rerun}")
    for name in companions:
        other = os.path.join(os.path.dirname(path), name)
        if not os.path.isfile(other) or sha256_file(other) != meta['settings'].get(name + '_sha256'):
            raise CacheError(f"{other} is missing or does not belong to {path} (a killed run, or an edited file): "
                             f"rerun {producer} with --force")
    return arr


def cached(path, settings, build, producer, force=False, companions=(), rebuild_stale='', load=True, quiet=False):
    """Load or build: the one rule of every cache the steps hand on. The array at `path` is reused
    when its sidecar holds `settings` (the inputs' fingerprints among them), its checksum holds, and
    each companion file beside it still has the sha256 the sidecar recorded. Else build() makes it
    and returns the array, or (array, more settings), saved atomically with its sidecar last (the
    companions, which build() wrote, are fingerprinted in it); or None when build() wrote `path` and
    its sidecar itself. A cache made with other settings is a CacheError that names the setting and
    --force, or, with rebuild_stale (what the file holds, in words), a note and a rebuild; `force`
    rebuilds. Returns (the array, or None when not `load`; its sidecar)."""
    status = cache_status(path, settings)
    if rebuild_stale and status not in ('ok', 'missing'):
        print(f"rebuilding {rebuild_stale}: {status}")
        force = True
    if reusable(path, settings, force, producer):
        if not quiet:
            print(f"reusing {path}")
        arr = load_array(path, settings, producer, verify=False, companions=companions) if load else None
        return arr, read_sidecar(path)
    out = build()
    if out is None:
        return (load_array(path, settings, producer) if load else None), read_sidecar(path)
    arr, more = out if isinstance(out, tuple) else (out, {})
    more = dict(more, **{n + '_sha256': sha256_file(os.path.join(os.path.dirname(path), n)) for n in companions})
    return arr, save_array(path, arr, dict(settings, **more), producer)


def read_sidecar(path):
    """The sidecar of the cached array `path`: producer, settings, shape, dtype, sha256."""
    with open(path + '.json') as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# image sources: every dataset becomes a list of images (a path or an in-memory array) with
# a 0/1 label matrix; single-label sets are one-hot. Bad input names the file and line.
class DataError(ValueError):
    pass


class Images:
    """The images of a dataset in a fixed order: `len`, `labels` (N x C int8), `names`,
    and `load(i)` -> RGB PIL image. `root` + `names[i]` is the file, or `arrays[i]` the pixels."""

    def __init__(self, names, labels, root=None, arrays=None, classes=None):
        self.names, self.labels, self.root, self.arrays = list(names), np.asarray(labels, np.int8), root, arrays
        self.classes = classes or [str(c) for c in range(self.labels.shape[1])]

    def __len__(self):
        return len(self.names)

    def load(self, i):
        from PIL import Image
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        with Image.open(os.path.join(self.root, self.names[i])) as im:
            return to_rgb(im)

    def fingerprint(self):
        """sha256 of what the features are made from: every image's name, size and modification
        time (files), or the pixels (arrays), and the labels. Another picture under the same name,
        an edited label or another image order gives another fingerprint."""
        h = hashlib.sha256()
        if isinstance(self.arrays, np.ndarray):
            h.update(np.ascontiguousarray(self.arrays).data)
        elif self.arrays is not None:  # an HDF5 file: its size and time
            st = os.stat(self.arrays.path)
            h.update(f'{self.arrays.path}\t{st.st_size}\t{st.st_mtime_ns}\n'.encode())
        for n in self.names:
            if self.root is not None:
                st = os.stat(os.path.join(self.root, n))
                h.update(f'{n}\t{st.st_size}\t{st.st_mtime_ns}\n'.encode())
            else:
                h.update(f'{n}\n'.encode())
        h.update(np.ascontiguousarray(self.labels).data)
        return h.hexdigest()[:16]


def to_rgb(im):
    """An 8-bit RGB copy of a PIL image. High-bit-depth modes are scaled to 0..255, not clipped
    (PIL's convert('RGB') clips a 16-bit grey value above 255 to white): 16-bit ('I;16*', or 'I'
    holding values above 255) divides by 257, float ('F') in 0..1 multiplies by 255."""
    from PIL import Image
    if im.mode.startswith('I;16') or im.mode in ('I', 'F'):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == 'F' and a.max(initial=0) <= 1.0:
            a = a * 255
        elif im.mode != 'F' and (im.mode.startswith('I;16') or a.max(initial=0) > 255):
            a = a / 257
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
    return im.convert('RGB')  # convert() reads the whole file, so truncation shows here


_LIST_LINE = re.compile(r'^\s*(.*?\S)((?:\s+[01](?=\s|$))+)\s*$')   # path, then 0/1 labels
_LIST_PATH = re.compile(r'^\s*(.*?\.(?:' + '|'.join(e[1:] for e in IMAGE_EXTS) + r'))(?=\s|$)(.*)$',
                                      re.IGNORECASE)              # the path ends at an image extension


def read_lines(path):
    """The lines of a text file in UTF-8; another encoding is an error naming the file, the line
    and the fix."""
    if not os.path.isfile(path):
        raise DataError(f"list file {path} does not exist")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8').splitlines()
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b'\n') + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#x}); convert the file, e.g. "
                        f"iconv -f latin1 -t utf-8 {path} > fixed.txt") from None


def read_list_file(path, root, n_labels=None, check=True):
    """`relative/path.jpg 0 1 0 ...` per line -> (names, labels). The path is everything before the
    trailing 0/1 labels, so it may hold spaces. Checks every line (UTF-8, the label count) and that
    the images exist (lists the first missing ones and their count)."""
    names, labels = [], []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        m = _LIST_PATH.match(line) or _LIST_LINE.match(line)
        if not m or not m.group(2).split():
            raise DataError(f"{path}:{lineno}: expected 'path 0 1 0 ...' (one-hot labels after the image path), "
                            f"got {line.strip()[:120]!r}")
        name, vec = m.group(1), m.group(2).split()
        if any(v not in ('0', '1') for v in vec):
            raise DataError(f"{path}:{lineno}: labels must be 0/1 integers after the image path, got "
                            f"{line.strip()[:120]!r}")
        if n_labels and len(vec) > n_labels:  # a file name that itself ends in ' 0' or ' 1'
            name, vec = name + ' ' + ' '.join(vec[:len(vec) - n_labels]), vec[len(vec) - n_labels:]
        n_labels = n_labels or len(vec)
        if len(vec) != n_labels:
            raise DataError(f"{path}:{lineno}: {len(vec)} labels, but earlier lines have {n_labels}")
        names.append(name)
        labels.append([int(v) for v in vec])
    if not names:
        raise DataError(f"list file {path} holds no images")
    if check:
        check_exist(names, root, path)
    return names, np.array(labels, np.int8)


def check_exist(names, root, source):
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise DataError(f"{len(missing)} of {len(names)} images named in {source} do not exist under {root}, "
                        f"e.g. {', '.join(missing[:5])}")


def _cifar10(path, download):
    import torchvision
    try:
        parts = [torchvision.datasets.CIFAR10(path, train=t, download=download) for t in (True, False)]
    except Exception as e:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, ...
        raise DataError(f"cannot load CIFAR-10 from {path} ({type(e).__name__}: {e}). With no network, download "
                        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on another machine, unpack it "
                        f"so that {path}/cifar-10-batches-py exists, and pass --data_path={path}") from e
    arrays = np.concatenate([p.data for p in parts])          # the 60,000 images, train then test
    y = np.concatenate([np.array(p.targets) for p in parts])
    return Images([f'cifar10/{i}' for i in range(len(y))], np.eye(10, dtype=np.int8)[y],
                  arrays=arrays, classes=list(parts[0].classes))


def _folder(path):
    if not os.path.isdir(path):
        raise DataError(f"image folder {path} does not exist (expected {path}/<class>/<image>)")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    names, y = [], []
    for c, cls in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(path, cls)) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise DataError(f"the class folder {os.path.join(path, cls)} holds no images ({', '.join(IMAGE_EXTS)}): "
                            f"add images to it or move it out of {path}")
        names += [f'{cls}/{f}' for f in files]
        y += [c] * len(files)
    if not names:
        raise DataError(f"no images found in {path}/<class>/ (extensions {', '.join(IMAGE_EXTS)})")
    return Images(names, np.eye(len(classes), dtype=np.int8)[y], root=path, classes=classes)


def _mirflickr(path):
    """MIRFlickr-25k: images mirflickr/im<N>.jpg, annotations/<label>.txt listing image numbers
    (the 24 potential labels; the *_r1 'relevant' files are not used)."""
    ann = os.path.join(path, 'annotations')
    img_dir = os.path.join(path, 'mirflickr')
    files = sorted(f for f in glob.glob(os.path.join(ann, '*.txt'))
                   if not f.endswith('_r1.txt') and 'README' not in os.path.basename(f).upper())
    if not files or not os.path.isdir(img_dir):
        raise DataError(f"Flickr25k: expected {path}/list.txt, or the MIRFlickr layout {img_dir}/im<N>.jpg with "
                        f"annotation files {ann}/<label>.txt")
    labels = np.zeros((25000, len(files)), np.int8)
    for c, f in enumerate(files):
        for lineno, line in enumerate(read_lines(f), 1):
            if line.strip():
                try:
                    labels[int(line) - 1, c] = 1
                except (ValueError, IndexError):
                    raise DataError(f"{f}:{lineno}: expected an image number 1..25000, got {line.strip()!r}") from None
    names = [f'mirflickr/im{i + 1}.jpg' for i in range(25000)]
    check_exist(names, path, img_dir)
    return Images(names, labels, root=path, classes=[os.path.basename(f)[:-4] for f in files])


class _H5Images:
    """Images stored as IAll[i] (3 x W x H uint8) in an HDF5 file (the 20,015-image MIRFlickr .mat/.h5
    that the authors' code reads), opened lazily in each process, so DataLoader workers can share it."""

    def __init__(self, path):
        self.path, self._file, self._pid = path, None, None

    def __getitem__(self, i):
        import h5py
        if self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, 'r'), os.getpid()
        return np.ascontiguousarray(np.transpose(self._file['IAll'][i], (2, 1, 0)))  # -> H x W x 3, as the authors

    def __getstate__(self):
        return dict(path=self.path, _file=None, _pid=None)


def _flickr_mat(path):
    """The authors' Flickr25k: a file with IAll (images, HDF5: .h5 or a v7.3 .mat) and a .mat with LAll
    (20,015 x 24 labels), found in `path` by those names (e.g. mirflickr25k-iall.mat, mirflickr25k-lall.mat)."""
    files = sorted(os.listdir(path)) if os.path.isdir(path) else []
    iall = [f for f in files if 'iall' in f.lower() and f.lower().endswith(('.mat', '.h5', '.hdf5'))]
    lall = [f for f in files if 'lall' in f.lower() and f.lower().endswith(('.mat', '.h5', '.hdf5'))]
    if not iall or not lall:
        return None
    try:
        import h5py
    except ImportError:
        raise DataError(f"reading {path}/{iall[0]} (HDF5) needs h5py: pip install h5py") from None
    ipath, lpath = os.path.join(path, iall[0]), os.path.join(path, lall[0])
    try:
        import scipy.io
        labels = scipy.io.loadmat(lpath)['LAll']
    except (NotImplementedError, ValueError):  # a v7.3 .mat is HDF5, stored transposed
        with h5py.File(lpath, 'r') as f:
            labels = np.asarray(f['LAll']).T
    except KeyError:
        raise DataError(f"{lpath} has no LAll variable (the Flickr25k labels)") from None
    try:
        with h5py.File(ipath, 'r') as f:
            n = f['IAll'].shape[0]
    except (OSError, KeyError) as e:
        raise DataError(f"{ipath} is not an HDF5 file with an IAll dataset (the Flickr25k images): {e}") from None
    if n != len(labels):
        raise DataError(f"{ipath} holds {n} images but {lpath} {len(labels)} label rows")
    return Images([f'flickr25k/{i}' for i in range(n)], labels, arrays=_H5Images(ipath))


# the split files of the authors' repository (its data/<set>/ files) and of DeepHash-pytorch, in a --split_dir
SPLIT_FORMATS = {
    'lists': ('query.txt', 'retrieval.txt', 'train.txt'),             # ours: 'path 0 1 ...', names in the dataset
    'cifar_index': ('train_index.txt',),                              # CIFAR-10: train indices into the 50,000
    'index': ('query_index.txt', 'retrieval_index.txt', 'train_index.txt'),  # Flickr25k: indices into IAll
    'dsdh': ('test_img.txt', 'database_img.txt', 'train_img.txt'),     # NUS-WIDE, with *_label_onehot.txt
    'deephash': ('test.txt', 'database.txt', 'train.txt'),            # MS-COCO, DeepHash-pytorch: 'path 0 1 ...'
}


def split_fingerprints(split_dir):
    """{file: sha256} of the split files a --split_dir holds (its format's, and NUS-WIDE's label files)."""
    fmt = split_format(split_dir)
    files = list(SPLIT_FORMATS[fmt]) + ([f.replace('_img.txt', '_label_onehot.txt') for f in SPLIT_FORMATS[fmt]]
                                        if fmt == 'dsdh' else [])
    return {f: sha256_file(os.path.join(split_dir, f)) for f in files}


def split_format(split_dir):
    """Which SPLIT_FORMATS a --split_dir holds (the first whose files are all there)."""
    for name in ('lists', 'index', 'dsdh', 'deephash', 'cifar_index'):
        if all(os.path.isfile(os.path.join(split_dir, f)) for f in SPLIT_FORMATS[name]):
            return name
    raise DataError(f"--split_dir={split_dir} holds none of the split formats: "
                    + '; '.join(', '.join(v) for v in SPLIT_FORMATS.values()))


def _resolve(names, root, source):
    """Image paths relative to `root`: as listed, or else found by file name anywhere under root (the
    authors' code maps NUS-WIDE's images/x.jpg to Flickr/*/x.jpg and prefixes MS-COCO's with MSCOCO/)."""
    missing = [i for i, n in enumerate(names) if not os.path.isfile(os.path.join(root, n))]
    if not missing:
        return names
    where = {}
    for d, _, files in os.walk(root):
        for f in files:
            where.setdefault(f, os.path.relpath(os.path.join(d, f), root))
    names = list(names)
    for i in missing:
        names[i] = where.get(os.path.basename(names[i]), names[i])
    check_exist(names, root, source)
    return names


def _listed_images(dataset, data_path, split_dir, fmt):
    """Images defined by split lists (dsdh, deephash): every listed image once, retrieval's first."""
    parts = []
    for f in SPLIT_FORMATS[fmt][::-1]:  # retrieval (database), query (test), then train
        path = os.path.join(split_dir, f)
        if fmt == 'dsdh':
            label_file = os.path.join(split_dir, f.replace('_img.txt', '_label_onehot.txt'))
            names = [l.strip() for l in read_lines(path) if l.strip()]
            try:
                labels = np.loadtxt(label_file, dtype=np.int64, ndmin=2)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read the labels {label_file}: {e}") from None
            if len(labels) != len(names):
                raise DataError(f"{path} lists {len(names)} images but {label_file} has {len(labels)} label rows")
        else:
            names, labels = read_list_file(path, data_path, check=False)
        parts.append((names, labels, path))
    seen, out_names, out_labels = {}, [], []
    for names, labels, path in parts:
        for n, l in zip(names, labels):
            if n not in seen:
                seen[n] = len(out_names)
                out_names.append(n)
                out_labels.append(l)
    resolved = _resolve(out_names, data_path, ', '.join(p for _, _, p in parts))
    images = Images(resolved, np.array(out_labels, np.int8), root=data_path)
    images.listed = out_names  # the names as the split files write them
    return images


def load_images(dataset, data_path, download=True, split_dir=''):
    """The Images of `dataset` (a name of DATASETS) found at `data_path`; split files that list
    the images themselves (NUS-WIDE's *_img.txt, MS-COCO's train/test/database.txt) define them."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split_dir and split_format(split_dir) in ('dsdh', 'deephash'):
        return _listed_images(dataset, data_path, split_dir, split_format(split_dir))
    if dataset == 'cifar10':
        return _cifar10(data_path, download)
    if dataset == 'folder':
        return _folder(data_path)
    list_file = os.path.join(data_path, 'list.txt')
    if dataset == 'flickr25k' and not os.path.isfile(list_file):
        images = _flickr_mat(data_path) if os.path.isdir(data_path) else None
        if images is not None:
            return images
        images = _mirflickr(data_path)
    else:
        if not os.path.isfile(list_file):
            raise DataError(f"{dataset}: expected the list file {list_file} ('relative/path.jpg 0 1 0 ...' per "
                            f"image, paths relative to {data_path}), or your own split lists via --split_dir")
        images = Images(*read_list_file(list_file, data_path), root=data_path)
    if dataset == 'nuswide' and images.labels.shape[1] > NUSWIDE_CONCEPTS:  # keep the 21 most frequent concepts
        top = np.sort(np.argsort(-images.labels.sum(0), kind='stable')[:NUSWIDE_CONCEPTS])
        images.labels, images.classes = images.labels[:, top], [images.classes[c] for c in top]
    keep = np.flatnonzero(images.labels.any(1))  # unlabelled images are removed (Section 4.1.1)
    if len(keep) < len(images):
        images = Images([images.names[i] for i in keep], images.labels[keep], images.root,
                        None if images.arrays is None else images.arrays[keep], images.classes)
    return images


# -----------------------------------------------------------------------------
# splits (Section 4.1.1): query, retrieval = the rest, train drawn from retrieval
def _per_class(labels, n, rng, pool, part):
    """For each class in order, draw n images of that class from `pool`, none drawn twice (`part`: the
    set drawn, 'query' or 'train', for the error)."""
    avail = np.zeros(len(labels), bool)
    avail[np.asarray(pool)] = True
    out = []
    for c in range(labels.shape[1]):
        cand = np.flatnonzero(avail & (labels[:, c] > 0))
        if len(cand) < n:
            left = 'images' if part == 'query' else 'images outside the query set'
            raise DataError(f"the split needs {n} {part} images of each class, but class {c} has {len(cand)} {left}: "
                            f"give dataset_extract.py a smaller --{part} (per class), or your own split with "
                            f"--split_dir")
        pick = rng.choice(cand, n, replace=False)
        avail[pick] = False
        out.append(pick)
    return np.sort(np.concatenate(out)).astype(np.int64)


def split_rule(dataset, query=None, train=None):
    """The DATASETS rule with the query/train sizes overridden where given (per class for
    per-class sets, in total otherwise)."""
    rule = dict(DATASETS[dataset])
    qk, tk = ('query_per_class', 'train_per_class') if 'query_per_class' in rule else ('query', 'train')
    if query is not None:
        rule[qk] = query
    if train is not None:
        rule[tk] = train
    return rule


def make_split(labels, rule, seed):
    """(query, retrieval, train) index arrays drawn by `rule` (a DATASETS entry) with `seed`."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if 'query_per_class' in rule:
        query = _per_class(labels, rule['query_per_class'], rng, np.arange(n), 'query')
        retrieval = np.setdiff1d(np.arange(n), query)
        train = _per_class(labels, rule['train_per_class'], rng, retrieval, 'train')
    else:
        if rule['query'] + rule['train'] > n:
            raise DataError(f"{n} images cannot give {rule['query']} query and {rule['train']} train images: give "
                            f"dataset_extract.py a smaller --query or --train, or your own split with --split_dir")
        query = np.sort(rng.permutation(n)[:rule['query']])
        retrieval = np.setdiff1d(np.arange(n), query)
        train = np.sort(rng.choice(retrieval, rule['train'], replace=False))
    return query, retrieval, train


def _read_indices(path, n):
    try:
        idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise DataError(f"{path}: expected one integer index per line ({e})") from None
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise DataError(f"{path}: {len(bad)} indices outside 0..{n - 1}, e.g. {bad[:5].tolist()}")
    return idx


def read_split_dir(split_dir, images):
    """(query, retrieval, train) index arrays into `images` from the split files in `split_dir`, in
    any of SPLIT_FORMATS: our query.txt / retrieval.txt / train.txt lists of the dataset's names; the
    authors' CIFAR-10 train_index.txt (query: the official test batch, retrieval: the five training
    batches, train: those indices into them); Flickr25k's *_index.txt into IAll; NUS-WIDE's *_img.txt
    and MS-COCO's (or DeepHash-pytorch's) test/database/train.txt, whose images load_images read.
    Then check_split reports overlaps."""
    fmt = split_format(split_dir)
    files = [os.path.join(split_dir, f) for f in SPLIT_FORMATS[fmt]]
    if fmt == 'cifar_index':
        if len(images) != 60000:
            raise DataError(f"{files[0]} indexes CIFAR-10's 50,000 training images; this dataset has {len(images)}")
        out = (np.arange(50000, 60000), np.arange(50000), np.sort(_read_indices(files[0], 50000)))
        files = ['the test batch', 'the training batches', files[0]]
    elif fmt == 'index':
        out = tuple(_read_indices(f, len(images)) for f in files)
    else:
        pos = {n: i for i, n in enumerate(getattr(images, 'listed', images.names))}
        out = []
        for path in files:
            if fmt == 'dsdh':
                names = [l.strip() for l in read_lines(path) if l.strip()]
            else:
                names = read_list_file(path, '', images.labels.shape[1], check=False)[0]
            unknown = [n for n in names if n not in pos]
            if unknown:
                raise DataError(f"{len(unknown)} images of {path} are not in the dataset, e.g. "
                                f"{', '.join(unknown[:5])}")
            out.append(np.array([pos[n] for n in names], np.int64))
    check_split(*out, *files)
    return tuple(out)


def check_split(query, retrieval, train, q_name='query', r_name='retrieval', t_name='train'):
    """A query image in retrieval or train, or an image twice in one part, is an error; train
    images outside retrieval are reported (the paper draws train from retrieval)."""
    for idx, name in ((query, q_name), (retrieval, r_name), (train, t_name)):
        if len(np.unique(idx)) < len(idx):
            raise DataError(f"{name} lists {len(idx) - len(np.unique(idx))} images more than once")
    for other, name in ((retrieval, r_name), (train, t_name)):
        both = np.intersect1d(query, other)
        if len(both):
            raise DataError(f"{len(both)} query images of {q_name} are also in {name} (e.g. indices "
                            f"{both[:5].tolist()}): a query must be unseen by training and not retrieve itself")
    outside = np.setdiff1d(train, retrieval)
    if len(outside):
        print(f"note: {len(outside)} of {len(train)} train images of {t_name} are not in {r_name} (the paper draws "
              f"train from retrieval)")


# -----------------------------------------------------------------------------
# views: the plain view is the backbone's own preprocessing; the augmented views v1, v2 use
# the AUG_* constants, then the same resize and normalisation as the backbone
def augment_transform(preprocess):
    from torchvision import transforms as T
    from models import preprocess_params
    size, mean, std, interp = preprocess_params(preprocess)
    blur_kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.Compose([
        T.RandomResizedCrop(size, scale=AUG_CROP_SCALE, interpolation=interp),
        T.RandomHorizontalFlip(AUG_FLIP_P),
        T.RandomApply([T.ColorJitter(*AUG_JITTER)], p=AUG_JITTER_P),
        T.RandomGrayscale(AUG_GRAY_P),
        T.RandomApply([T.GaussianBlur(blur_kernel, AUG_BLUR_SIGMA)], p=AUG_BLUR_P),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def augment_settings():
    return dict(crop_scale=AUG_CROP_SCALE, flip=AUG_FLIP_P, jitter=AUG_JITTER, jitter_p=AUG_JITTER_P,
                gray=AUG_GRAY_P, blur_p=AUG_BLUR_P, blur_sigma=AUG_BLUR_SIGMA)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIEW_RECIPES = ('simclr', 'released')  # ours (the backbone's own plain view, AUG_* views) or the authors' code's


def released_views(dataset, size=224):
    """(plain, augmented) views of the authors' released code (their data loaders' transforms) at the backbone's
    input `size` (224 for every real backbone, as theirs; 256 scales with it), every one
    normalised with ImageNet's mean and std. CIFAR-10: plain Resize(224, bicubic) + CenterCrop(224);
    augmented Resize(224, bicubic), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.7, grayscale
    p = 0.2, a 3 x 3 Gaussian blur with sigma in [0.1, 2] at p = 0.5, no crop. The other sets:
    plain Resize(256) + CenterCrop(224); augmented RandomResizedCrop(224) + flip. (Their blur is
    OpenCV's on the uint8 array; torchvision's same kernel here may round a pixel differently.)"""
    from torchvision import transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if dataset == 'cifar10':
        plain = T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size)] + tail)
        augment = T.Compose([T.Resize(size, interpolation=bicubic), T.RandomHorizontalFlip(),
                             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.7), T.RandomGrayscale(p=0.2),
                             T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5)] + tail)
    else:
        plain = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)] + tail)
        augment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + tail)
    return plain, augment


# -----------------------------------------------------------------------------
# views made on the extraction device (dataset_extract.py's default, VIEW_PATH='tensor'): each
# image is decoded once, in a DataLoader worker, and all of its views are made from it as batched
# tensor operations on the device. A view's random choices are drawn by torchvision's own samplers
# (RandomResizedCrop.get_params, ColorJitter.get_params, ...), in the order its pipeline draws
# them, from a random stream of its own: the torchvision PIL pipeline run on the same stream makes
# the same view (VIEW_PATH='pil', the reference the tests hold this path to). Each operation
# reproduces PIL's arithmetic on the 0..255 grid (Pillow's Resample.c, Blend.c, Convert.c).
VIEW_PATHS = ('tensor', 'pil')


def view_seed(seed, i, view):
    """The seed of the random stream of view `view` of image `i`: 63 bits of numpy's SeedSequence
    of (seed, i, view). No two (seed, image, view) share a stream, in any worker, rank, chunk size or
    rerun (arithmetic such as (seed * p + i) * 101 + view collides once views outnumber 101)."""
    return int(np.random.SeedSequence([seed, int(i), int(view)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def view_steps(transform):
    """A torchvision pipeline as the steps the tensor path runs, in order: ('resize', size, max_size,
    interp), ('crop', h, w) (centre), ('rrc', h, w, scale, ratio, interp), ('flip', p), ('jitter', p,
    brightness, contrast, saturation, hue), ('gray', p), ('blur', p, kernel, sigma), ('normalize', mean,
    std); p is None where the pipeline tosses no coin (a bare ColorJitter).
    A transform it does not know is an error naming it."""
    from torchvision import transforms as T
    if not isinstance(transform, T.Compose):  # torchvision weights' preset (VGG-16): resize, crop, normalise
        return [('resize', list(transform.resize_size), None, transform.interpolation),
                ('crop', transform.crop_size[0], transform.crop_size[-1]),
                ('normalize', tuple(transform.mean), tuple(transform.std))]
    steps = []
    for t in transform.transforms:
        inner = t.transforms[0] if isinstance(t, T.RandomApply) and len(t.transforms) == 1 else t
        p = t.p if inner is not t else None
        if isinstance(t, T.Resize):
            steps.append(('resize', [t.size] if isinstance(t.size, int) else list(t.size), t.max_size, t.interpolation))
        elif isinstance(t, T.CenterCrop):
            steps.append(('crop', *t.size))
        elif isinstance(t, T.RandomResizedCrop):
            steps.append(('rrc', *t.size, tuple(t.scale), tuple(t.ratio), t.interpolation))
        elif isinstance(t, T.RandomHorizontalFlip):
            steps.append(('flip', t.p))
        elif isinstance(inner, T.ColorJitter):
            steps.append(('jitter', p, inner.brightness, inner.contrast, inner.saturation, inner.hue))
        elif isinstance(t, T.RandomGrayscale):
            steps.append(('gray', t.p))
        elif isinstance(inner, T.GaussianBlur):
            steps.append(('blur', p, tuple(inner.kernel_size), tuple(inner.sigma)))
        elif isinstance(t, T.ToTensor):  # (open_clip's MaybeToTensor too) the device's float conversion
            pass
        elif isinstance(t, T.Normalize):
            steps.append(('normalize', tuple(t.mean), tuple(t.std)))
        elif type(t).__name__ != 'MaybeConvertMode' and getattr(t, '__name__', '') != '_convert_to_rgb':
            raise ValueError(f"the tensor view path does not know the transform {t!r}: pass --view_path=pil")
        if steps and steps[-1][0] in ('resize', 'rrc') and steps[-1][-1] not in (T.InterpolationMode.BILINEAR,
                                                                                T.InterpolationMode.BICUBIC):
            raise ValueError(f"the tensor view path resizes bilinear or bicubic, not {steps[-1][-1]}: pass "
                             f"--view_path=pil")
    kinds = [s[0] for s in steps]
    if kinds.count('resize') + kinds.count('rrc') > 1 or ('crop' in kinds and kinds.index('crop') < max(
            [kinds.index(k) for k in ('resize', 'rrc') if k in kinds], default=-1)) or kinds.count('crop') > 1:
        raise ValueError(f"the tensor view path makes one resampling, then one centre crop: {transform!r} has "
                         f"another order; pass --view_path=pil")
    return steps


def _resized_size(h, w, size, max_size):
    """torchvision's Resize output size of an h x w image (its _compute_resized_output_size)."""
    if len(size) == 2:
        return list(size)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return [new_long, new_short] if w <= h else [new_short, new_long]


VIEW_KEYS = ('box', 'size', 'window', 'flip', 'jitter', 'order', 'factors', 'gray', 'blur', 'sigma')


def draw_view(steps, h, w, seed=None):
    """The choices of one view of an h x w image, drawn by torchvision's samplers in its pipeline's
    order on the stream torch.manual_seed(seed) (None: the plain view, which draws nothing):
    box (top, left, height, width of the region resampled), size (what it is resampled to), window
    (top, left of the part kept), flip, jitter (applied) with order (ColorJitter's fn_idx) and
    factors (brightness, contrast, saturation, hue; NaN: not drawn, not applied), gray, blur (applied)
    with sigma."""
    import torch
    from torchvision import transforms as T
    v = dict(box=[0, 0, h, w], size=[h, w], window=[0, 0], flip=0, jitter=0, order=[0, 1, 2, 3],
             factors=[np.nan] * 4, gray=0, blur=0, sigma=1.0)
    cur = [h, w]

    def coin(p):  # RandomApply's coin: applied unless p < rand
        return p is None or not p < torch.rand(1)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for s in steps:
            if s[0] == 'resize':
                v['size'] = cur = _resized_size(*cur, s[1], s[2])
            elif s[0] == 'rrc':
                v['box'] = list(T.RandomResizedCrop.get_params(torch.empty(()).expand(3, *cur), s[3], s[4]))
                v['size'] = cur = [s[1], s[2]]
            elif s[0] == 'crop':
                v['window'] = [int(round((cur[0] - s[1]) / 2.0)), int(round((cur[1] - s[2]) / 2.0))]
                if min(v['window']) < 0:
                    raise ValueError(f"a {cur[0]} x {cur[1]} image is smaller than the {s[1]} x {s[2]} crop")
                cur = [s[1], s[2]]
            elif s[0] == 'flip':
                v['flip'] = int(bool(torch.rand(1) < s[1]))
            elif s[0] == 'jitter' and coin(s[1]):
                fn_idx, *f = T.ColorJitter.get_params(*s[2:6])
                v.update(jitter=1, order=fn_idx.tolist(), factors=[np.nan if x is None else x for x in f])
            elif s[0] == 'gray':
                v['gray'] = int(bool(torch.rand(1) < s[1]))
            elif s[0] == 'blur' and coin(s[1]):
                v.update(blur=1, sigma=T.GaussianBlur.get_params(*s[3]))
    return v


def draw_views(steps, h, w, seed, i, n_views):
    """{key: array (n_views, ...)} of views 0..n_views-1 of image i (seed None: the plain view)."""
    vs = [draw_view(steps, h, w, None if seed is None else view_seed(seed, i, v)) for v in range(n_views)]
    return {k: np.array([v[k] for v in vs], np.float64) for k in VIEW_KEYS}


def pil_part(transform):
    """The PIL half of a torchvision pipeline (everything before ToTensor), as one callable."""
    from torchvision import transforms as T
    if not isinstance(transform, T.Compose):  # torchvision weights' preset
        return T.Compose([T.Resize(list(transform.resize_size), transform.interpolation),
                          T.CenterCrop(transform.crop_size)])
    cut = next((k for k, t in enumerate(transform.transforms) if isinstance(t, T.ToTensor)), len(transform.transforms))
    return T.Compose(transform.transforms[:cut])


class DecodedImages:
    """torch Dataset of one extraction pass over images[indices]: item k -> (image, draws, k, ok),
    the image decoded once as a 3 x H x W uint8 tensor with the draws of its n_views views, made
    on the device later (path 'tensor'); or its n_views views, n_views x 3 x h x w uint8, draws None:
    made here by the tensor path with Pillow's resize (path 'tensor', make_here: extraction on the
    CPU, where the loader's workers share the device's cores) or by the PIL pipeline (path 'pil').
    View v of image i draws from view_seed(seed, i, v); seed None: the plain view."""

    def __init__(self, images, indices, transform, n_views=1, seed=None, path='tensor', bad_images='stop',
                 make_here=False):
        self.images, self.indices, self.n_views, self.seed = images, np.asarray(indices), n_views, seed
        self.steps, self.pil, self.path, self.bad_images = view_steps(transform), pil_part(transform), path, bad_images
        self.make_here = make_here
        if path == 'tensor' and any(s[0] == 'jitter' for s in self.steps):
            hsv_tables()  # now, in the process that starts the workers

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        import torch
        i = int(self.indices[k])
        try:
            img, ok = self.images.load(i), True
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
            where = os.path.join(self.images.root or '', self.images.names[i])
            if self.bad_images == 'stop':
                raise DataError(f"cannot read image {where} ({type(e).__name__}: {e}); fix or remove it, "
                                f"or pass --bad_images=skip to skip such images") from e
            from PIL import Image
            img, ok = Image.new('RGB', (64, 64)), False
        if self.path == 'pil':
            views = []
            for v in range(self.n_views):
                with torch.random.fork_rng(devices=[]):
                    if self.seed is not None:
                        torch.manual_seed(view_seed(self.seed, i, v))
                    views.append(torch.from_numpy(np.array(self.pil(img), np.uint8)).permute(2, 0, 1))
            return torch.stack(views), None, k, ok
        draws = draw_views(self.steps, img.height, img.width, self.seed, i, self.n_views)
        if self.make_here:
            return colour(resample_pil(img, draws, self.steps), draws, self.steps, 'cpu').to(torch.uint8), None, k, ok
        return torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1), draws, k, ok


def collate_decoded(items):
    """A loader batch: (x, draws, k, ok). Path 'tensor': x is the list of the B decoded images (3 x H x W
    uint8, each its own size), draws {key: B x V x ...}; views made here or by the PIL path: x is
    B x V x 3 x h x w uint8, draws None."""
    import torch
    xs, draws, ks, oks = zip(*items)
    k, ok = torch.tensor(ks), torch.tensor(oks)
    if draws[0] is None:
        return torch.stack(xs), None, k, ok
    return list(xs), {key: torch.from_numpy(np.stack([d[key] for d in draws])) for key in VIEW_KEYS}, k, ok


def _pil_filter(x, interp):
    """Pillow's bilinear (triangle, support 1) or bicubic (a = -0.5, support 2) filter."""
    from torchvision.transforms import InterpolationMode
    x = x.abs()
    if interp == InterpolationMode.BILINEAR:
        return (1 - x).clamp(min=0)
    a = -0.5
    return (((a + 2) * x - (a + 3)) * x * x + 1) * (x < 1) + ((((x - 5) * x + 8) * x - 4) * a) * (x >= 1) * (x < 2)


def resample_weights(n_in, start, length, out_len, first, n_out, interp):
    """(V, n_out, n_in) float32: Pillow's resampling weights (Resample.c, precompute_coeffs) for
    resizing the span [start, start + length) of a row to out_len samples, rows first..first +
    n_out of the result; the span's neighbours outside it get no weight (PIL crops, then resizes).
    start, length, out_len, first: (V,) float64 tensors. Only the filter's taps are computed."""
    import torch
    from torchvision.transforms import InterpolationMode
    support = 1.0 if interp == InterpolationMode.BILINEAR else 2.0
    scale = (length / out_len)[:, None]
    fs = scale.clamp(min=1.0)
    center = (first[:, None] + torch.arange(n_out, dtype=torch.float64, device=start.device) + 0.5) * scale
    lo = torch.floor(center - support * fs + 0.5).clamp(min=0)                   # first tap, in the span
    hi = torch.minimum(torch.floor(center + support * fs + 0.5), length[:, None])  # one past the last
    taps = int(np.ceil(support * float(fs.max()))) * 2 + 1
    pos = lo[..., None] + torch.arange(taps, dtype=torch.float64, device=start.device)  # (V, n_out, taps)
    w = _pil_filter((pos - center[..., None] + 0.5) / fs[..., None], interp) * (pos < hi[..., None])
    w = (w / w.sum(-1, keepdim=True).clamp(min=1e-300)).float()
    col = (pos + start[:, None, None]).clamp(max=n_in - 1).long()  # a tap past the row has weight 0
    return torch.zeros(len(start), n_out, n_in, device=start.device).scatter_add_(2, col, w)


def _round8(x):
    """Pillow's rounding of a resampling pass to uint8: half up, clipped to 0..255."""
    return (x + 0.5).floor_().clamp_(0, 255)


def _luma(x):
    """Pillow's convert('L') of (N, 3, H, W) values in 0..255: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    return ((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536).floor_()[:, None]


def _blend(d, x, f):
    """Pillow's Image.blend(d, x, f) on uint8 values: d + f (x - d), clipped, truncated."""
    return (d + f * (x - d)).clamp_(0, 255).floor_()


def _hsv_tables():
    """Pillow's rgb2hsv and hsv2rgb (Convert.c) as tables over every uint8 input, built once with C's
    float and double steps: (h, s) of each (r, g, b), and (r, g, b) of each (h, s, v); 2^24 rows each."""
    f32, f64 = np.float32, np.float64
    g, b = (a.ravel() for a in np.meshgrid(np.arange(256), np.arange(256), indexing='ij'))
    hs = np.empty((256, 65536, 2), np.uint8)
    for r in range(256):
        mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
        cr = (mx - mn).astype(f32)
        with np.errstate(divide='ignore', invalid='ignore'):
            s = cr / mx.astype(f32)
            rc, gc, bc = ((mx - c).astype(f32) / cr for c in (np.full_like(g, r), g, b))
        h = np.where(r == mx, bc - gc, np.where(g == mx, (2.0 + rc.astype(f64) - bc).astype(f32),
                                                (4.0 + gc.astype(f64) - rc).astype(f32)))
        h = np.fmod(h.astype(f64) / 6.0 + 1.0, 1.0).astype(f32)
        grey = mx == mn
        hs[r, :, 0] = np.where(grey, 0, np.clip(np.nan_to_num(np.trunc(h.astype(f64) * 255.0)), 0, 255))
        hs[r, :, 1] = np.where(grey, 0, np.clip(np.nan_to_num(np.trunc(s.astype(f64) * 255.0)), 0, 255))
    s, v = g.astype(f64), b.astype(f64)  # the same grid read as (s, v)
    rgb = np.empty((256, 65536, 3), np.uint8)
    for h in range(256):
        i = np.floor(h * 6.0 / 255.0)
        f = f32(h * 6.0 / 255.0 - i)
        fs = (s / 255.0).astype(f32)
        p, q, t = (np.clip(np.floor(v * k + 0.5), 0, 255) for k in (
            1.0 - fs.astype(f64), 1.0 - (fs * f).astype(f64), 1.0 - fs.astype(f64) * (1.0 - f64(f))))
        vals = (v, p, q, t)
        rgb[h] = np.stack([vals[_SEXTANT[c][int(i) % 6]] for c in range(3)], -1)
    return hs.reshape(-1, 2), rgb.reshape(-1, 3)


_HSV = {}


def hsv_tables():
    """_hsv_tables as CPU tensors, built once a process (0.7 s). DecodedImages builds them before the
    loader's workers start, so the workers share them instead of each building its own."""
    import torch
    if 'cpu' not in _HSV:
        _HSV['cpu'] = tuple(torch.from_numpy(t) for t in _hsv_tables())
    return _HSV['cpu']


_SEXTANT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # r, g, b as (v, p, q, t)[i % 6]


def _hue(x, f):
    """Pillow's hue shift as torchvision's adjust_hue does it on a PIL image: RGB -> HSV (uint8, Convert.c
    rgb2hsv), H += int(255 f) modulo 256, HSV -> RGB (hsv2rgb); the conversions are looked up."""
    import torch
    if x.device not in _HSV:
        _HSV[x.device] = tuple(t.to(x.device) for t in hsv_tables())
    to_hs, to_rgb = _HSV[x.device]
    n, _, hh, ww = x.shape
    c = x.int()
    hs = to_hs.index_select(0, ((c[:, 0] * 256 + c[:, 1]) * 256 + c[:, 2]).flatten()).view(n, hh, ww, 2).int()
    h = (hs[..., 0] + torch.trunc(f * 255).int().view(-1, 1, 1)) % 256   # numpy's uint8 wrap-around
    rgb = to_rgb.index_select(0, ((h * 256 + hs[..., 1]) * 256 + c.amax(1)).flatten())
    return rgb.view(n, hh, ww, 3).permute(0, 3, 1, 2).float()


def _jitter(x, op, f):
    """One of ColorJitter's four operations (0 brightness, 1 contrast, 2 saturation, 3 hue) of every
    view of x (N, 3, H, W, values in 0..255) with its own factor f (N,), as Pillow computes it."""
    f4 = f.float().view(-1, 1, 1, 1)
    if op == 0:
        return _blend(0.0, x, f4)
    if op == 1:  # ImageEnhance.Contrast: the mean grey level, rounded
        return _blend((_luma(x).double().mean((1, 2, 3), keepdim=True) + 0.5).floor().float(), x, f4)
    if op == 2:
        return _blend(_luma(x), x, f4)
    return _hue(x, f)


def _blur(x, sigma, kernel):
    """torchvision's gaussian_blur (reflect padding, rounded to uint8) with each view's own sigma, as
    two 1-d passes."""
    import torch
    import torch.nn.functional as F
    n, c, h, w = x.shape
    kh, kw = kernel[1], kernel[0]
    out = x
    for size, shape in ((kw, (1, kw)), (kh, (kh, 1))):
        half = (size - 1) * 0.5
        t = torch.linspace(-half, half, size, device=x.device)
        pdf = torch.exp(-0.5 * (t[None] / sigma.float()[:, None]) ** 2)
        k1 = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0).view(n * c, 1, *shape)
        pad = (size // 2, size // 2, 0, 0) if shape[0] == 1 else (0, 0, size // 2, size // 2)
        out = F.conv2d(F.pad(out.reshape(1, n * c, h, w), pad, mode='reflect'), k1, groups=n * c).view(n, c, h, w)
    return out.round_()


def make_views(x, draws, steps, device):
    """The views of a loader batch (collate_decoded) on `device`, as the backbone's input: B x V views,
    each image's in view order, (B V) x 3 x h x w float32 normalised. draws None: x holds the views."""
    import torch
    norm = next(s for s in steps if s[0] == 'normalize')
    mean = torch.tensor(norm[1], device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm[2], device=device).view(1, 3, 1, 1)
    if draws is None:
        y = x.to(device, non_blocking=True).flatten(0, 1).float()
    else:
        flat = {k: v.reshape(-1, *v.shape[2:]).numpy() for k, v in draws.items()}  # on the CPU: no device sync
        y = colour(resample(x, draws, steps, device), flat, steps, device)
    return (y.div_(255) - mean) / std


def _out_size(steps, sizes):
    """The views' height and width: the centre crop's, else the one resampled size of every view."""
    crop = next((s for s in steps if s[0] == 'crop'), None)
    if crop:
        return crop[1], crop[2]
    if not (sizes == sizes[0]).all():
        raise ValueError("the views of this pipeline differ in size from image to image: the tensor path needs one "
                         "size (add a centre crop, or pass --view_path=pil)")
    return int(sizes[0, 0]), int(sizes[0, 1])


def _interp(steps):
    from torchvision.transforms import InterpolationMode
    geo = next((s for s in steps if s[0] in ('resize', 'rrc')), None)
    return geo[-1] if geo else InterpolationMode.BILINEAR  # no resampling: identity weights


RESAMPLE_PIXELS = 1 << 25  # the most pixels (images x padded height x width) one batched resize pass takes


def resample(xs, draws, steps, device):
    """The crop and resize of every view (box -> size -> window of its draws) of the decoded images xs
    (a list of 3 x H x W uint8) on `device`: (B V) x 3 x h x w float on the 0..255 grid. As Pillow does
    it: horizontally, rounded to uint8, then vertically, each pass one batched matrix product with
    Pillow's antialiasing weights, over groups of images zero-padded to a common size (no view reads
    the padding) of at most RESAMPLE_PIXELS."""
    import torch
    B, V = draws['flip'].shape
    box, size, win = (draws[k].reshape(B * V, -1).to(device, non_blocking=True) for k in ('box', 'size', 'window'))
    out_h, out_w = _out_size(steps, draws['size'].reshape(B * V, 2))
    out, a = [], 0
    while a < B:
        e, H, W = a + 1, *xs[a].shape[1:]
        while e < B and (e + 1 - a) * max(H, xs[e].shape[1]) * max(W, xs[e].shape[2]) <= RESAMPLE_PIXELS:
            H, W, e = max(H, xs[e].shape[1]), max(W, xs[e].shape[2]), e + 1
        x = torch.zeros((e - a, 3, H, W), dtype=torch.uint8, device=device)
        for j, im in enumerate(xs[a:e]):
            x[j, :, :im.shape[1], :im.shape[2]] = im.to(device, non_blocking=True)
        r = slice(a * V, e * V)
        wy = resample_weights(H, box[r, 0], box[r, 2], size[r, 0], win[r, 0], out_h, _interp(steps))
        wx = resample_weights(W, box[r, 1], box[r, 3], size[r, 1], win[r, 1], out_w, _interp(steps))
        t = torch.bmm(x.float().reshape(e - a, 3 * H, W), wx.view(e - a, V * out_w, W).transpose(1, 2))
        t = _round8(t).view(e - a, 3, H, V, out_w).permute(0, 3, 2, 1, 4).reshape((e - a) * V, H, 3 * out_w)
        out.append(_round8(torch.bmm(wy, t)).view((e - a) * V, out_h, 3, out_w).permute(0, 2, 1, 3))
        a = e
    return torch.cat(out).contiguous()


def resample_pil(img, draws, steps):
    """resample's views of one PIL image made by Pillow itself (crop, resize, crop): the fastest
    antialiased resize on a CPU. V x 3 x h x w float on the 0..255 grid."""
    import torch
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    mode = {InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
            InterpolationMode.BICUBIC: Image.Resampling.BICUBIC}[_interp(steps)]
    out_h, out_w = _out_size(steps, draws['size'])
    views = []
    for (top, left, bh, bw), (rh, rw), (wt, wl) in zip(draws['box'].astype(int), draws['size'].astype(int),
                                                       draws['window'].astype(int)):
        v = img.crop((left, top, left + bw, top + bh))
        if v.size != (rw, rh):
            v = v.resize((rw, rh), mode)
        views.append(np.asarray(v.crop((wl, wt, wl + out_w, wt + out_h))))
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float()


def colour(y, d, steps, device):
    """The flip, colour jitter, grey and blur steps of views y (N x 3 x h x w, 0..255 grid, on `device`),
    each view with its own draws d ({key: N x ... numpy}), batched over the views that take each
    operation, as Pillow computes it."""
    import torch

    def subset(mask):  # the views where mask holds, as a device index (no device sync)
        idx = torch.from_numpy(np.flatnonzero(mask))
        return idx.to(device, non_blocking=True) if len(idx) else None
    factors = torch.from_numpy(d['factors']).to(device, non_blocking=True)
    sigma = torch.from_numpy(d['sigma']).to(device, non_blocking=True)
    for s in steps:
        if s[0] == 'flip' and (i := subset(d['flip'] > 0)) is not None:
            y[i] = y[i].flip(-1)
        elif s[0] == 'jitter':  # ColorJitter's four operations, in each view's own order
            for pos in range(4):
                for op in range(4):
                    i = subset((d['jitter'] > 0) & (d['order'][:, pos] == op) & ~np.isnan(d['factors'][:, op]))
                    if i is not None:
                        y[i] = _jitter(y[i], op, factors[i, op])
        elif s[0] == 'gray' and (i := subset(d['gray'] > 0)) is not None:
            y[i] = _luma(y[i]).expand(-1, 3, -1, -1)
        elif s[0] == 'blur' and (i := subset(d['blur'] > 0)) is not None:
            y[i] = _blur(y[i], sigma[i], s[2])
    return y


# -----------------------------------------------------------------------------
# cache layout: every path a step writes or reads, in one place, so every step agrees.
#   <cache>/<dataset>/labels.npy, names.txt, classes.txt, source.json   dataset_extract.py
#   <cache>/<dataset>/<split>/query.npy, retrieval.npy, train.npy  dataset_extract.py
#   <cache>/<dataset>/<backbone>-<weights>[-released]/images.npy, train_aug_<split>.npy, bad_images.txt
#                                                                 dataset_extract.py
#   .../<clip>-<weights>[-released]/external_*.npy                train.py (Eq. 5-6, cached)
#   <cache>/nouns/<vocab>_<clip>_<weights>[_released]/noun_feats.npy, noun_words.txt      nouns_embed.py
#   .../kmeans_k<N_k>_.../centres.npy, assign.npy; .../select_k<N_k>_t<T1>[_sim][_released]/selected_feats.npy,
#   selected_words.txt, selection.json                            nouns_embed.py
def dataset_dir(cache_dir, dataset):
    return os.path.join(cache_dir, dataset)


def split_tag(seed, split_dir=None):
    return f'split_{os.path.basename(os.path.normpath(split_dir))}' if split_dir else f'split_s{seed}'


def split_paths(cache_dir, dataset, tag):
    """{labels, query, retrieval, train}: the labels and the split's index files."""
    d = dataset_dir(cache_dir, dataset)
    return dict(labels=os.path.join(d, 'labels.npy'), **{p: os.path.join(d, tag, p + '.npy')
                                                          for p in ('query', 'retrieval', 'train')})


def feature_dir(cache_dir, dataset, backbone, pretrained, recipe='simclr'):
    """Features of one backbone, weights and view recipe ('-released' for the authors' views)."""
    from models import pretrained_tag
    return os.path.join(cache_dir, dataset, f'{backbone}-{pretrained_tag(pretrained)}'
                        + ('-released' if recipe == 'released' else ''))


def views_path(fdir, tag):
    """The augmented views of the train images of split `tag`, in the feature folder `fdir`."""
    return os.path.join(fdir, f'train_aug_{tag}.npy')


def external_path(fdir, external, vocab, n_k, t1, reading, tau1, released, tag):
    """e_i of every train image (Eq. 5-6) as train.py caches it, beside the CLIP features `fdir`."""
    return os.path.join(fdir, f"external_{external}_{os.path.basename(str(vocab))}_k{n_k}_t{t1}"
                              f"{'_sim' if reading == 'similarity' else ''}_tau{tau1}{'_released' if released else ''}"
                              f"_{tag}.npy")


def vocab_tag(vocab):
    """'wordnet', 'imagenet', or 'file-<name>' for a word-list file."""
    return vocab if vocab in ('wordnet', 'imagenet') else 'file-' + os.path.splitext(os.path.basename(vocab))[0]


def vocab_dir(cache_dir, vocab, clip_model, clip_pretrained, released=False):
    """Holds noun_feats.npy (unique nouns x D, unit rows) and noun_words.txt (same order)."""
    from models import pretrained_tag
    tag = f'{vocab_tag(vocab)}_{clip_model}_{pretrained_tag(clip_pretrained)}' + ('_released' if released else '')
    return os.path.join(cache_dir, 'nouns', tag)


def kmeans_dir(cache_dir, vocab, clip_model, clip_pretrained, n_k, iters, restarts, seed, init, tol, released=False):
    """Holds centres.npy and assign.npy of one K-means run, shared by every T1."""
    name = f"kmeans_k{n_k}_{'kpp' if init == 'k-means++' else init}_i{iters}_r{restarts}_s{seed}_tol{tol:g}"
    return os.path.join(vocab_dir(cache_dir, vocab, clip_model, clip_pretrained, released), name)


def selection_dir(cache_dir, vocab, clip_model, clip_pretrained, n_k, t1, released=False, reading='distance'):
    """Holds selected_feats.npy (t_com rows), selected_words.txt (word<TAB>rep|cen, same order) and
    selection.json: read, unique, duplicates, t_rep, t_cen, t_com, and seconds of embedding,
    clustering, selection and their total (the pre-processing time of Table 4)."""
    return os.path.join(vocab_dir(cache_dir, vocab, clip_model, clip_pretrained, released),
                        f'select_k{n_k}_t{t1}' + ('_sim' if reading == 'similarity' else '')
                        + ('_released' if released else ''))


def source_path(cache_dir, dataset):
    """Where dataset_extract.py read the images from, and their fingerprint (source.json)."""
    return os.path.join(dataset_dir(cache_dir, dataset), 'source.json')


def extracted_images(cache_dir, dataset, data_path=''):
    """The images dataset_extract.py read into `cache_dir` (eval_hash.py's and search.py's pictures):
    from `data_path`, or from where it recorded it read them, checked against the fingerprint it
    recorded. Other images (another dataset, a changed folder) are a DataError naming both."""
    src = {}
    if os.path.exists(source_path(cache_dir, dataset)):
        with open(source_path(cache_dir, dataset)) as f:
            src = json.load(f)
    path = data_path or src.get('data_path') or os.path.join('data', dataset)
    images = load_images(dataset, path, download=False, split_dir=src.get('split_dir', ''))
    want = read_sidecar(split_paths(cache_dir, dataset, '')['labels'])['settings'].get('images_sha')
    if want and images.fingerprint() != want:
        raise DataError(f"the images under {path} are not the ones dataset_extract.py read into {cache_dir}/{dataset} "
                        f"(from {src.get('data_path', 'a folder it did not record')}): "
                        + ("give --data_path the folder it read" if data_path else
                           "they changed since; rerun dataset_extract.py, or give --data_path the folder it read"))
    return images


def load_split(cache_dir, dataset, tag, producer='dataset_extract.py'):
    """(labels, query, retrieval, train) saved by dataset_extract.py, checked."""
    paths = split_paths(cache_dir, dataset, tag)
    return tuple(load_array(paths[p], producer=producer) for p in ('labels', 'query', 'retrieval', 'train'))
