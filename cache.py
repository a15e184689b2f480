"""The cache the three steps hand each other files through: atomic writes, the sidecar that vouches
for an array (the settings and input fingerprints that made it, its shape, dtype and sha256), the one
load-or-build rule (`cached`), the error line a script ends with, and the cache layout (every path a
step writes or reads, built in one place).
"""
import hashlib
import json
import os
import tempfile
import time

import numpy as np

# -----------------------------------------------------------------------------
# cache files: an array `x.npy` is trusted only beside its sidecar `x.npy.json`, which
# holds the settings that made it, its shape, dtype and sha256. Both are written to a
# temporary file and renamed, the sidecar last, so a killed run leaves nothing trusted.
class CacheError(RuntimeError):
    pass


def _setting_of(filename, where):
    """'--<name>' of the setting in `where` ({name: path}) whose file or folder holds `filename`, the
    innermost; '' when none does."""
    f, best = os.path.abspath(str(filename)), ('', '')
    for name, path in (where or {}).items():
        p = os.path.abspath(str(path)) if path else ''
        if p and (f == p or f.startswith(p.rstrip(os.sep) + os.sep)) and len(p) > len(best[1]):
            best = (f'--{name}', p)
    return best[0]


def user_error(e, where=None):
    """The one line `error: ...` a script ends with for an error the user can fix: the message of an
    error raised in a DataLoader worker without torch's wrapping and its traceback, a full disk or a
    read-only folder with the file it was writing and the setting that names its folder (`where`:
    {setting: path} of the script's folders, e.g. dict(cache_dir=CACHE_DIR, results=RESULTS))."""
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
    setting = _setting_of(e.filename, where) if isinstance(e, OSError) and e.filename else ''
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"error: no space left on the device while writing {e.filename or 'a file'} (the disk is full): free "
                f"some space (or choose another {setting or 'folder for it'}) and run the same command again; nothing "
                f"half-written is kept, and an extraction resumes where it stopped")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return (f"error: cannot write {e.filename or 'a file'} ({e.strerror}): choose a writable "
                f"{setting or 'folder for it'}")
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


def name_bytes(name):
    """A file name (or any text) as the bytes it stands for: a name that is not UTF-8 reaches Python with
    its bytes as surrogates (os.listdir's surrogateescape), and goes back to those bytes, so it can be
    hashed and stored as it is and read back to the same name."""
    return name.encode('utf-8', 'surrogateescape')


def shown(name):
    """A file name as it can be printed or put in a page: bytes that are not UTF-8 as \\xNN."""
    return name_bytes(name).decode('utf-8', 'backslashreplace')


def save_text(path, lines):
    atomic_write(path, lambda f: f.write(b''.join(name_bytes(l) + b'\n' for l in lines)))


def read_json(path, fix='rerun the step that writes it (with --force to rebuild)'):
    """The JSON object a step wrote at `path`; a damaged file is a CacheError that names it and `fix`."""
    try:
        with open(path, 'rb') as f:
            return json.loads(f.read().decode('utf-8', 'surrogateescape'))
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not whole JSON ({e}; a killed write, or an edit): {fix}") from None


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


def cache_status(path, settings, whose='this run'):
    """'missing', 'ok', or a sentence saying why the file at `path` cannot be trusted (`whose`: what
    holds `settings`, in words)."""
    if not os.path.exists(path + '.json'):
        return 'missing' if not os.path.exists(path) else f'{path} has no sidecar {path}.json (a killed run?)'
    meta = read_sidecar(path)
    for k, v in settings.items():
        have = meta['settings'].get(k, '<not recorded>')
        if json.loads(json.dumps(have, default=str)) != json.loads(json.dumps(v, default=str)):
            return f"{path} was made with {k}={have!r}, but {whose} has {k}={v!r}"
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
        meta = read_sidecar(path)
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
        return read_sidecar(path)['sha256']
    return sha256_file(path)


def fingerprints(**paths):
    """{name: fingerprint(path)} of a product's input files (the 'inputs' of its settings)."""
    return {name: fingerprint(p) for name, p in paths.items()}


def load_array(path, settings=None, producer='the step that writes it', verify=True, mmap=False, companions=(),
               whose='this run'):
    """Load a cached array after checking its sidecar against `settings`, its shape, dtype,
    checksum and finiteness, and that each companion file beside it (a word list written with it)
    still has the sha256 its sidecar recorded. Raises CacheError with what to do."""
    settings = settings or {}
    status = cache_status(path, settings, whose)
    rerun = f"run {producer} (with --force to rebuild)"
    if status == 'missing':
        raise CacheError(f"{path} does not exist: {rerun}")
    if status != 'ok':
        raise CacheError(f"stale or incomplete cache: {status}. Rerun {producer} with --force, "
                         f"or change CACHE_DIR")
    meta = read_sidecar(path)
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
    broken = broken_companion(path, meta, companions)
    if broken:
        raise CacheError(f"{broken}: rerun {producer} with --force")
    return arr


def broken_companion(path, meta, companions):
    """'' when each companion file beside `path` (a word list written with it) still has the sha256 its
    sidecar `meta` recorded, else a sentence naming the first that is missing or changed."""
    for name in companions:
        other = os.path.join(os.path.dirname(path), name)
        if not os.path.isfile(other):
            return f"{other}, written with {os.path.basename(path)}, is missing (deleted?)"
        if sha256_file(other) != meta['settings'].get(name + '_sha256'):
            return f"{other} does not belong to {path} (a killed run, or an edited file)"
    return ''


BUILT = []  # the products this process built (cached): a step that built nothing writes nothing else


def cached(path, settings, build, producer, force=False, companions=(), rebuild_stale='', load=True, quiet=False):
    """Load or build: the one rule of every cache the steps hand on. The array at `path` is reused
    when its sidecar holds `settings` (the inputs' fingerprints among them), its checksum holds, and
    each companion file beside it still has the sha256 the sidecar recorded. Else build() makes it
    and returns the array, or (array, more settings), saved atomically with its sidecar last (the
    companions, which build() wrote, are fingerprinted in it); or None when build() wrote `path` and
    its sidecar itself. A cache made with other settings is a CacheError that names the setting and
    --force, or, with rebuild_stale (what the file holds, in words), a note and a rebuild; `force`
    rebuilds, and so does a missing or changed companion (said). Returns (the array, or None when not
    `load`; its sidecar)."""
    status = cache_status(path, settings)
    if rebuild_stale and status not in ('ok', 'missing'):
        print(f"rebuilding {rebuild_stale}: {status}")
        force = True
    if reusable(path, settings, force, producer):
        broken = broken_companion(path, read_sidecar(path), companions)
        if not broken:
            if not quiet:
                print(f"reusing {path}")
            arr = load_array(path, settings, producer, verify=False) if load else None
            return arr, read_sidecar(path)
        print(f"rebuilding {path}: {broken}")  # a product with a missing part is made again, whole
        os.remove(path + '.json')
    BUILT.append(path)
    out = build()
    if out is None:
        return (load_array(path, settings, producer) if load else None), read_sidecar(path)
    arr, more = out if isinstance(out, tuple) else (out, {})
    more = dict(more, **{n + '_sha256': sha256_file(os.path.join(os.path.dirname(path), n)) for n in companions})
    return arr, save_array(path, arr, dict(settings, **more), producer)


_HELD = []  # the locks this process holds (hold), released when it ends


def hold(folder, busy):
    """Hold `folder`/.lock until the process ends, so that a second run writing the same folder stops
    with the line `busy` instead of racing this one. A folder this run cannot write is not locked: it
    writes nothing there (a read-only cache whose products all exist)."""
    import errno
    import fcntl
    path = os.path.join(folder, '.lock')
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(path, 'a')
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        if not os.path.isfile(path):
            return
        lock = open(path)  # a lock is taken on a file opened for reading too
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f"error: {busy}") from None
    _HELD.append(lock)


def read_sidecar(path):
    """The sidecar of the cached array `path`: producer, settings, shape, dtype, sha256."""
    return read_json(path + '.json')


# -----------------------------------------------------------------------------
# cache layout: every path a step writes or reads, in one place, so every step agrees.
#   <cache>/<dataset>/labels.npy, names.txt, classes.txt, source.json   dataset_extract.py
#   <cache>/<dataset>/<split>/query.npy, retrieval.npy, train.npy  dataset_extract.py
#   <cache>/<dataset>/<backbone>-<weights>[-released]/images.npy, train_aug_<split>.npy, bad_images.txt
#                                                                 dataset_extract.py
#   .../<clip>-<weights>[-released]/external_*.npy                train.py (Eq. 5-6, cached)
#   <cache>/nouns/<vocab>[-sample<n>]_<clip>_<weights>[_released]/noun_feats.npy, noun_words.txt  nouns_embed.py
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


def backbone_settings(backbone, pretrained):
    """What the sidecar of a features file records of the network that made it (dataset_extract.py),
    and what every reader of the file checks: its build, name and weights."""
    from models import backbone_build, pretrained_tag
    return dict(build=backbone_build(backbone, pretrained), backbone=backbone, pretrained=pretrained_tag(pretrained))


def features_settings(cache_dir, dataset, backbone, pretrained):
    """What every reader of a dataset's features (images.npy) expects their sidecar to hold: the
    network (backbone_settings), the dataset, and the images its labels were made from."""
    want = dict(backbone_settings(backbone, pretrained), dataset=dataset)
    labels = split_paths(cache_dir, dataset, '')['labels']
    made = read_sidecar(labels)['settings'] if os.path.exists(labels + '.json') else {}
    return dict(want, images_sha=made['images_sha']) if 'images_sha' in made else want


def load_features(cache_dir, dataset, backbone, pretrained, recipe='simclr', mmap=False):
    """The plain-view features of every image of `dataset` by `backbone` (dataset_extract.py), checked
    by the one rule (features_settings, checksum, shape, finiteness)."""
    path = os.path.join(feature_dir(cache_dir, dataset, backbone, pretrained, recipe), 'images.npy')
    return load_array(path, features_settings(cache_dir, dataset, backbone, pretrained), mmap=mmap,
                      producer=f'dataset_extract.py --dataset={dataset} --backbone={backbone} '
                               f'--backbone_pretrained={pretrained}')


def extraction_of(features_path):
    """The settings a product of the same extraction as the features at `features_path` (their
    augmented views) must hold: the features' own, but for the unreadable images they skipped."""
    return {k: v for k, v in read_sidecar(features_path)['settings'].items() if k != 'bad'}


def views_path(fdir, tag):
    """The augmented views of the train images of split `tag`, in the feature folder `fdir`."""
    return os.path.join(fdir, f'train_aug_{tag}.npy')


def external_path(fdir, external, vocab, n_k, t1, reading, tau1, released, tag):
    """e_i of every train image (Eq. 5-6) as train.py caches it, beside the CLIP features `fdir`."""
    return os.path.join(fdir, f"external_{external}_{vocab_tag(vocab)}_k{n_k}_t{t1}"
                              f"{'_sim' if reading == 'similarity' else ''}_tau{tau1}{'_released' if released else ''}"
                              f"_{tag}.npy")


def vocab_sample(vocab):
    """(the vocabulary, n) of a sample '<vocab>:<n>' of a vocabulary (n of its words, nouns_embed.read_words),
    else (vocab, None). A word-list file whose name itself ends in ':<digits>' is that file."""
    head, sep, tail = str(vocab).rpartition(':')
    if sep and head and tail.isdigit() and not os.path.isfile(vocab):
        return head, int(tail)
    return vocab, None


def vocab_tag(vocab):
    """'wordnet', 'imagenet', or 'file-<name>' for a word-list file; '-sample<n>' added for a sample
    '<vocab>:<n>', so a sample has caches of its own, never taken for the whole vocabulary."""
    base, n = vocab_sample(vocab)
    tag = base if base in ('wordnet', 'imagenet') else 'file-' + os.path.splitext(os.path.basename(base))[0]
    return tag + (f'-sample{n}' if n is not None else '')


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


def image_names(cache_dir, dataset, n):
    """The names of the dataset's n images (names.txt of dataset_extract.py), or <dataset>/<i>."""
    path = os.path.join(dataset_dir(cache_dir, dataset), 'names.txt')
    if not os.path.isfile(path):
        return [f'{dataset}/{i}' for i in range(n)]
    with open(path, 'rb') as f:
        return f.read().decode('utf-8', 'surrogateescape').split('\n')[:-1]  # a name as its bytes (name_bytes)


def source_path(cache_dir, dataset):
    """Where dataset_extract.py read the images from, and their fingerprint (source.json)."""
    return os.path.join(dataset_dir(cache_dir, dataset), 'source.json')


def load_split(cache_dir, dataset, tag, producer='dataset_extract.py'):
    """(labels, query, retrieval, train) saved by dataset_extract.py, checked."""
    paths = split_paths(cache_dir, dataset, tag)
    return tuple(load_array(paths[p], producer=producer) for p in ('labels', 'query', 'retrieval', 'train'))
