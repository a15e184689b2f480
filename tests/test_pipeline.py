"""The three scripts end to end through their command lines, as the README's offline quick start runs them
(the command line below the comment that says 'offline', run as written in a copy of the scripts, so its
cache/ and runs/ stay in a temporary folder): the generated 'demo' images with known classes, the tiny
random CLIP of the same open_clip code path, a sample of the real WordNet; then evaluation."""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cache
from conftest import ROOT, feature_settings, needs_wordnet, run_script, saved_map, write_feature_set

pytestmark = needs_wordnet  # nouns_embed.py reads WordNet 3.0
_MAP = r'(map@1000=[\d.]+ \(K cut to the 300 retrieval items\))'  # one MAP name in train.py and eval_hash.py


def chance_map(labels, query, retrieval):
    """MAP of a random ranking: for each query, the fraction of the retrieval set relevant to it."""
    rel = (labels[query] @ labels[retrieval].T) > 0
    return rel.mean(1).mean()


def readme_quick_start():
    """The command line directly below the first comment line of the README's first code block that says
    'offline'."""
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    block = text.split('```bash\n', 1)[1].split('```', 1)[0].splitlines()
    at = next(i for i, line in enumerate(block) if line.startswith('#') and 'offline' in line)
    return block[at + 1]


def shell(line, cwd, timeout=900):
    """A README command line through bash, its `python` this interpreter."""
    return subprocess.run(['bash', '-c', line.replace('python ', shlex.quote(sys.executable) + ' ')], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    """The README's quick start, run once in a copy of the scripts: (its folder, its cache, the run, the output)."""
    tmp = tmp_path_factory.mktemp('quickstart')
    for script in glob.glob(os.path.join(ROOT, '*.py')):
        shutil.copy(script, tmp)
    shutil.copytree(os.path.join(ROOT, 'methods'), tmp / 'methods')  # the other methods' files train.py imports
    proc = shell(readme_quick_start(), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, str(tmp / 'cache'), str(tmp / 'runs' / 'quickstart'), proc


def test_readme_quick_start_runs_offline_and_ends_with_its_map(pipeline):
    tmp, _, _, proc = pipeline
    line = readme_quick_start()
    assert not line.startswith('#') and '--vocab=wordnet:2000' in line and '--clip_pretrained=random' in line
    out = proc.stdout.strip().splitlines()
    trained = re.findall(r'^result dataset=demo method=duheg bits=(\d+) ' + _MAP, proc.stdout, re.M)
    rescored = re.findall(r'^eval bits=(\d+) ' + _MAP, proc.stdout, re.M)
    assert [b for b, _ in trained] == ['16', '32', '64'] and rescored == trained  # the same K, said to be cut
    assert out[-1].startswith('eval bits=64 map@1000=')  # it ends with its MAP line
    # quiet: no warning that is expected (random weights, read-only caches)
    assert 'WARNING' not in proc.stderr and 'not writable' not in proc.stderr, proc.stderr[-2000:]
    # the printed command builds the run's search index and serves it: here a words query instead of the page
    cmd = next(l for l in out if l.startswith('search page: ')).split(': ', 1)[1].split(' (then open', 1)[0]
    assert cmd.startswith('python search.py --run=runs/quickstart --bits=64 --images=dataset:demo') and \
        cmd.endswith(' --serve')
    search = shell(cmd.replace(' --serve', ' --words=stripes'), tmp, 300)
    assert search.returncode == 0 and 'images=300 bits=64' in search.stdout.splitlines()[-1], search.stderr[-2000:]


def test_readme_says_how_to_install_the_cpu_build():
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    assert 'pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu' in text


def test_each_step_hands_on_its_files(pipeline):
    tmp, cache, _, proc = pipeline
    d = os.path.join(cache, 'demo')
    for f in ('labels.npy', 'split_s0/train.npy', 'tiny-test-random/images.npy',
              'tiny-test-random/train_aug_split_s0.npy'):
        assert os.path.isfile(os.path.join(d, f)) and os.path.isfile(os.path.join(d, f + '.json')), f
    from cache import selection_dir, vocab_dir
    import nouns_embed
    vdir = vocab_dir(cache, 'wordnet:2000', 'tiny-test', 'random')
    assert vdir.endswith('wordnet-sample2000_tiny-test_random')  # the sample's caches, never the whole WordNet's
    sdir = selection_dir(cache, 'wordnet:2000', 'tiny-test', 'random', 800, 0.9, False)
    words = open(os.path.join(vdir, 'noun_words.txt')).read().split('\n')[:-1]
    assert words == nouns_embed.read_words('wordnet:2000', cache)[0]  # the seeded sample, de-duplicated features
    assert set(words) <= set(nouns_embed.read_words('wordnet', cache)[0])
    feats = np.load(os.path.join(sdir, 'selected_feats.npy'))
    selected = [l.split('\t') for l in open(os.path.join(sdir, 'selected_words.txt')).read().splitlines()]
    assert len(selected) == len(feats) > 0 and {k for _, k in selected} <= {'rep', 'cen'}
    counts = json.load(open(os.path.join(sdir, 'selection.json')))
    assert counts['read'] == 2000 and 'a sample of 2000 of its 117798 words (seed 0)' in counts['vocab_source']
    last = next(l for l in proc.stdout.splitlines() if l.startswith('nouns vocab='))
    assert last.startswith('nouns vocab=wordnet-sample2000 read=2000'), last
    for bits in (16, 32, 64):
        run = os.path.join(tmp, 'runs', 'quickstart', f'{bits}bits')
        for f in ('heads.pt', 'codes.npz', 'result.json'):
            assert os.path.isfile(os.path.join(run, f)), f
        codes = np.load(os.path.join(run, 'codes.npz'))
        assert codes['query_h'].shape == (100, bits) and codes['retrieval_h'].shape == (300, bits)
    lines = [json.loads(l) for l in open(os.path.join(tmp, 'runs', 'results.jsonl'))]
    assert [l['bits'] for l in lines] == [16, 32, 64] and lines[0]['config']['VOCAB'] == 'wordnet:2000'


def test_map_clearly_above_chance(pipeline):
    tmp, cache, rundir, proc = pipeline
    d = os.path.join(cache, 'demo')
    labels = np.load(os.path.join(d, 'labels.npy'))
    query, retrieval = (np.load(os.path.join(d, 'split_s0', f'{p}.npy')) for p in ('query', 'retrieval'))
    chance = chance_map(labels, query, retrieval)
    assert chance == pytest.approx(0.1)
    found = re.findall(r'^result dataset=demo method=duheg bits=(\d+) map@1000=([\d.]+)', proc.stdout, re.M)
    assert [b for b, _ in found] == ['16', '32', '64']
    for bits, m in found:  # the printed MAP is the saved codes' MAP, and far above chance
        assert float(m) == pytest.approx(saved_map(os.path.join(rundir, f'{bits}bits')), abs=5e-5)
        assert float(m) > chance + 0.3, (bits, m, chance)


def test_heads_give_the_saved_codes_again(pipeline):
    """The saved heads reproduce the saved codes without retraining."""
    import torch

    from models import HashHead
    tmp, cache, rundir, _ = pipeline
    run = os.path.join(rundir, '64bits')
    ckpt = torch.load(os.path.join(run, 'heads.pt'), weights_only=False)
    hv = HashHead(ckpt['in_dim'], ckpt['bits'])
    hv.load_state_dict(ckpt['hv'])
    hv.eval()
    feats = np.load(os.path.join(cache, 'demo', 'tiny-test-random', 'images.npy'))
    codes = np.load(os.path.join(run, 'codes.npz'))
    with torch.no_grad():
        h = hv(torch.as_tensor(feats[codes['query_index']])).numpy()
    np.testing.assert_allclose(h, codes['query_h'], atol=1e-5)


def test_same_seed_same_codes(pipeline):
    """A rerun with the same seed gives the same codes and MAP on the CPU."""
    tmp, cache, rundir, first = pipeline
    train = next(c for c in readme_quick_start().split(' && ') if c.startswith('python train.py'))
    again = shell(train.replace('--run_dir=runs/quickstart', '--run_dir=runs/again') + ' --bits=16 '
                  '--results=runs/again.jsonl', tmp)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = (np.load(os.path.join(tmp, 'runs', r, '16bits', 'codes.npz')) for r in ('quickstart', 'again'))
    assert np.array_equal(a['query_h'], b['query_h']) and np.array_equal(a['retrieval_h'], b['retrieval_h'])
    m = [re.search(r'bits=16 map@1000=([\d.]+)', p.stdout).group(1) for p in (first, again)]
    assert m[0] == m[1]


def test_eval_hash_rescored_the_run_and_drew_figures_6_7(pipeline):
    """The quick start's eval_hash.py: the MAP train.py printed, from the saved codes, and Figures 6-7 from the
    generated images (where dataset_extract.py recorded it read them)."""
    tmp, cache, rundir, proc = pipeline
    trained = dict(re.findall(r'^result .* bits=(\d+) map@1000=([\d.]+)', proc.stdout, re.M))
    rescored = dict(re.findall(r'^eval bits=(\d+) map@\d+=([\d.]+)', proc.stdout, re.M))
    assert rescored == trained and len(trained) == 3
    metrics = json.load(open(os.path.join(rundir, 'metrics.json')))
    assert set(metrics['bits']) == {'16', '32', '64'}
    assert len(metrics['bits']['64']['p_at_n']['n']) >= 10  # the P@N curve has ten points on 300 items
    from PIL import Image
    for name in ('pr_curve.png', 'p_at_n.png', 'top10_query0.png', 'top10_query1.png', 'nouns_query0.png',
                 'nouns_query1.png'):
        with Image.open(os.path.join(rundir, name)) as im:
            assert im.size[0] > 300 and im.size[1] > 100, name


@pytest.mark.parametrize('args, message', [
    (['--bits=0'], '--bits=0: 0 is outside [1, 1024]'),
    (['--bits=16,2048'], '--bits=16,2048: 2048 is outside [1, 1024]'),
    (['--batch_size=1'], '--batch_size=1: 1 is outside [2, inf)'),
    (['--dataset=imagenet'], "--dataset='imagenet': choose one of cifar10, nuswide, flickr25k, mscoco, folder"),
    (['--method=foo'], "--method='foo': choose one of duheg, ssdh, cibhash, dhn, dch, dqn, dvsq, dtq, lsh, itq"),
    (['--external=none', '--aug=false'], 'IMGAUG'),
    (['--bits=16,x'], "--bits='16,x': 'x' is not an integer"),
    (['--epoch=3'], 'unknown setting --epoch;'),
])
def test_train_rejects_bad_settings(args, message, tmp_path):
    proc = run_script('train.py', f'--cache_dir={tmp_path}', *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-800:]


def test_train_names_missing_and_mismatched_caches(tmp_path):
    proc = run_script('train.py', '--dataset=folder', f'--cache_dir={tmp_path}', '--method=lsh', check=False)
    assert proc.returncode != 0 and 'labels.npy does not exist: run dataset_extract.py' in proc.stderr
    write_feature_set(str(tmp_path))
    path = os.path.join(tmp_path, 'folder', 'tiny-test-random', 'images.npy')
    cache.save_array(path, np.zeros((5, 64), np.float32), feature_settings(), 'test')  # rows do not match the labels
    proc = run_script('train.py', '--dataset=folder', f'--cache_dir={tmp_path}', '--backbone=tiny-test',
                      '--backbone_pretrained=random', '--method=lsh', '--bits=8', check=False)
    assert proc.returncode != 0 and 'has 5 rows but' in proc.stderr, proc.stderr[-800:]
