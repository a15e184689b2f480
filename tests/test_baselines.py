"""Hand-worked values and real properties of the baselines in methods/pairwise.py (SSDH, DHN, DCH) and
methods/lsh_itq.py (LSH, ITQ)."""
import math

import numpy as np
import pytest
import torch

from methods import lsh_itq, pairwise
from models import HashHead


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: tiny tensors run on one thread


# -----------------------------------------------------------------------------
# SSDH
def ssdh_points():
    """8 unit vectors whose 28 pairwise cosine distances are known exactly:
    e1 and p1 = 0.99 e1 + sqrt(1 - 0.99^2) e8 at d = 0.01; e2 and -e2 at d = 2; every other pair
    orthogonal, d = 1 (26 pairs)."""
    x = np.zeros((8, 8))
    x[0, 0] = 1                              # 0: e1
    x[1, 0], x[1, 7] = 0.99, math.sqrt(1 - 0.99 ** 2)  # 1: near-duplicate of e1
    x[2, 1], x[3, 1] = 1, -1                 # 2: e2, 3: -e2
    for i, k in zip(range(4, 8), range(2, 6)):
        x[i, k] = 1                          # 4-7: e3..e6
    return x


def test_ssdh_fit_two_half_gaussians():
    # histogram peak: 26 of 28 distances equal 1 -> m = 1.
    # left half {d <= 1}: 26 at 1 and 0.01 -> sigma_l^2 = 0.99^2 / 27; right half {d >= 1}: 26 at 1
    # and 2 -> sigma_r^2 = 1 / 27 (the distances at the peak belong to both halves)
    m, sigma_l, sigma_r = pairwise.ssdh_fit(ssdh_points())
    assert m == pytest.approx(1.0, abs=1e-9)
    assert sigma_l == pytest.approx(0.99 / math.sqrt(27), abs=1e-6)   # 0.190526
    assert sigma_r == pytest.approx(1 / math.sqrt(27), abs=1e-6)      # 0.192450


def test_ssdh_similarity_which_pairs():
    # thresholds with left = right = 2: similar d <= 1 - 2 * 0.190526 = 0.618948,
    # dissimilar d >= 1 + 2 * 0.192450 = 1.384900. So (0, 1) at d = 0.01 is +1, (2, 3) at d = 2 is -1,
    # every orthogonal pair (d = 1) is ignored (0); the diagonal is +1.
    s = pairwise.ssdh_similarity(ssdh_points(), 2.0, 2.0)
    expect = np.eye(8, dtype=np.int8)
    expect[0, 1] = expect[1, 0] = 1
    expect[2, 3] = expect[3, 2] = -1
    assert s.dtype == np.int8 and s.shape == (8, 8)
    np.testing.assert_array_equal(s, expect)
    # left = 5.3: threshold 1 - 5.3 * 0.190526 = -0.0098 < 0.01, so the near-duplicates are no longer similar;
    # right = 5.3: 1 + 5.3 * 0.192450 = 2.0200 > 2, so e2 / -e2 are no longer dissimilar
    np.testing.assert_array_equal(pairwise.ssdh_similarity(ssdh_points(), 5.3, 5.3), np.eye(8, dtype=np.int8))


def test_ssdh_similarity_blocks_symmetry_and_monotonicity():
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(10), 6)  # 10 groups of 6 points around random centres
    x = rng.normal(size=(60, 16)) + rng.normal(size=(10, 16))[group] * 2
    s = pairwise.ssdh_similarity(x)
    np.testing.assert_array_equal(s, pairwise.ssdh_similarity(x, chunk=7))  # blockwise = all at once
    np.testing.assert_array_equal(s, s.T)
    assert (np.diag(s) == 1).all()
    off = ~np.eye(60, dtype=bool)
    same = group[:, None] == group[None, :]
    # the low tail of the distances is the same-group pairs, the high tail pairs of distant groups
    assert ((s == 1) & off).sum() > 100 and same[(s == 1) & off].mean() > 0.9
    assert (s == -1).sum() > 20 and not same[s == -1].any()
    assert (s == 0).sum() > 0.5 * s.size  # most pairs are ignored
    # a larger multiplier only removes pairs: the similar and dissimilar sets shrink
    tight = pairwise.ssdh_similarity(x, 3.0, 3.0)
    assert ((tight == 1) <= (s == 1)).all() and ((tight == -1) <= (s == -1)).all()
    assert (tight == 1).sum() < (s == 1).sum()


def test_ssdh_loss_hand_worked():
    # L = 2; h0 = (1, 1), h1 = (1, -1), h2 = (0.5, 0.5). h_i^T h_j / L:
    #   (0,0) 1, (1,1) 1, (2,2) 0.25, (0,1) 0, (0,2) 0.5, (1,2) 0.
    # s: diagonal +1, s01 = -1, s02 = +1, s12 = 0 (ignored) -> counted entries: 3 diagonal + 4 off-diagonal = 7.
    # squared errors: (0,0) 0, (1,1) 0, (2,2) (0.25 - 1)^2 = 0.5625, (0,1),(1,0) (0 + 1)^2 = 1 each,
    # (0,2),(2,0) (0.5 - 1)^2 = 0.25 each -> sum 3.0625, mean 3.0625 / 7 = 0.4375
    h = torch.tensor([[1., 1.], [1., -1.], [0.5, 0.5]], dtype=torch.float64)
    s = np.array([[1, -1, 1], [-1, 1, 0], [1, 0, 1]], np.int8)
    assert pairwise.ssdh_loss(h, s).item() == pytest.approx(0.4375, abs=1e-6)
    # the ignored pair really is ignored: changing h so that (1, 2) moves changes nothing of it
    s_all = s.copy()
    s_all[1, 2] = s_all[2, 1] = 1  # now counted: (0 - 1)^2 twice -> (3.0625 + 2) / 9
    assert pairwise.ssdh_loss(h, s_all).item() == pytest.approx(5.0625 / 9, abs=1e-6)


# -----------------------------------------------------------------------------
# DHN, DCH
def test_label_similarity_multilabel():
    y = np.array([[1, 0, 1],
                  [0, 1, 0],
                  [0, 0, 1],
                  [0, 1, 1],
                  [0, 0, 0]])
    s = pairwise.label_similarity(y, chunk=2)
    expect = np.array([[1, 0, 1, 1, 0],
                       [0, 1, 0, 1, 0],
                       [1, 0, 1, 1, 0],
                       [1, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0]], np.int8)  # row 4 has no label: similar to nothing
    assert s.dtype == np.int8
    np.testing.assert_array_equal(s, expect)
    np.testing.assert_array_equal(pairwise.label_similarity(np.array([2, 0, 2])),
                                  [[1, 0, 1], [0, 1, 0], [1, 0, 1]])  # class indices


def test_dhn_loss_hand_worked():
    # L = 2, a = 1, lam = 0.5; h0 = h1 = (1, 1), h2 = (-1, 0). <h_i, h_j>: (0,1) 2, (0,2) -1, (1,2) -1.
    # s01 = 1, s02 = 0, s12 = 1. Pair terms log(1 + e^x) - s x:
    #   (0,1) log(1 + e^2) - 2 = log(1 + e^-2) = 0.126928011
    #   (0,2) log(1 + e^-1) = 0.313261688
    #   (1,2) log(1 + e^-1) + 1 = 1.313261688       -> mean over the 3 pairs 0.584483795
    # quantization: log cosh(|h| - 1) is 0 except h2's second bit: log cosh(-1) = 0.433780830,
    #   mean over 6 entries 0.072296805, times 0.5 = 0.036148403       -> total 0.620632198
    h = torch.tensor([[1., 1.], [1., 1.], [-1., 0.]], dtype=torch.float64)
    s = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], np.int8)
    assert pairwise.dhn_loss(h, s, lam=0.5, alpha=1.0).item() == pytest.approx(0.620632198, abs=1e-6)
    # a scales the inner products: with a = 0.5 the pair terms are log(1 + e^-1), log(1 + e^-0.5), log(1 + e^-0.5) + 0.5
    pair = (math.log1p(math.exp(-1)) + 2 * math.log1p(math.exp(-0.5)) + 0.5) / 3
    assert pairwise.dhn_loss(h, s, lam=0.0, alpha=0.5).item() == pytest.approx(pair, abs=1e-6)


def test_dch_loss_hand_worked():
    # L = 2, gamma = 2, lam = 0.5; h0 = h1 = (1, 1), h2 = (-1, 0).
    # d = (L/2)(1 - cos): (0,1) 0; (0,2) and (1,2): cos = -1/sqrt(2), d = 1 + 1/sqrt(2) = 1.707106781.
    # s01 = 1, s02 = 0, s12 = 1 -> |S| = 3 pairs, |S_1| = 2, |S_0| = 1: w = 3/2 (similar), 3 (dissimilar).
    # Cauchy cross-entropy: similar log(1 + d/gamma), dissimilar log(1 + gamma/d):
    #   (0,1) log(1) = 0;  (1,2) log(1 + 0.853553391) = 0.617104548;  (0,2) log(1 + 1.171572875) = 0.775451732
    #   weighted mean = (1.5 * 0 + 1.5 * 0.617104548 + 3 * 0.775451732) / 3 = 1.084004006
    # quantization: d(|h_i|, 1) = 0 for h0, h1; |h2| = (1, 0): cos = 1/sqrt(2), d = 0.292893219,
    #   log(1 + 0.292893219 / 2) = 0.136667254, mean over 3 items 0.045555751, times 0.5 = 0.022777876
    #   -> total 1.106781882
    h = torch.tensor([[1., 1.], [1., 1.], [-1., 0.]], dtype=torch.float64)
    s = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], np.int8)
    assert pairwise.dch_loss(h, s, gamma=2.0, lam=0.5).item() == pytest.approx(1.106781882, abs=1e-6)
    # without the class-imbalance weights the mean would be (0 + 0.617104548 + 0.775451732) / 3 = 0.464185427:
    # the weights double-count the rarer dissimilar pair
    assert pairwise.dch_loss(h, s, gamma=2.0, lam=0.0).item() == pytest.approx(1.084004006, abs=1e-6)
    # all pairs similar: w = 1, mean (0 + 2 * 0.617104548) / 3
    ones = np.ones((3, 3), np.int8)
    assert pairwise.dch_loss(h, ones, gamma=2.0, lam=0.0).item() == pytest.approx(2 * 0.617104548 / 3, abs=1e-6)


def random_batch(n=8, bits=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.tanh(torch.randn(n, bits, generator=g)).requires_grad_(True)
    labels = np.eye(3, dtype=np.int8)[np.arange(n) % 3]
    return h, labels


@pytest.mark.parametrize('name', ['ssdh', 'dhn', 'dch'])
def test_loss_gradients_finite_nonzero(name):
    for n in (2, 8):  # any batch of two or more
        h, labels = random_batch(n)
        s = pairwise.label_similarity(labels)
        if name == 'ssdh':
            s = 2 * s.astype(np.int8) - 1  # +1 same class, -1 otherwise
            s[0, -1] = s[-1, 0] = 0        # one ignored pair
            loss = pairwise.ssdh_loss(h, s)
        else:
            loss = getattr(pairwise, f'{name}_loss')(h, s)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
        assert h.grad.abs().sum() > 0


def test_losses_do_not_overflow():
    # 1024 bits, all codes equal to +1: DHN's inner product 1024 would overflow exp() in float32;
    # softplus(1024) = 1024 exactly for a dissimilar pair
    h = torch.ones(4, 1024, requires_grad=True)
    zeros = np.zeros((4, 4), np.int8)
    loss = pairwise.dhn_loss(h, zeros)
    assert loss.item() == pytest.approx(1024.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(h.grad).all()
    # DCH: dissimilar pairs with identical codes have d = 0; gamma / d is capped at gamma / DCH_EPS
    h = torch.ones(4, 64, requires_grad=True)
    loss = pairwise.dch_loss(h, zeros)
    cap = math.log1p(pairwise.DCH_GAMMA / pairwise.DCH_EPS)  # log(1 + 2e7) = 16.81
    assert torch.isfinite(loss) and loss.item() == pytest.approx(cap, rel=1e-5)
    loss.backward()
    assert torch.isfinite(h.grad).all()
    h = torch.ones(4, 64, requires_grad=True)  # identical similar codes: loss 0, finite gradient
    loss = pairwise.dch_loss(h, np.ones((4, 4), np.int8))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(h.grad).all()


def two_blobs(n=100, dim=16, sep=6.0, seed=0):
    """Two Gaussian blobs at +-sep along a random unit direction, unit variance, offset from the
    origin; labels 0 (first half) / 1 (second half)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=dim)
    u /= np.linalg.norm(u)
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(size=(n, dim)) + np.where(y[:, None] == 0, sep, -sep) * u + 3.0
    return x.astype(np.float32), y


def code_agreement(h, y):
    """Mean fraction of equal bits of sign(h) over same-label pairs and over different-label pairs."""
    b = np.where(np.asarray(h) >= 0, 1, -1)
    agree = (b @ b.T / b.shape[1] + 1) / 2
    same = y[:, None] == y[None, :]
    off = ~np.eye(len(y), dtype=bool)
    return agree[same & off].mean(), agree[~same].mean()


@pytest.mark.parametrize('name', ['ssdh', 'dhn', 'dch'])
def test_losses_train_a_hash_head(name):
    # train.py's setting: Adam on HashHead outputs. A few steps on two blobs lower the loss and
    # give codes that agree within a blob more than across.
    x, y = two_blobs()
    s = pairwise.ssdh_similarity(x) if name == 'ssdh' else pairwise.label_similarity(np.eye(2, dtype=np.int8)[y])
    loss_fn = getattr(pairwise, f'{name}_loss')
    torch.manual_seed(0)
    head = HashHead(x.shape[1], 16, hidden=64)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    xt = torch.as_tensor(x)
    losses = []
    for _ in range(40):
        loss = loss_fn(head(xt), s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # DCH's floor is log(1 + gamma / L) per dissimilar pair, not 0
    head.eval()
    with torch.no_grad():
        same, diff = code_agreement(head(xt).numpy(), y)
    assert same > 0.9 and diff < 0.3


# -----------------------------------------------------------------------------
# LSH, ITQ
def test_lsh_shapes_determinism_and_blobs():
    x, y = two_blobs()
    train = x[::2]  # both blobs
    h = lsh_itq.lsh_codes(train, x, 64, seed=0)
    assert h.shape == (100, 64) and h.dtype == np.float32
    np.testing.assert_array_equal(h, lsh_itq.lsh_codes(train, x, 64, seed=0))
    assert not np.array_equal(h, lsh_itq.lsh_codes(train, x, 64, seed=1))
    # centred by the training mean: the projection of that mean is 0
    np.testing.assert_allclose(lsh_itq.lsh_codes(train, train.mean(0, keepdims=True), 64), 0, atol=1e-4)
    # same-blob vectors from the centre are ~46 degrees apart (agreement ~ 1 - 46/180), different-blob ~134
    same, diff = code_agreement(h, y)
    assert same > 0.65 and diff < 0.35


def quantization_loss(v):
    """||sign(V) - V||_F, ITQ's objective for a projection V."""
    return np.linalg.norm(np.where(v >= 0, 1.0, -1.0) - v)


def test_itq_rotation_lowers_quantization_loss():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 24)) * np.linspace(3, 0.5, 24) @ np.linalg.qr(rng.normal(size=(24, 24)))[0] + 2.0
    bits = 8
    vr = lsh_itq.itq_codes(x, x, bits).astype(np.float64)
    # the unrotated PCA projection V, computed independently (sign and order of its columns do not change the loss)
    xc = x - x.mean(0)
    v = xc @ np.linalg.svd(xc, full_matrices=False)[2][:bits].T
    assert quantization_loss(vr) < quantization_loss(v)
    # V R with R orthogonal: every row keeps its length, and R = V^+ (V R) is orthogonal
    np.testing.assert_allclose(np.linalg.norm(vr, axis=1), np.linalg.norm(v, axis=1), rtol=1e-4)
    r = np.linalg.lstsq(v, vr, rcond=None)[0]
    np.testing.assert_allclose(r.T @ r, np.eye(bits), atol=1e-4)
    # the alternating updates never increase the loss (same random start for every run)
    losses = [quantization_loss(lsh_itq.itq_codes(x, x, bits, iters=k).astype(np.float64)) for k in (0, 1, 3, 10, 50)]
    assert all(b <= a + 1e-3 for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]


def test_itq_shapes_determinism_blobs_and_bad_bits():
    x, y = two_blobs()
    train = x[::2]
    h = lsh_itq.itq_codes(train, x, 8, seed=0)
    assert h.shape == (100, 8) and h.dtype == np.float32
    np.testing.assert_array_equal(h, lsh_itq.itq_codes(train, x, 8, seed=0))
    same, diff = code_agreement(h, y)
    assert same - diff > 0.3
    with pytest.raises(ValueError):
        lsh_itq.itq_codes(train, x, 17)  # more bits than feature dimensions
