"""Shared test fixtures: a small generated image set with known classes."""
import importlib.util
import locale
import os
import select
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cache  # noqa: E402 (after the path to the project)
import warm  # noqa: E402 (tests/warm.py)


def _wordnet_available():
    """nltk's own wordnet data, or Debian's wordnet-base where nouns_embed.py looks for it."""
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
        return True
    except LookupError:
        import nouns_embed
        return os.path.isfile(os.path.join(nouns_embed.WORDNET_DIR, 'data.noun'))


needs_wordnet = pytest.mark.skipif(not _wordnet_available(), reason='no WordNet: nltk has no wordnet data and '
                                   '/usr/share/wordnet is absent (apt-get install wordnet-base)')


needs_numba = pytest.mark.skipif(importlib.util.find_spec('numba') is None,
                                 reason='no numba (pip install numba): hamming.py\'s compiled kernels go untested')


@pytest.fixture(params=['numpy', pytest.param('numba', marks=needs_numba)])
def kernel(request, monkeypatch):
    """eval_hash's ranking code, each way: a test that takes this fixture runs on the numpy path and on the compiled
    one (KERNEL='numba' whatever the size), and both must give the same results to the bit."""
    import eval_hash
    monkeypatch.setattr(eval_hash, 'KERNEL', request.param)
    return request.param


def make_image_folder(root, n_classes=10, per_class=40, size=32, seed=0):
    """DATA_PATH/<class>/<i>.png: the 'demo' dataset's generated images (dataset.demo_images) as files,
    so classes are told apart by a random-weight encoder too."""
    import dataset
    from PIL import Image
    pixels, y = dataset.demo_images(n_classes, per_class, size, seed)
    for j, (img, c) in enumerate(zip(pixels, y)):
        os.makedirs(os.path.join(root, f'class{c:02d}'), exist_ok=True)
        Image.fromarray(img).save(os.path.join(root, f'class{c:02d}', f'{j % per_class:03d}.png'))
    return root


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster than two fighting for a busy 2-core machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('images')))


def saved_map(run_dir):
    """MAP@K of the codes a train.py run saved (codes.npz), recomputed from them by eval_hash."""
    import eval_hash
    z = np.load(os.path.join(run_dir, 'codes.npz'))
    return eval_hash.mean_average_precision(z['query_h'], z['retrieval_h'], z['query_labels'], z['retrieval_labels'],
                                            int(z['topk']))


_WARM = {}  # this test process's warm interpreter (tests/warm.py), started by its first script run


def _own_env():
    """The environment a script run would get, but for the name of the test pytest puts there."""
    return {k: v for k, v in os.environ.items() if k != 'PYTEST_CURRENT_TEST'}


def _warm_run(script, args, timeout):
    """`python script args` forked from the warm interpreter: the same streams, exit status and timeout."""
    if 'proc' not in _WARM:
        _WARM['env'] = _own_env()
        _WARM['proc'] = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'warm.py')], cwd=ROOT, bufsize=0,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc = _WARM['proc']
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, 'out'), os.path.join(tmp, 'err')
        warm.send(proc.stdin, dict(script=os.path.join(ROOT, script), args=list(args), cwd=ROOT, env=dict(os.environ),
                                   stdout=out, stderr=err))
        pid = warm.receive(proc.stdout)
        if pid is None:  # it could not start: its imports failed
            raise RuntimeError('tests/warm.py stopped: python tests/warm.py < /dev/null shows why')
        if not select.select([proc.stdout], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            warm.receive(proc.stdout)
            raise subprocess.TimeoutExpired([script, *args], timeout)
        code = warm.receive(proc.stdout)

        def text(path):  # as subprocess.run(text=True) reads a stream: universal newlines
            with open(path, 'rb') as f:
                return f.read().decode(locale.getpreferredencoding(False)).replace('\r\n', '\n').replace('\r', '\n')
        return subprocess.CompletedProcess([sys.executable, script, *args], code, text(out), text(err))


def run_script(script, *args, check=True, env=None):
    """Run one of the pipeline scripts through its command line; returns CompletedProcess. A run in the tests'
    own environment is forked from a warm interpreter (tests/warm.py: 4-6 s less a run, the same behaviour);
    one with variables of its own (env), or with DUHEG_COLD_RUNS=1, starts a fresh python."""
    if env is None and not os.environ.get('DUHEG_COLD_RUNS') and _WARM.get('env', _own_env()) == _own_env():
        proc = _warm_run(script, args, 900)
    else:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, **(env or {})}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def one_error_line(proc):
    """The one line `error: ...` a script ended with: it failed with exit status 1, no traceback, and
    nothing else on stderr but warnings and progress bars."""
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith('WARNING')
             and 'Warning' not in l and 'warn(' not in l and '%|' not in l]
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0]


def fake_run(path, dataset_name, bits=(16,), seed=0):
    """A run folder as train.py leaves it, with random codes of 10 queries and 50 retrieval items in 4
    classes (codes.npz and result.json per code length)."""
    import json
    rng = np.random.default_rng(seed)
    for b in bits:
        d = path / f'{b}bits'
        d.mkdir(parents=True)
        y = np.eye(4, dtype=np.int8)[rng.integers(0, 4, 60)]
        np.savez(d / 'codes.npz', query_h=rng.normal(size=(10, b)), retrieval_h=rng.normal(size=(50, b)),
                 query_labels=y[:10], retrieval_labels=y[10:], topk=50)
        (d / 'result.json').write_text(json.dumps(dict(dataset=dataset_name, bits=b)))


VIEW_KEEP = 0.8  # correlation of a view's nuisance with the item's: augmentations remove only part of it
CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def feature_settings():
    """What dataset_extract.py records of the features of the 'folder' dataset by tiny-test/random, and what
    their readers check (cache.features_settings); their augmented views record the same."""
    return dict(cache.backbone_settings('tiny-test', 'random'), dataset='folder')


def noun_settings(selection=False):
    """What nouns_embed.py records of a tiny-test/random WordNet noun cache (or its METHOD_SET selection),
    and what its readers check (external.vocabulary_settings)."""
    import models
    nb = dict(clip_build=models.clip_build('tiny-test', 'random'), clip_model='tiny-test', clip_pretrained='random',
              vocab='wordnet', released=False)
    return dict(nb, n_k=METHOD_SET['n_k'], t1=METHOD_SET['t1'], t1_reading='distance') if selection else nb


def _write_features(cache_dir, x, y, n_classes):
    """The files dataset_extract.py leaves for the 'folder' dataset with backbone tiny-test/random: labels of
    the classes y, the split (10 query and 30 train a class), features x, class names. (labels, split, folder)."""
    import dataset
    labels = np.eye(n_classes, dtype=np.int8)[y]
    d = os.path.join(cache_dir, 'folder')
    cache.save_array(os.path.join(d, 'labels.npy'), labels, {}, 'test')
    split = dataset.make_split(labels, dict(query_per_class=10, train_per_class=30), 0)
    for name, idx in zip(('query', 'retrieval', 'train'), split):
        cache.save_array(os.path.join(d, 'split_s0', name + '.npy'), idx, {}, 'test')
    cache.save_array(os.path.join(d, 'tiny-test-random', 'images.npy'), x, feature_settings(), 'test')
    cache.save_text(os.path.join(d, 'classes.txt'), CLASS_NAMES[:n_classes])
    return labels, split, d


def write_feature_set(cache_dir, n_classes=8, per_class=60, dim=64, nuisance=1.0, seed=0, views=0):
    """A feature cache as dataset_extract.py leaves it (labels, split, images.npy of the 'folder'
    dataset with backbone tiny-test/random, classes.txt) whose classes live in 16 of `dim`
    dimensions and a nuisance of the given strength fills the rest: raw similarity only half knows
    the class. views: that many augmented views of each training item (train_aug_split_s0.npy,
    fp16), as an augmentation does: the class part kept, the nuisance partly drawn anew (VIEW_KEEP),
    fresh noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    x = np.zeros((len(y), dim), np.float32)
    x[:, :16] = rng.normal(0, 1, (n_classes, 16))[y]
    x[:, 16:] = nuisance * rng.normal(0, 1, (len(y), dim - 16)) * np.linspace(1.5, 0.5, dim - 16)
    x += rng.normal(0, 0.3, x.shape)
    labels, split, d = _write_features(cache_dir, x, y, n_classes)
    if views:
        train = split[2]
        v = np.repeat(x[train][:, None], views, 1)  # the item's nuisance, a part of it drawn anew per view
        fresh = nuisance * rng.normal(0, 1, v[:, :, 16:].shape) * np.linspace(1.5, 0.5, dim - 16)
        v[:, :, 16:] = VIEW_KEEP * v[:, :, 16:] + np.sqrt(1 - VIEW_KEEP ** 2) * fresh
        v += rng.normal(0, 0.3, v.shape)
        cache.save_array(os.path.join(d, 'tiny-test-random', 'train_aug_split_s0.npy'), v.astype(np.float16),
                         feature_settings(), 'test')
    return labels, split


# the method's generated set: its ingredients matter as in the paper's Tables 2-3
METHOD_SET = dict(n_k=16, t1=0.5)  # the noun selection the set is made for (train.py --n_k --t1)


def write_method_set(cache_dir, n_classes=8, per_class=60, dim=64, nuisance=25.0, nuisance_dims=4, keep=0.8, views=8,
                     synonyms=5, crowd=1000, seed=0):
    """A feature cache (images, views, split, labels) and a noun cache (noun_feats.npy, the selection
    t_com of nouns_embed.select_vocabulary) on which DUH-EG's ingredients matter:
    - an image is its class direction (length 1) plus a strong nuisance of its own (length `nuisance`
      in a few dimensions), so raw similarity barely sees the class: the class is partly visible;
    - its views keep `keep` of that nuisance and draw the rest anew (what an augmentation does);
    - the vocabulary carries the class: `synonyms` nouns near each class direction; and between each
      pair of classes a crowd of `crowd` near-duplicate nouns (a broader concept named many times).
    With every noun (EK), a crowd outweighs the class's few nouns in Eq. 5-6's softmax and merges
    two classes; the selection (EFC) keeps one noun of each crowd (Eq. 4) and the class nouns (Eq. 3).
    Returns (labels, split, vocabulary, selected rows)."""
    import nouns_embed
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    x = np.zeros((len(y), dim), np.float32)
    x[np.arange(len(y)), y] = 1.0
    nd = slice(n_classes, n_classes + nuisance_dims)
    x[:, nd] = nuisance * rng.normal(0, 1, (len(y), nuisance_dims)) / np.sqrt(nuisance_dims)
    x += 0.1 * rng.normal(0, 1, x.shape)
    labels, split, d = _write_features(cache_dir, x, y, n_classes)
    v = np.repeat(x[split[2]][:, None], views, 1)
    fresh = nuisance * rng.normal(0, 1, v[:, :, nd].shape) / np.sqrt(nuisance_dims)
    v[:, :, nd] = keep * v[:, :, nd] + np.sqrt(1 - keep ** 2) * fresh
    v += 0.1 * rng.normal(0, 1, v.shape)
    cache.save_array(os.path.join(d, 'tiny-test-random', 'train_aug_split_s0.npy'), v.astype(np.float16),
                     feature_settings(), 'test')
    eye = np.eye(dim)
    groups = [eye[k] + 0.02 * rng.normal(0, 1, (synonyms, dim)) for k in range(n_classes)]
    groups += [(eye[k] + eye[k + 1]) / np.sqrt(2) + 0.02 * rng.normal(0, 1, (crowd, dim))
               for k in range(0, n_classes, 2)]
    t = np.concatenate(groups).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    cache.save_array(os.path.join(cache.vocab_dir(cache_dir, 'wordnet', 'tiny-test', 'random'), 'noun_feats.npy'),
                     t, noun_settings(), 'test')
    rep, cen = nouns_embed.select_vocabulary(t, METHOD_SET['n_k'], METHOD_SET['t1'], 40, 1, 0, verbose=False)
    com = np.union1d(rep, cen)
    sdir = cache.selection_dir(cache_dir, 'wordnet', 'tiny-test', 'random', METHOD_SET['n_k'], METHOD_SET['t1'])
    cache.save_array(os.path.join(sdir, 'selected_feats.npy'), t[com], noun_settings(selection=True), 'test')
    return labels, split, t, com


TINY_MODEL = ['--backbone=tiny-test', '--backbone_pretrained=random', '--clip_model=tiny-test',
              '--clip_pretrained=random']


@pytest.fixture(scope='session')
def run(image_folder, tmp_path_factory):
    """A DUH-EG run (EXTERNAL imgk: no nouns needed) on the generated image set, 16 and 64 bits, extracted and
    trained through the command lines: (its temporary folder, the cache, the run folder)."""
    tmp = tmp_path_factory.mktemp('search')
    cache = str(tmp / 'cache')
    run_script('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}', *TINY_MODEL,
               '--num_workers=0', '--aug_views=2', f'--cache_dir={cache}')
    run_script('train.py', '--dataset=folder', *TINY_MODEL, '--external=imgk', '--bits=16,64', '--epochs=10',
               '--warmup=2', '--batch_size=100', f'--cache_dir={cache}', f'--run_dir={tmp}/run',
               f'--results={tmp}/r.jsonl')
    return tmp, cache, str(tmp / 'run')
