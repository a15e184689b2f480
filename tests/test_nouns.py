"""nouns_embed.py: Eq. 2-4 of Section 3.2, the cut text encoding, WordNet, and the script end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cache  # noqa: E402
import external  # noqa: E402
import nouns_embed as ne  # noqa: E402
from cache import CacheError  # noqa: E402
from conftest import needs_wordnet  # noqa: E402
from models import load_clip  # noqa: E402


def circle(deg):
    a = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


@pytest.fixture(scope='module')
def tiny():
    model, _, tokenizer = load_clip('tiny-test', 'random', 'cpu')
    return model, tokenizer


# -----------------------------------------------------------------------------
# Eq. 3-4
def test_selection_fixed_centres():
    # centres at 0, 150 and 240 degrees; points (index: angle, nearest centre, dis = 2 - 2cos, p of that centre):
    # 0: 0 c0 0 .7258 | 1: 20 c0 .121 .7209 | 2: -20 c0 .121 .6782 | 3: 70 c0 1.316 (rep) .4739
    # 4: 150 c1 0 .6568 | 5: 165 c1 .068 .6105 | 6: 135 c1 .068 .6750 | 7: 297 c2 .911 (rep) .4621
    centres = circle([0, 150, 240])
    t = circle([0, 20, -20, 70, 150, 165, 135, 297])
    assign = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    rep, cen = ne.select_from_clusters(t, centres, assign, t1=0.9)
    assert rep.tolist() == [3, 7]
    # c1's centre noun is 135 degrees, not the point on the centre (150): p_{w,k} also weighs the other
    # centres; c2's only noun is representative, so c2 has no centre noun
    assert cen.tolist() == [0, 6]
    # released: Eq. 4 over all nouns, each centre the normalised mean of its members: c0 moves to 16.26
    # degrees (members 0, 20, -20, 70), c1 stays at 150, c2 at 297. p of c0 for noun 1 (20 degrees):
    # e^.9979 / (e^.9979 + e^cos130 + e^cos277) = .621, above noun 0's .567 and noun 2's .477
    rep, cen = ne.select_from_clusters(t, centres, assign, t1=0.9, released=True)
    assert rep.tolist() == [3, 7] and cen.tolist() == [1, 4, 7]
    rep, cen = ne.select_from_clusters(t, centres, assign, t1=1.5)
    assert rep.tolist() == [] and cen.tolist() == [0, 6, 7]
    rep, cen = ne.select_from_clusters(t, centres, assign, t1=0.1)  # dis .121 > .1: 1 and 2 join t_rep
    assert rep.tolist() == [1, 2, 3, 7] and cen.tolist() == [0, 6]


def test_select_vocabulary_with_kmeans():
    # two symmetric clusters, so K-means centres are exactly 0 and 180 degrees
    deg = [0, 10, -10, 20, -20, 75, -75,           # 0-6: around 0; +-75 are far (dis 1.48)
           180, 170, 190, 160, 200, 145, 215]      # 7-13: around 180; +-35 stay normal (dis .36)
    rep, cen = ne.select_vocabulary(circle(deg), n_k=2, t1=0.9, iters=20, restarts=2, seed=0, verbose=False)
    assert rep.tolist() == [5, 6]
    assert cen.tolist() == [0, 7]
    rep, cen = ne.select_vocabulary(circle(deg), n_k=2, t1=0.9, iters=20, restarts=2, seed=0, released=True,
                                    verbose=False)
    assert rep.tolist() == [5, 6] and cen.tolist() == [0, 7]
    with pytest.raises(ValueError, match='N_K=2, T1=3'):  # released keeps t_rep only, and none is that far
        ne.select_vocabulary(circle(deg), n_k=2, t1=3.0, iters=20, restarts=1, seed=0, released=True, verbose=False)


# -----------------------------------------------------------------------------
# spherical K-means
def planted(n_per=60, k=5, d=16, seed=0):
    g = np.random.default_rng(seed)
    c = g.normal(size=(k, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    label = np.repeat(np.arange(k), n_per)
    x = c[label] + 0.15 * g.normal(size=(len(label), d)) / np.sqrt(d)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    perm = g.permutation(len(x))
    return x[perm], label[perm], c


@pytest.mark.parametrize('init', ['k-means++', 'random'])
def test_kmeans_recovers_planted_clusters(init):
    x, label, c = planted()
    centres, assign = ne.spherical_kmeans(x, 5, iters=50, restarts=3, seed=1, tol=0, init=init, verbose=False)
    assert centres.shape == (5, 16) and assign.shape == (300,)
    assert np.allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    # the same partition: every planted cluster maps to exactly one found cluster
    pairs = set(zip(label.tolist(), assign.tolist()))
    assert len(pairs) == 5 and len({a for _, a in pairs}) == 5
    # each found centre sits on a planted one
    assert (centres @ c.T).max(1).min() > 0.99
    # assign is the nearest centre by cosine
    assert (assign == (x @ centres.T).argmax(1)).all()


def test_kmeans_deterministic_and_seeded():
    x, _, _ = planted(n_per=40, k=8, d=8, seed=3)
    a1 = ne.spherical_kmeans(x, 6, 30, 2, seed=5, tol=0, verbose=False)
    a2 = ne.spherical_kmeans(x, 6, 30, 2, seed=5, tol=0, verbose=False)
    assert np.array_equal(a1[0], a2[0]) and np.array_equal(a1[1], a2[1])
    b = ne.spherical_kmeans(x, 6, 30, 2, seed=6, tol=0, verbose=False)
    assert not np.array_equal(a1[0], b[0])


def test_kmeans_empty_clusters_and_bad_k():
    x = circle([0, 0, 0, 90, 90, 180])  # 3 distinct points, 5 clusters: some must stay empty
    centres, assign = ne.spherical_kmeans(x, 5, 10, 1, 0, tol=0, verbose=False)
    assert np.isfinite(centres).all() and np.allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    assert (np.einsum('ij,ij->i', x, centres[assign]) > 1 - 1e-6).all()  # every point on its centre
    with pytest.raises(ValueError, match='N_K'):
        ne.spherical_kmeans(x, 7, 10, 1, 0, verbose=False)


# -----------------------------------------------------------------------------
# duplicates, Eq. 2, the cut encoding
def test_drop_duplicates_keeps_first():
    a, b, c = np.eye(3, dtype=np.float32)
    t = np.stack([a, b, a, c, b, a + np.float32(1e-7)])
    assert ne.drop_duplicates(t).tolist() == [0, 1, 3, 5]  # exact equality only


def test_prompt_tokens_match_tokenizer(tiny):
    _, tok = tiny
    words = ['dog', 'ice cream', "rock 'n' roll", "rock'n'roll", 'a.d.', "o'", 'c++', 'AT&T', '&amp', 'x_', '_x',
             'café', 'ångström', "st. john's", 'a  b', '3d', '1000', 'e-mail', "'hood", 'u.s.a', 'x' * 400,
             'cat_s_foot', 'Afghan hound']
    prompts = ne.PROMPTS + ('{}', '{} and more', "{}'s photo", 'x{}y')  # 'x{}y' cannot reuse its template's tokens
    got = ne._prompt_tokens(words, prompts, tok)
    ref = tok([p.format(w) for w in words for p in prompts])
    assert [r[r != 0].tolist() for r in ref] == got


def test_embed_words_is_eq2(tiny):
    model, tok = tiny
    words = ['dog', 'ice_cream', 'cat', "cat's_foot", 'a.d.', 'rock_and_roll', 'x' * 200]
    for keep in (False, True):
        t_w = ne.embed_words(words, model, tok, batch_size=5, keep_underscores=keep)
        texts = ne.prompt_texts(words, ne.PROMPTS, keep)
        assert ('a photo of the large ice cream.' in texts) != keep
        with torch.no_grad():
            f = F.normalize(model.encode_text(tok(texts)).float(), dim=-1)  # 77-token padded, one by one
        ref = F.normalize(f.view(len(words), len(ne.PROMPTS), -1).mean(1), dim=-1).numpy()
        assert t_w.shape == ref.shape and np.abs(t_w - ref).max() < 1e-5
    assert np.allclose(np.linalg.norm(t_w, axis=1), 1, atol=1e-6)


@pytest.mark.parametrize('name,n_words', [('tiny-test', 45), ('ViT-B-16', 14)])
def test_cut_equals_padded(name, n_words):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    model, _, tok = load_clip(name, 'random', 'cpu')
    texts = ne.prompt_texts(list(IMAGENET_CLASSNAMES[::997 // n_words][:n_words]) + ['x' * 300], ne.PROMPTS)
    # each prompt as its own 'word' with the template '{}': embed_words gives its normalised feature
    cut = ne.embed_words(texts, model, tok, batch_size=64, prompts=('{}',))
    with torch.no_grad():
        padded = torch.cat([model.encode_text(tok(texts[i:i + 64])) for i in range(0, len(texts), 64)])
    padded = F.normalize(padded.float(), dim=-1).numpy()
    assert len(texts) >= 100 and np.abs(cut - padded).max() < 1e-4


# -----------------------------------------------------------------------------
# WordNet
@needs_wordnet
def test_wordnet_nouns(tmp_path):
    words, tag, source = ne.read_words('wordnet', str(tmp_path))
    assert tag == 'wordnet' and 'WordNet 3.0' in source
    assert len(words) == 117798 and len(set(words)) == len(words) and words == sorted(words)
    assert all(w == w.lower() for w in words)
    assert {'dog', 'ice_cream', "rock_'n'_roll", "rock'n'roll"} <= set(words)
    assert ne.read_words('wordnet', str(tmp_path))[0] == words  # the cached copy is reused


def test_a_vocabulary_sample_is_seeded_and_keyed_apart(tmp_path, monkeypatch):
    """'<vocab>:<n>': always the same n words, in the vocabulary's order, with caches of their own (folder,
    external features, sidecar), so a sample is never taken for the whole vocabulary; train.py and
    reproduce.py pass it on as it is written."""
    words, tag, source = ne.read_words('imagenet:50')
    assert tag == 'imagenet-sample50' and source.endswith('a sample of 50 of its 998 words (seed 0)')
    every = ne.read_words('imagenet')[0]
    pos = [every.index(w) for w in words]
    assert len(set(words)) == 50 and pos == sorted(pos) and ne.read_words('imagenet:50')[0] == words
    assert ne.read_words('imagenet:60')[0] != words[:50]
    for vocab, want in (('wordnet:2000', 'wordnet-sample2000'), ('words/glove.txt:500', 'file-glove-sample500'),
                        ('wordnet', 'wordnet')):
        assert cache.vocab_tag(vocab) == want
        assert os.path.basename(cache.vocab_dir('c', vocab, 'tiny-test', 'random')) == f'{want}_tiny-test_random'
    assert cache.external_path('f', 'efc', 'wordnet:2000', 800, 0.9, 'distance', 0.004, False, 'split_s0') != \
        cache.external_path('f', 'efc', 'wordnet', 800, 0.9, 'distance', 0.004, False, 'split_s0')
    odd = tmp_path / 'list:3'  # a word-list file whose name ends in :<digits> is that file
    odd.write_text('cat\ndog\n')
    assert cache.vocab_sample(str(odd)) == (str(odd), None) and ne.read_words(str(odd))[0] == ['cat', 'dog']
    with pytest.raises(SystemExit, match=r"--vocab=imagenet:5000: a sample of 5000 words of .*, which holds 998; "
                                         r"choose 1 to 998, or --vocab=imagenet for all of them"):
        ne.read_words('imagenet:5000')
    import reproduce
    monkeypatch.setattr(reproduce, 'VOCAB', 'wordnet:2000')
    cell = reproduce.cell_settings(reproduce.Row('x', 'x', None, {}), 'cifar10', 0, {})
    assert cell['VOCAB'] == 'wordnet:2000'


# -----------------------------------------------------------------------------
# the script end to end
def run(*args, ok=True):
    r = subprocess.run([sys.executable, 'nouns_embed.py', '--clip_model=tiny-test', '--clip_pretrained=random',
                        '--threads=1', *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return r.stdout + r.stderr


def result(out):
    line = [l for l in out.splitlines() if l.startswith('nouns vocab=')][-1]
    return dict(kv.split('=', 1) for kv in line.split()[1:])


def vocab_cfg(tmp_path, external, vocab='imagenet'):
    """The settings of a run whose external feature reads the vocabulary nouns_embed.py left in tmp_path."""
    return dict(CACHE_DIR=str(tmp_path), VOCAB=vocab, CLIP_MODEL='tiny-test', CLIP_PRETRAINED='random', N_K=40,
                T1=0.9, T1_READING='distance', RELEASED=False, EXTERNAL=external)


def test_script_imagenet_reuse_stale(tmp_path):
    cache_arg = f'--cache_dir={tmp_path}'
    out = run(cache_arg, '--vocab=imagenet', '--n_k=40')
    res = result(out)
    assert res['vocab'] == 'imagenet' and int(res['read']) == 998
    assert int(res['t_com']) == int(res['t_rep']) + int(res['t_cen']) and int(res['t_cen']) <= 40
    vdir = cache.vocab_dir(str(tmp_path), 'imagenet', 'tiny-test', 'random')
    sdir = cache.selection_dir(str(tmp_path), 'imagenet', 'tiny-test', 'random', 40, 0.9)
    assert vdir.endswith('nouns/imagenet_tiny-test_random') and sdir == os.path.join(vdir, 'select_k40_t0.9')
    t, words = external.run_vocabulary(vocab_cfg(tmp_path, 'ek'), words=True)
    assert t.dtype == np.float32 and len(t) == len(words) == int(res['unique'])
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    sel, sel_words = external.run_vocabulary(vocab_cfg(tmp_path, 'efc'), words=True)
    tags = [line.split('\t')[1] for line in external.read_word_lines(os.path.join(sdir, 'selected_words.txt'))]
    assert len(sel) == len(sel_words) == int(res['t_com']) and set(tags) <= {'rep', 'cen'}
    assert np.array_equal(sel, t[[words.index(w) for w in sel_words]])
    summary = json.load(open(os.path.join(sdir, 'selection.json')))
    assert summary['t_com'] == int(res['t_com']) and summary['read'] == 998 and summary['duplicates'] == 0
    assert set(summary['seconds']) == {'embedding', 'clustering', 'selection', 'total'}
    from models import hardware  # Table 4's time says where it was measured: here, every step on the CPU
    assert summary['hardware'] == hardware('cpu') and summary['hardware'].endswith('CPU threads), no GPU used')

    out = run(cache_arg, '--vocab=imagenet', '--n_k=40')  # everything reused
    assert out.count('reusing') == 3 and result(out) == dict(res, seconds=result(out)['seconds'])
    out = run(cache_arg, '--vocab=imagenet', '--n_k=40', '--t1=0.5')  # a T1 sweep does not recluster
    assert 'reusing' in out and 'kmeans_k40' in out and 'select_k40_t0.5' in out

    out = run(cache_arg, '--vocab=imagenet', '--n_k=40', '--prompts=a photo of a {}.', ok=False)  # same path
    assert 'stale' in out and 'prompts' in out and '--force' in out
    out = run(cache_arg, '--vocab=imagenet', '--n_k=40', '--prompts=a photo of a {}.', '--force')
    assert 'reusing' not in out
    assert external.run_vocabulary(vocab_cfg(tmp_path, 'ek'), words=True)[0].shape == t.shape

    # a selection whose word list was changed (or half written) is not trusted
    with open(os.path.join(sdir, 'selected_words.txt'), 'a') as f:
        f.write('extra\trep\n')
    with pytest.raises(CacheError, match='--force'):
        external.run_vocabulary(vocab_cfg(tmp_path, 'efc'), words=True)

    out = run(cache_arg, '--vocab=imagenet', '--n_kk=3', ok=False)
    assert 'unknown setting --n_kk' in out


def test_script_word_list_files(tmp_path):
    words = tmp_path / 'my_words.txt'
    words.write_text('dog\n\ncat\n  ice_cream \ndog\nhot dog\nhot_dog\n' + ''.join(f'thing{i}\n' for i in range(30)))
    out = run(f'--cache_dir={tmp_path}', f'--vocab={words}', '--n_k=5')
    res = result(out)
    # dog twice counts once; 'hot_dog' reads as 'hot dog', so their features are equal and one is dropped
    assert res['vocab'] == 'file-my_words' and res['read'] == '35' and res['unique'] == '34'
    kept = external.run_vocabulary(vocab_cfg(tmp_path, 'ek', str(words)), words=True)[1]
    assert kept[:4] == ['dog', 'cat', 'ice_cream', 'hot dog'] and 'hot_dog' not in kept
    # a run killed while writing the features leaves no sidecar: the next run rebuilds them, bit for bit
    vdir = cache.vocab_dir(str(tmp_path), str(words), 'tiny-test', 'random')
    os.remove(os.path.join(vdir, 'noun_feats.npy.json'))
    out = run(f'--cache_dir={tmp_path}', f'--vocab={words}', '--n_k=5')
    assert 'reusing' in out and 'noun_feats.npy' not in out and result(out)['t_com'] == res['t_com']
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n  \n')
    out = run(f'--cache_dir={tmp_path}', f'--vocab={empty}', ok=False)
    assert str(empty) in out and 'no words' in out
    out = run(f'--cache_dir={tmp_path}', f'--vocab={tmp_path}/missing.txt', ok=False)
    assert 'missing.txt' in out
