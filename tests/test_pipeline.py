"""The three scripts end to end through their command lines, on a generated image set with
known classes, the tiny random CLIP of the same open_clip code path, and the real WordNet."""
import json
import os
import re

import numpy as np
import pytest

import cache
from conftest import feature_settings, needs_wordnet, run_script, saved_map, write_feature_set

TINY = ['--clip_model=tiny-test', '--clip_pretrained=random']
pytestmark = needs_wordnet  # nouns_embed.py reads the whole of WordNet 3.0


def chance_map(labels, query, retrieval):
    """MAP of a random ranking: for each query, the fraction of the retrieval set relevant to it."""
    rel = (labels[query] @ labels[retrieval].T) > 0
    return rel.mean(1).mean()


@pytest.fixture(scope='module')
def pipeline(image_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('pipeline')
    cache = str(tmp / 'cache')
    extract = run_script('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}',
                         '--backbone=tiny-test', '--backbone_pretrained=random', *TINY, f'--cache_dir={cache}',
                         '--num_workers=0')
    nouns = run_script('nouns_embed.py', *TINY, f'--cache_dir={cache}', '--threads=1')  # the whole of WordNet 3.0
    train = run_script('train.py', '--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', *TINY,
                       f'--cache_dir={cache}', '--bits=16,64', '--epochs=20', '--warmup=3', '--batch_size=100',
                       f'--results={tmp}/results.jsonl', f'--run_dir={tmp}/run')
    return tmp, cache, extract, nouns, train


def test_each_step_hands_on_its_files(pipeline):
    tmp, cache, extract, nouns, train = pipeline
    d = os.path.join(cache, 'folder')
    for f in ('labels.npy', 'split_s0/train.npy', 'tiny-test-random/images.npy',
              'tiny-test-random/train_aug_split_s0.npy'):
        assert os.path.isfile(os.path.join(d, f)) and os.path.isfile(os.path.join(d, f + '.json')), f
    from cache import selection_dir, vocab_dir
    vdir = vocab_dir(cache, 'wordnet', 'tiny-test', 'random')
    sdir = selection_dir(cache, 'wordnet', 'tiny-test', 'random', 800, 0.9, False)
    words = open(os.path.join(vdir, 'noun_words.txt')).read().split('\n')
    assert 'dog' in words and 'tabby cat' not in words  # real WordNet nouns, de-duplicated features
    feats = np.load(os.path.join(sdir, 'selected_feats.npy'))
    selected = [l.split('\t') for l in open(os.path.join(sdir, 'selected_words.txt')).read().splitlines()]
    assert len(selected) == len(feats) > 0 and {k for _, k in selected} <= {'rep', 'cen'}
    counts = json.load(open(os.path.join(sdir, 'selection.json')))
    assert counts['read'] == 117798  # distinct lower-case noun lemmas of WordNet 3.0
    last = nouns.stdout.strip().splitlines()[-1]
    assert last.startswith('nouns vocab=wordnet read=117798'), last
    for bits in (16, 64):
        run = os.path.join(tmp, 'run', f'{bits}bits')
        for f in ('heads.pt', 'codes.npz', 'result.json'):
            assert os.path.isfile(os.path.join(run, f)), f
        codes = np.load(os.path.join(run, 'codes.npz'))
        assert codes['query_h'].shape == (100, bits) and codes['retrieval_h'].shape == (300, bits)
    lines = [json.loads(l) for l in open(os.path.join(tmp, 'results.jsonl'))]
    assert [l['bits'] for l in lines] == [16, 64] and lines[0]['config']['EPOCHS'] == 20


def test_map_clearly_above_chance(pipeline, image_folder):
    tmp, cache, _, _, train = pipeline
    d = os.path.join(cache, 'folder')
    labels = np.load(os.path.join(d, 'labels.npy'))
    query, retrieval = (np.load(os.path.join(d, 'split_s0', f'{p}.npy')) for p in ('query', 'retrieval'))
    chance = chance_map(labels, query, retrieval)
    assert chance == pytest.approx(0.1)
    found = re.findall(r'^result dataset=folder method=duheg bits=(\d+) map@1000=([\d.]+)', train.stdout, re.M)
    assert [b for b, _ in found] == ['16', '64']
    for bits, m in found:  # the printed MAP is the saved codes' MAP, and far above chance
        assert float(m) == pytest.approx(saved_map(os.path.join(tmp, 'run', f'{bits}bits')), abs=5e-5)
        assert float(m) > chance + 0.3, (bits, m, chance)


def test_heads_give_the_saved_codes_again(pipeline):
    """The saved heads reproduce the saved codes without retraining."""
    import torch

    from models import HashHead
    tmp, cache, _, _, _ = pipeline
    run = os.path.join(tmp, 'run', '64bits')
    ckpt = torch.load(os.path.join(run, 'heads.pt'), weights_only=False)
    hv = HashHead(ckpt['in_dim'], ckpt['bits'])
    hv.load_state_dict(ckpt['hv'])
    hv.eval()
    feats = np.load(os.path.join(cache, 'folder', 'tiny-test-random', 'images.npy'))
    codes = np.load(os.path.join(run, 'codes.npz'))
    with torch.no_grad():
        h = hv(torch.as_tensor(feats[codes['query_index']])).numpy()
    np.testing.assert_allclose(h, codes['query_h'], atol=1e-5)


def test_same_seed_same_codes(pipeline):
    """A rerun with the same seed gives the same codes and MAP on the CPU."""
    tmp, cache, _, _, first = pipeline
    again = run_script('train.py', '--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', *TINY,
                       f'--cache_dir={cache}', '--bits=16', '--epochs=20', '--warmup=3', '--batch_size=100',
                       f'--results={tmp}/results2.jsonl', f'--run_dir={tmp}/run2')
    a, b = (np.load(os.path.join(tmp, r, '16bits', 'codes.npz')) for r in ('run', 'run2'))
    assert np.array_equal(a['query_h'], b['query_h']) and np.array_equal(a['retrieval_h'], b['retrieval_h'])
    m = [re.search(r'bits=16 map@1000=([\d.]+)', p.stdout).group(1) for p in (first, again)]
    assert m[0] == m[1]


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


def test_eval_hash_rescores_the_run_and_draws_figures_6_7(pipeline, image_folder):
    tmp, cache, _, _, train = pipeline
    run = os.path.join(tmp, 'run')
    proc = run_script('eval_hash.py', f'--run={run}', f'--data_path={image_folder}', '--examples=2')
    trained = dict(re.findall(r'bits=(\d+) map@1000=([\d.]+)', train.stdout))
    rescored = dict(re.findall(r'^eval bits=(\d+) map@\d+=([\d.]+)', proc.stdout, re.M))
    assert rescored == trained  # the same binary MAP from the saved codes (K capped at the 300 retrieval items)
    metrics = json.load(open(os.path.join(run, 'metrics.json')))
    assert set(metrics['bits']) == {'16', '64'}
    from PIL import Image
    for name in ('pr_curve.png', 'p_at_n.png', 'top10_query0.png', 'top10_query1.png', 'nouns_query0.png',
                 'nouns_query1.png'):
        with Image.open(os.path.join(run, name)) as im:
            assert im.size[0] > 300 and im.size[1] > 100, name
