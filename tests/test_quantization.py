"""The quantization baselines (DQN, DVSQ, DTQ) and CIBHash: each loss on a hand-worked 3-item case,
product quantization, and the asymmetric-quantizer-distance ranking and MAP against a brute-force
computation with ties."""
import math
import os
import re

import numpy as np
import pytest
import torch

import eval_hash
from conftest import needs_numba, run_script, write_feature_set
from methods import cibhash, pq


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: tiny tensors run on one thread


# -----------------------------------------------------------------------------
# losses, by hand
def test_dqn_loss_three_items():
    # cos(z0, z1) = 0, cos(z0, z2) = cos(z1, z2) = 1/sqrt(2); 0 and 2 similar (s = +1), the rest -1:
    # (0,1): (-1 - 0)^2 = 1; (0,2): (1 - 0.70711)^2 = 0.08579; (1,2): (-1 - 0.70711)^2 = 2.91421;
    # mean over the 6 ordered pairs i != j = 2 * 4 / 6 = 4/3
    z = torch.tensor([[1., 0.], [0., 1.], [1., 1.]])
    s = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.int8)
    assert pq.dqn_loss(z, s).item() == pytest.approx(4 / 3, abs=1e-6)
    assert pq.dqn_loss(5 * z, s).item() == pytest.approx(4 / 3, abs=1e-6)  # cosine: scale-free


def test_dvsq_loss_three_items():
    # word vectors v0 = (1, 0), v1 = (0, 1), v2 = (-1, 0): margins delta = 1 - cos: d01 = d12 = 1, d02 = 2.
    # z0 = (3, 4), label {0}: cos = (0.6, 0.8, -0.6); j = 1: 1 - 0.6 + 0.8 = 1.2; j = 2: 2 - 0.6 - 0.6 = 0.8
    # z1 = (0, 1), label {1}: cos = (0, 1, 0); j = 0: 1 - 1 + 0 = 0; j = 2: 1 - 1 + 0 = 0
    # z2 = (-4, 3), labels {1, 2}: cos = (-0.8, 0.6, 0.8); only j = 0: y = 1: 1 - 0.6 - 0.8 < 0 -> 0;
    #    y = 2: 2 - 0.8 - 0.8 = 0.4
    # sum 2.4, over C x (item, label) pairs = 3 x 4 = 12 -> 0.2
    z = torch.tensor([[3., 4.], [0., 1.], [-4., 3.]])
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]], np.int8)
    v = np.array([[1., 0.], [0., 1.], [-1., 0.]])
    assert pq.dvsq_loss(z, y, v).item() == pytest.approx(0.2, abs=1e-6)
    # quantization loss through the word vectors: error e = z - q; mean_i ||V e_i||^2
    q = torch.tensor([[3., 3.], [0., 1.], [-2., 3.]])  # errors (0, 1), (0, 0), (-2, 0): ||V e||^2 = 1, 0, 8
    assert pq.dvsq_quant_loss(z, q, v).item() == pytest.approx(3.0, abs=1e-6)
    assert pq.pq_loss(z, q).item() == pytest.approx((1 + 0 + 4) / 3, abs=1e-6)


def test_dtq_triplets_and_loss_three_items():
    # z0 = (0, 0), z1 = (1, 0) of one class, z2 = (2, 0) of another: squared distances d01 = 1, d02 = 4, d12 = 1.
    # anchor-positive pairs (0, 1) and (1, 0); the only negative is 2, kept when d(a, 2) < d(a, p) + margin
    z = torch.tensor([[0., 0.], [1., 0.], [2., 0.]])
    s = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], np.int8)
    g = torch.Generator().manual_seed(0)
    # margin 2: (0, 1, 2) has 4 >= 1 + 2 and is dropped; (1, 0, 2): 1 < 3, loss 1 - 1 + 2 = 2
    a, p, n = pq.dtq_triplets(z, s, 2.0, g)
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == [(1, 0, 2)]
    assert pq.dtq_loss(z, s, 2.0, g).item() == pytest.approx(2.0)
    # margin 4: both; losses 1 - 4 + 4 = 1 and 1 - 1 + 4 = 4, mean 2.5
    assert pq.dtq_loss(z, s, 4.0, g).item() == pytest.approx(2.5)
    # margin 0: no triplet has a loss; the loss is 0 and still has a gradient
    zz = z.clone().requires_grad_()
    loss = pq.dtq_loss(zz, s, 0.0, g)
    loss.backward()
    assert loss.item() == 0 and zz.grad is not None


def test_dtq_negatives_are_drawn_among_the_hard_ones():
    # anchor 0 at the origin, positive 1 at distance^2 1; negatives 2..5 at distance^2 1.5, 2, 3, 10. With
    # margin 1.5, the hard negatives are those below 2.5: 2 and 3; each is drawn, 4 and 5 never
    z = torch.tensor([[0.], [1.], [1.5 ** .5], [2 ** .5], [3 ** .5], [10 ** .5]])
    y = np.array([0, 0, 1, 1, 1, 1])
    s = (y[:, None] == y[None]).astype(np.int8)
    g = torch.Generator().manual_seed(0)
    drawn = []
    for _ in range(200):
        a, p, n = pq.dtq_triplets(z, s, 1.5, g)
        drawn += [ni for ai, ni in zip(a.tolist(), n.tolist()) if ai == 0]
    assert set(drawn) == {2, 3}
    assert 60 < drawn.count(2) < 140  # uniform among the two


def nt_xent_by_hand(tau):
    """Codes (1, 1), (-1, 1), (1, -1) in both views: cosines 1 to its other view, 0 between the first
    and the others, -1 between the last two. Code 0's candidates: 1 positive, four at 0; codes 1, 2:
    1 positive, two at 0, two at -1."""
    e = math.exp
    l0 = -math.log(e(1 / tau) / (e(1 / tau) + 4))
    l1 = -math.log(e(1 / tau) / (e(1 / tau) + 2 + 2 * e(-1 / tau)))
    return (l0 + 2 * l1) / 3


def test_cibhash_loss_three_items():
    h = torch.tensor([[0.6, 0.6], [-0.6, 0.2], [0.2, -0.6]], requires_grad=True)  # codes (1,1), (-1,1), (1,-1)
    loss = cibhash.cibhash_loss(h, h.detach().clone(), temperature=0.5, beta=1.0)  # same views: KL = 0
    assert loss.item() == pytest.approx(nt_xent_by_hand(0.5), abs=1e-6)
    loss.backward()
    assert h.grad.abs().sum() > 0  # the straight-through estimator passes a gradient through sign()
    # the KL term: p = (1 + h) / 2; views with p1 = (0.8, 0.8), p2 = (0.6, 0.6) for item 0, the rest equal
    h1 = torch.tensor([[0.6, 0.6], [-0.6, 0.2], [0.2, -0.6]])
    h2 = torch.tensor([[0.2, 0.2], [-0.6, 0.2], [0.2, -0.6]])
    kl = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    expect = 2 * (kl(0.8, 0.6) + kl(0.6, 0.8)) / 2 / 3  # two bits of item 0, symmetric, mean over 3 items
    got = cibhash.cibhash_loss(h1, h2, 0.5, beta=1.0) - cibhash.cibhash_loss(h1, h2, 0.5, beta=0.0)
    assert got.item() == pytest.approx(expect, abs=1e-5)


# -----------------------------------------------------------------------------
# product quantization
def test_pq_encode_decode_and_fit():
    # 2 codebooks of 2 words over 1-d subspaces
    c = torch.tensor([[[0.], [10.]], [[-1.], [1.]]])
    z = torch.tensor([[1., 0.5], [9., -3.], [6., -0.2]])
    codes = pq.pq_encode(z, c)
    assert codes.tolist() == [[0, 1], [1, 0], [1, 0]]
    assert pq.pq_decode(codes, c).tolist() == [[0., 1.], [10., -1.], [10., -1.]]
    # two clear clusters per subspace: the fit finds their means, whatever the start
    z = torch.tensor([[0., 5.], [1., 5.], [10., -5.], [11., -7.]])
    fit = pq.pq_fit(z, 2, iters=10, words=2, seed=3)
    assert sorted(fit[0, :, 0].tolist()) == [0.5, 10.5] and sorted(fit[1, :, 0].tolist()) == [-6.0, 5.0]
    # fewer items than words: every item gets its own word, exactly
    z = torch.tensor([[0., 1.], [2., 3.], [4., 5.]])
    fit = pq.pq_fit(z, 1, iters=5, words=8)
    assert torch.equal(pq.pq_decode(pq.pq_encode(z, fit), fit), z)


def test_pq_shape():
    assert pq.pq_shape(16, 64) == 2 and pq.pq_shape(64, 512) == 8
    with pytest.raises(ValueError, match='multiple of 8'):
        pq.pq_shape(12, 64)
    with pytest.raises(ValueError, match='embedding dimension 60'):
        pq.pq_shape(64, 60)


# -----------------------------------------------------------------------------
# asymmetric quantizer distance: ranking and MAP against brute force, with ties
def brute_force_map(q, codes, codebooks, q_labels, r_labels, k, metric):
    m = codebooks.shape[0]
    recon = np.stack([np.concatenate([codebooks[j, codes[r, j]] for j in range(m)]) for r in range(len(codes))])
    aps, ranked = [], []
    for i in range(len(q)):
        if metric == 'ip':
            d = [-float(sum(a * b for a, b in zip(q[i], recon[r]))) for r in range(len(codes))]
        else:
            d = [float(sum((a - b) ** 2 for a, b in zip(q[i], recon[r]))) for r in range(len(codes))]
        order = sorted(range(len(codes)), key=lambda r: (d[r], r))[:k]  # ties by index
        ranked.append(order)
        rel = [bool((q_labels[i] & r_labels[r]).any()) for r in order]
        hits, total = 0, 0.0
        for pos, ok in enumerate(rel, 1):
            if ok:
                hits += 1
                total += hits / pos
        aps.append(total / hits if hits else 0.0)
    return float(np.mean(aps)), np.array(ranked)


@pytest.mark.parametrize('metric', ['ip', 'l2'])
@pytest.mark.usefixtures('kernel')
def test_aqd_ranking_and_map_equal_brute_force_with_ties(metric, monkeypatch):
    rng = np.random.default_rng(0)
    m, k_words, d = 2, 4, 3
    codebooks = rng.integers(-2, 3, (m, k_words, d)).astype(np.float64)  # integers: every sum exact
    codes = rng.integers(0, k_words, (300, m))                             # 16 distinct codes: many ties
    q = rng.integers(-3, 4, (25, m * d)).astype(np.float32)
    q_labels = rng.integers(0, 2, (25, 5)).astype(np.int8)
    r_labels = rng.integers(0, 2, (300, 5)).astype(np.int8)
    monkeypatch.setattr(eval_hash, 'CHUNK', 4)  # several chunks and both workers
    for k in (20, 300):  # the threshold path of _topk_rows and the full sort
        want_map, want_idx = brute_force_map(q, codes, codebooks, q_labels, r_labels, k, metric)
        idx, _ = eval_hash.aqd_rank_topk(q, codes.astype(np.uint8), codebooks, k, metric)
        np.testing.assert_array_equal(idx, want_idx)
        got = eval_hash.map_aqd(q, codes.astype(np.uint8), codebooks, q_labels, r_labels, k, metric)
        assert got == pytest.approx(want_map, abs=1e-12)
    # the same AP code as the Hamming MAP: one codebook of two 1-d words (-1, +1) is a 1-bit code
    b_q, b_r = rng.choice([-1, 1], (25, 1)), rng.choice([-1, 1], (300, 1))
    cb = np.array([[[-1.], [1.]]])
    assert eval_hash.map_aqd(b_q, (b_r > 0).astype(np.uint8), cb, q_labels, r_labels, 50, 'ip') == \
        pytest.approx(eval_hash.mean_average_precision(b_q, b_r, q_labels, r_labels, 50), abs=1e-12)


@pytest.mark.parametrize('metric', ['ip', 'l2'])
@pytest.mark.usefixtures('kernel')
def test_aqd_ranking_equals_faiss_index_pq(metric):
    # faiss's IndexPQ, given our codebooks, encodes the items to our codes and ranks by its own
    # lookup tables (asymmetric distance computation): the same lists and distances
    import faiss
    rng = np.random.default_rng(1)
    m, d = 4, 32
    codebooks = rng.standard_normal((m, 256, d // m)).astype(np.float32)
    codes = rng.integers(0, 256, (2000, m)).astype(np.uint8)
    q = rng.standard_normal((30, d)).astype(np.float32)
    index = faiss.IndexPQ(d, m, 8, faiss.METRIC_INNER_PRODUCT if metric == 'ip' else faiss.METRIC_L2)
    faiss.copy_array_to_vector(codebooks.ravel(), index.pq.centroids)
    index.is_trained = True
    index.add(pq.pq_decode(codes, torch.tensor(codebooks)).numpy())
    assert np.array_equal(faiss.vector_to_array(index.codes).reshape(len(codes), m), codes)
    d_f, i_f = index.search(q, 50)
    idx, dist = eval_hash.aqd_rank_topk(q, codes, codebooks, 50, metric)
    np.testing.assert_allclose(dist, -d_f if metric == 'ip' else d_f, atol=1e-4)
    assert (idx == i_f).mean() > 0.99  # random float distances: near ties are rare


@needs_numba
@pytest.mark.parametrize('metric,words', [('ip', 4), ('l2', 300)])
def test_aqd_compiled_path_equals_numpy_path(metric, words, monkeypatch):
    # hamming.aqd_rank against the numpy path, to the bit: integer codebooks (exact sums, many ties, zeros of both
    # signs), k = 1, k below and above the sampled threshold, k = n, k > n; 300 words a codebook: wider codes
    rng = np.random.default_rng(2)
    m, d, n = 3, 2, 777
    codebooks = rng.integers(-2, 3, (m, words, d)).astype(np.float64)
    codes = rng.integers(0, words, (n, m)).astype(np.uint8 if words <= 256 else np.int64)
    q = rng.integers(-3, 4, (30, m * d)).astype(np.float32)
    q_labels, r_labels = rng.integers(0, 2, (30, 4)), rng.integers(0, 2, (n, 4))

    def ranked(kernel):
        monkeypatch.setattr(eval_hash, 'KERNEL', kernel)
        return [(*eval_hash.aqd_rank_topk(q, codes, codebooks, k, metric),
                 eval_hash.map_aqd(q, codes, codebooks, q_labels, r_labels, k, metric)) for k in (1, 20, 300, n, n + 5)]
    for (ci, cd, cm), (ni, nd, nm) in zip(ranked('numba'), ranked('numpy')):
        assert np.array_equal(ci, ni) and np.array_equal(cd, nd) and np.array_equal(np.signbit(cd), np.signbit(nd))
        assert cm == nm


def test_aqd_refuses_codes_that_do_not_fit():
    cb = np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match='do not fit'):
        eval_hash.map_aqd(np.zeros((2, 5)), np.zeros((3, 2), np.uint8), cb, np.ones((2, 1)), np.ones((3, 1)), 3)
    with pytest.raises(ValueError, match='outside 0..3'):
        eval_hash.map_aqd(np.zeros((2, 6)), np.full((3, 2), 7, np.uint8), cb, np.ones((2, 1)), np.ones((3, 1)), 3)


# -----------------------------------------------------------------------------
# through train.py, eval_hash.py and search.py
def train_cmd(tmp_path, method, *extra):
    return ('train.py', '--dataset=folder', f'--cache_dir={tmp_path}', '--backbone=tiny-test',
            '--backbone_pretrained=random', f'--method={method}', '--bits=16', '--epochs=20', '--warmup=2',
            '--lr_max=0.01', '--lr_min=0.001', '--batch_size=64', f'--results={tmp_path}/results.jsonl',
            f'--run_dir={tmp_path}/{method}', '--clip_model=tiny-test', '--clip_pretrained=random', *extra)


def test_quantized_run_is_scored_by_aqd_everywhere(tmp_path):
    write_feature_set(str(tmp_path))
    proc = run_script(*train_cmd(tmp_path, 'dtq'), env=dict(OMP_NUM_THREADS='1'))
    line = re.search(r'^result .*map@1000=([\d.]+) \(K cut to the 400 retrieval items\) \(AQD ranking', proc.stdout,
                     re.M)
    assert line, proc.stdout[-2000:]
    z = np.load(f'{tmp_path}/dtq/16bits/codes.npz')
    assert z['retrieval_codes'].shape == (len(z['retrieval_h']), 2) and z['codebooks'].shape == (2, 256, 32)
    # the MAP train.py printed is map_aqd on what it saved
    aqd = eval_hash.map_aqd(z['query_h'], z['retrieval_codes'], z['codebooks'], z['query_labels'],
                            z['retrieval_labels'], 1000, str(z['aqd']))
    assert aqd == pytest.approx(float(line.group(1)), abs=1e-4)
    ev = run_script('eval_hash.py', f'--run={tmp_path}/dtq', '--examples=0')
    assert f'map@1000={float(line.group(1)):.4f} (K cut to the 400 retrieval items) (AQD ranking' in ev.stdout
    assert os.path.exists(f'{tmp_path}/dtq/pr_curve.png')
    s = run_script('search.py', f'--run={tmp_path}/dtq', '--bits=16', '--images=dataset:folder',
                   f'--index={tmp_path}/index', check=False)
    assert s.returncode != 0 and 'product-quantized codes' in s.stderr + s.stdout


def test_dvsq_and_cibhash_refuse_inputs_they_cannot_use(tmp_path):
    write_feature_set(str(tmp_path))  # no augmented views
    with open(f'{tmp_path}/names.txt', 'w') as f:
        f.write('\n'.join(str(c) for c in range(8)) + '\n')
    proc = run_script(*train_cmd(tmp_path, 'dvsq', f'--class_names={tmp_path}/names.txt'), check=False)
    assert proc.returncode == 1 and 'holds class numbers, not names' in proc.stderr and 'names.txt' in proc.stderr
    with open(f'{tmp_path}/names.txt', 'w') as f:
        f.write('cat\ndog\n')
    proc = run_script(*train_cmd(tmp_path, 'dvsq', f'--class_names={tmp_path}/names.txt'), check=False)
    assert proc.returncode == 1 and 'has 2 names but the labels have 8 classes' in proc.stderr
    proc = run_script(*train_cmd(tmp_path, 'cibhash'), check=False)
    assert proc.returncode == 1 and 'train_aug_split_s0.npy' in proc.stderr and 'Traceback' not in proc.stderr
