"""Baseline hashing methods for the comparison tables: SSDH and CIBHash (unsupervised); DHN, DCH
and the quantization methods DQN, DVSQ, DTQ (supervised: they read the training labels, so they
are upper bounds, not competitors of an unsupervised method); and the training-free floors LSH
and ITQ.

The deep baselines are losses on the relaxed codes h in (-1, 1)^L of a HashHead (models.py),
trained on frozen backbone features by train.py's loop, not end to end on a CNN as in their
papers. Every loss is a torch scalar that works on any batch of two or more items.

    s = ssdh_similarity(x_train)                 # once, N x N int8 in {+1, -1, 0}
    loss = ssdh_loss(h, s[idx][:, idx])          # per batch
    loss = dhn_loss(h, label_similarity(y[idx])) # or dch_loss(...)
    h_q = itq_codes(x_train, x_query, bits)      # signed by train.py / eval_hash.to_codes
    loss = cibhash_loss(hv(view1), hv(view2))    # two augmented views of the same images

The quantization methods learn a continuous embedding z (a HashHead with D outputs) and a product
quantizer of it: M = bits / 8 codebooks of K = 256 words, each over D / M dimensions; an item's
code is its M word indices (8 bits each), and the retrieval set is ranked by the asymmetric
quantizer distance between the query's z and the items' quantized z (eval_hash.map_aqd).

    C = pq_fit(z_train, M)                       # k-means in each subspace, M x K x D/M
    codes = pq_encode(z, C)                      # N x M word indices
    loss = dqn_loss(z, s) + DQN_LAMBDA * pq_loss(z, pq_decode(codes, C))
"""
import numpy as np
import torch
import torch.nn.functional as F

# SSDH (Yang et al., IJCAI 2018), semantic structure: similar if d <= m - SSDH_LEFT * sigma_l,
# dissimilar if d >= m + SSDH_RIGHT * sigma_r (m the peak of the cosine-distance histogram)
SSDH_LEFT = 2.0      # alpha: similar beyond 2 sigma_l below the peak (SSDH PyTorch code's --alpha 2, seeds/004)
SSDH_RIGHT = 2.0     # beta: dissimilar beyond 2 sigma_r above it (--beta 2); the ~95% in between are ignored
SSDH_BIN = 0.01      # histogram bin width that locates the peak m (the SSDH code's 100 bins over [0, 1])
SSDH_CHUNK = 2048    # rows of the distance matrix computed at once (2048 x N float32)
# DHN (Zhu et al., AAAI 2016): pairwise cross-entropy + lambda * log-cosh quantization
DHN_ALPHA = 1.0      # a in sigma(a <h_i, h_j>); DHN's likelihood is sigma of the plain inner product (a = 1)
DHN_LAMBDA = 0.1     # quantization weight; chosen by cross-validation in DHN, 0.1 as in DeepHash-pytorch
# DCH (Cao et al., CVPR 2018): Cauchy cross-entropy + lambda * Cauchy quantization
DCH_GAMMA = 20.0     # Cauchy scale gamma; the DeepHash release's default (examples/dch, --gamma 20)
DCH_LAMBDA = 0.1     # quantization weight; 0.1 as in DeepHash-pytorch's DCH
DCH_EPS = 1e-6       # smallest distance in gamma / d (a dissimilar pair with identical codes)
# ITQ (Gong & Lazebnik, CVPR 2011)
ITQ_ITERS = 50       # alternating B / R updates (the paper's 50 iterations)
# CIBHash (Qiu et al., IJCAI 2021): NT-Xent on the straight-through codes of two views + beta * KL
CIB_TEMPERATURE = 0.3  # NT-Xent temperature (the CIBHash code's --temperature 0.3)
CIB_BETA = 0.001     # weight of the KL term between the two views' code distributions (its --weight 0.001)
# product quantization shared by DQN, DVSQ and DTQ
PQ_WORDS = 256       # K words per codebook: 8 bits per codebook, M = bits / 8 codebooks (DeepHash's n_subcenter)
PQ_DIM = 64          # D, the embedding of DQN and DTQ (DTQ's --output-dim 64; DVSQ's D is the word vectors' dimension)
PQ_FIT_ITERS = 20    # Lloyd iterations of the first codebook fit (after epoch 0, as DeepHash's first update)
PQ_UPDATE_ITERS = 3  # Lloyd iterations, from the current codebooks, after every later epoch and at the end
AQD = 'ip'           # the ranking: 'ip', minus the inner product <z_q, q(z_r)> (DeepHash's MAPs_CQ.get_mAPs_AQD),
                     # or 'l2', the squared distance ||z_q - q(z_r)||^2 (the DQN paper's AQD)
# DQN (Cao et al., AAAI 2016): pairwise cosine loss + lambda * quantization loss
DQN_LAMBDA = 1e-4    # DeepHash's examples/dqn q_lambda
# DVSQ (Cao et al., CVPR 2017): adaptive-margin loss against the labels' word vectors + lambda * quantization loss
DVSQ_LAMBDA = 1e-4   # DeepHash's examples/dvsq q_lambda
# DTQ (Liu et al., ACM MM 2018): triplet loss on group-hard triplets + lambda * quantization loss
DTQ_MARGIN = 30.0    # triplet margin on squared Euclidean distances (DeepHash's examples/dtq --triplet-margin 30, D =
                     # 64)
DTQ_LAMBDA = 1e-4    # quantization weight; DeepHash's DTQ example uses 0 (ours: the same as DQN's and DVSQ's)


# -----------------------------------------------------------------------------
# SSDH: semantic structure from the distribution of cosine distances
def _distance_blocks(x, chunk):
    """Upper triangle of the cosine-distance matrix 1 - cos(x_i, x_j), block by block:
    yields (a, b, d, keep), d = rows a:b against columns a:N, keep = the pairs j > i."""
    x = F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float32), dim=1)
    n = len(x)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        d = (1 - x[a:b] @ x[a:].T).clamp_(0, 2)  # cosine distance lies in [0, 2]
        keep = torch.ones_like(d, dtype=torch.bool).triu_(1)  # column a + k is j; j > i iff k > i - a
        yield a, b, d, keep


def ssdh_fit(x, chunk=SSDH_CHUNK):
    """SSDH, semantic structure: the cosine distances of all pairs i < j, modelled by two half
    Gaussians that share their peak m. Returns (m, sigma_l, sigma_r): m the centre of the fullest histogram
    bin (width SSDH_BIN), sigma_l / sigma_r the root mean square of d - m over the distances
    d <= m / d >= m (each half mirrored about m is a Gaussian of mean m; a distance exactly at the
    peak belongs to both halves)."""
    n_bins = int(round(2 / SSDH_BIN)) + 1
    hist = torch.zeros(n_bins, dtype=torch.float64)
    for _, _, d, keep in _distance_blocks(x, chunk):  # pass 1: histogram, bins centred on k * SSDH_BIN
        hist += torch.histc(d.masked_fill(~keep, -1), n_bins, -SSDH_BIN / 2, 2 + SSDH_BIN / 2).double()
    if hist.sum() == 0:
        raise ValueError('ssdh_fit needs at least two points')
    m = float(hist.argmax()) * SSDH_BIN
    sq, cnt = np.zeros(2), np.zeros(2)  # sum of (d - m)^2 and number of pairs on the left / right half
    for _, _, d, keep in _distance_blocks(x, chunk):  # pass 2: spread of each half about the peak
        diff = d - m
        for k, half in enumerate((keep & (diff <= 0), keep & (diff >= 0))):
            sq[k] += float(torch.where(half, diff * diff, 0).sum(dtype=torch.float64))
            cnt[k] += int(half.sum())
    sigma_l, sigma_r = np.sqrt(sq / np.maximum(cnt, 1))
    return m, float(sigma_l), float(sigma_r)


def ssdh_similarity(x, left=SSDH_LEFT, right=SSDH_RIGHT, chunk=SSDH_CHUNK):
    """SSDH, semantic-structure matrix: S_ij = +1 if d_ij <= m - left * sigma_l (similar), -1 if
    d_ij >= m + right * sigma_r (dissimilar), 0 otherwise (ignored by the loss); d the cosine
    distance of the training features, (m, sigma_l, sigma_r) from `ssdh_fit`. Diagonal +1.
    N x N int8, built block by block in float32 (N = 10,500: 110 MB)."""
    m, sigma_l, sigma_r = ssdh_fit(x, chunk)
    lo, hi = m - left * sigma_l, m + right * sigma_r
    n = len(x)
    s = np.zeros((n, n), np.int8)
    for a, b, d, _ in _distance_blocks(x, chunk):  # pass 3: thresholds on j > i, mirrored so S is symmetric
        block = ((d <= lo).to(torch.int8) - (d >= hi).to(torch.int8)).numpy()
        s[a:b, b:], s[b:, a:b] = block[:, b - a:], block[:, b - a:].T
        upper = np.triu(block[:, :b - a], 1)  # inside the diagonal block: pairs j > i only
        s[a:b, a:b] = upper + upper.T
    np.fill_diagonal(s, 1)
    return s


def ssdh_loss(h, s):
    """SSDH, pairwise loss sum_ij |s_ij| (h_i^T h_j / L - s_ij)^2 on the relaxed codes h, here as
    the mean over the counted pairs (s_ij != 0, the diagonal included); s_ij = 0 pairs are ignored."""
    s = torch.as_tensor(s, device=h.device).to(h.dtype)
    mask = s.abs()  # |S_ij|: 1 for similar and dissimilar pairs, 0 for ignored ones
    err = (h @ h.T / h.shape[1] - s) ** 2
    return (mask * err).sum() / mask.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# DeepHash (supervised): DHN and DCH
def label_similarity(labels, chunk=4096):
    """s_ij = 1 when items i and j share at least one label, else 0 (DHN's and DCH's supervision).
    labels: N x C 0/1 (or a vector of class indices). An unlabelled row is similar to nothing.
    N x N int8."""
    y = np.asarray(labels)
    if y.ndim == 1:  # class indices -> one-hot rows
        y = np.eye(int(y.max()) + 1, dtype=np.float32)[y]
    y = (y > 0).astype(np.float32)
    s = np.empty((len(y), len(y)), np.int8)
    for a in range(0, len(y), chunk):
        s[a:a + chunk] = y[a:a + chunk] @ y.T > 0
    return s


def _pair_mask(s):
    """Pairs of two different items (the diagonal, an item with itself, carries no information)."""
    return ~torch.eye(len(s), dtype=torch.bool, device=s.device)


def dhn_loss(h, s, lam=DHN_LAMBDA, alpha=DHN_ALPHA):
    """DHN, pairwise cross-entropy + lam * quantization loss: the mean over pairs i != j of
    log(1 + exp(a <h_i, h_j>)) - a s_ij <h_i, h_j>, the negative log-likelihood of s_ij under
    sigma(a <h_i, h_j>) in the softplus form that cannot overflow; plus lam times the mean over
    items and bits of log cosh(|h_ik| - 1), DHN's smooth surrogate of | |h_ik| - 1 |."""
    s = torch.as_tensor(s, device=h.device).to(h.dtype)
    logits = alpha * (h @ h.T)
    pair = F.softplus(logits) - s * logits
    quant = _log_cosh(h.abs() - 1)
    return pair[_pair_mask(s)].mean() + lam * quant.mean()


def _log_cosh(x):
    """log cosh x = |x| + log(1 + exp(-2|x|)) - log 2, without overflow."""
    x = x.abs()
    return x + F.softplus(-2 * x) - np.log(2.0)


def _hamming_relaxed(a, b):
    """DCH, normalised Hamming distance: the distance (L/2)(1 - cos(a_i, b_j)) of relaxed codes."""
    cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return a.shape[1] / 2 * (1 - cos).clamp(min=0)


def dch_loss(h, s, gamma=DCH_GAMMA, lam=DCH_LAMBDA):
    """DCH, Cauchy cross-entropy + lam * Cauchy quantization loss: the pair term
        w_ij (s_ij log(1 + d_ij / gamma) + (1 - s_ij) log(1 + gamma / d_ij)),
    i.e. -log of the Cauchy probability gamma / (gamma + d_ij) of a similar pair, -log of
    its complement for a dissimilar one, averaged over pairs i != j, with the class-imbalance
    weights w_ij = |S| / |S_1| for similar and |S| / |S_0| for dissimilar pairs (the average is
    then mean over S_1 + mean over S_0); plus lam times the mean over items of the Cauchy
    quantization loss log(1 + d(|h_i|, 1) / gamma), 1 the all-ones code. d: `_hamming_relaxed`."""
    s = torch.as_tensor(s, device=h.device).to(h.dtype)
    pairs = _pair_mask(s)
    d = _hamming_relaxed(h, h)
    ce = s * torch.log1p(d / gamma) + (1 - s) * torch.log1p(gamma / d.clamp(min=DCH_EPS))
    s, ce = s[pairs], ce[pairs]
    n, n1 = s.numel(), s.sum()
    w = torch.where(s > 0, n / n1.clamp(min=1), n / (n - n1).clamp(min=1))  # class-imbalance weights
    quant = torch.log1p(_hamming_relaxed(h.abs(), torch.ones_like(h[:1])).squeeze(1) / gamma)
    return (w * ce).mean() + lam * quant.mean()


# -----------------------------------------------------------------------------
# no training: LSH and ITQ
def lsh_codes(x_train, x, bits, seed=0):
    """LSH (random hyperplanes, Charikar 2002): projections of the features, centred by the
    training mean, onto `bits` Gaussian random directions; their signs are the codes. float32."""
    x_train = np.asarray(x_train, np.float64)
    w = np.random.default_rng(seed).standard_normal((x_train.shape[1], bits))
    return _project(x, x_train.mean(0), w)


def _project(x, mean, w, chunk=16384):
    """(x - mean) @ w, block by block in float64 (x may be a large float32 retrieval set); float32."""
    out = np.empty((len(x), w.shape[1]), np.float32)
    for a in range(0, len(x), chunk):
        out[a:a + chunk] = (np.asarray(x[a:a + chunk], np.float64) - mean) @ w
    return out


def _pca(x_train, bits):
    """(mean, P): the top `bits` principal directions of x_train as the columns of P, each with
    its largest-magnitude entry positive so the result does not depend on the eigen-solver."""
    from scipy.linalg import eigh
    mean = x_train.mean(0)
    xc = x_train - mean
    f = xc.shape[1]
    _, p = eigh(xc.T @ xc, subset_by_index=[f - bits, f - 1])
    p = p[:, ::-1]  # largest variance first
    p *= np.sign(p[np.abs(p).argmax(0), np.arange(bits)])
    return mean, p


def itq_codes(x_train, x, bits, iters=ITQ_ITERS, seed=0):
    """ITQ (Gong & Lazebnik, CVPR 2011): V = PCA projection of the centred features to
    `bits` dimensions (fitted on x_train); an orthogonal R, from a random start, minimising the
    quantization loss ||B - V R||_F^2 by alternating B = sign(V R) and R = U W^T from the SVD
    V^T B = U S W^T (the orthogonal Procrustes solution). Returns V R of x (float32)."""
    x_train = np.asarray(x_train, np.float64)
    if not 1 <= bits <= min(x_train.shape):
        raise ValueError(f'ITQ needs 1 <= bits <= min(train items, feature dim) = {min(x_train.shape)}, got {bits}')
    mean, p = _pca(x_train, bits)
    v = (x_train - mean) @ p
    r, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))  # random rotation
    for _ in range(iters):
        b = np.where(v @ r >= 0, 1.0, -1.0)  # fix R, update B
        u, _, wt = np.linalg.svd(v.T @ b)  # fix B, update R
        r = u @ wt
    return _project(x, mean, p @ r)


# -----------------------------------------------------------------------------
# CIBHash (unsupervised): contrastive learning of stochastic binary codes
class _SignSTE(torch.autograd.Function):
    """sign() forward (+1 at 0), identity backward: the straight-through estimator of CIBHash."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def nt_xent(z1, z2, temperature=CIB_TEMPERATURE):
    """NT-Xent (SimCLR): for each of the 2N codes, -log of the softmax over the other 2N - 1 codes
    (cosine similarity / temperature) at its other view; the mean over the 2N."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = (z @ z.T / temperature).fill_diagonal_(float('-inf'))  # a code is not its own candidate
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _bernoulli_kl(p, q, eps=1e-8):
    """KL(Bernoulli(p) || Bernoulli(q)) summed over the bits, mean over items; q is held fixed."""
    q = q.detach()
    kl = p * (torch.log(p + eps) - torch.log(q + eps)) + (1 - p) * (torch.log(1 - p + eps) - torch.log(1 - q + eps))
    return kl.sum(1).mean()


def cibhash_loss(h1, h2, temperature=CIB_TEMPERATURE, beta=CIB_BETA):
    """CIBHash on the relaxed codes h in (-1, 1)^L of two views (HashHead's tanh): the probability of
    bit +1 is p = (1 + h) / 2 (a sigmoid of the head's last layer); the codes b = sign(p - 1/2) pass
    the gradient straight through. Loss: NT-Xent(b1, b2) + beta * (KL(p1 || p2) + KL(p2 || p1)) / 2,
    each KL with its second argument held fixed, as the CIBHash code."""
    p1, p2 = (1 + h1) / 2, (1 + h2) / 2
    b1, b2 = _SignSTE.apply(p1 - 0.5), _SignSTE.apply(p2 - 0.5)
    kl = (_bernoulli_kl(p1, p2) + _bernoulli_kl(p2, p1)) / 2
    return nt_xent(b1, b2, temperature) + beta * kl


# -----------------------------------------------------------------------------
# product quantization (DQN, DVSQ, DTQ)
def pq_shape(bits, dim, words=PQ_WORDS):
    """M codebooks of `words` words for a `bits`-bit code of a `dim`-dimensional embedding."""
    per = int(np.log2(words))
    if 2 ** per != words or bits % per or dim % (bits // per):
        raise ValueError(f'product quantization of {bits} bits with {words}-word codebooks needs bits a multiple of '
                         f'{per} and the embedding dimension {dim} a multiple of the {bits / per:g} codebooks')
    return bits // per


def _sub(z, m):
    """z [N, D] as [N, M, D/M]: its M subvectors."""
    z = torch.as_tensor(z, dtype=torch.float32)
    return z.reshape(len(z), m, -1)


def pq_encode(z, codebooks, chunk=8192):
    """The nearest word of each subvector: codes [N, M] (int64); codebooks [M, K, D/M]."""
    c = torch.as_tensor(codebooks, dtype=torch.float32)
    zs = _sub(z, len(c))
    out = []
    for a in range(0, len(zs), chunk):
        x = zs[a:a + chunk].transpose(0, 1)  # [M, n, d]
        d = (c * c).sum(2)[:, None, :] - 2 * x @ c.transpose(1, 2)  # ||x - c||^2 - ||x||^2, [M, n, K]
        out.append(d.argmin(2).T)
    return torch.cat(out) if out else torch.zeros((0, len(c)), dtype=torch.long)


def pq_decode(codes, codebooks):
    """q(z): each item's words concatenated, [N, D]."""
    c = torch.as_tensor(codebooks)
    codes = torch.as_tensor(codes, dtype=torch.long, device=c.device)
    return torch.stack([c[m][codes[:, m]] for m in range(len(c))], 1).reshape(len(codes), -1)


def pq_fit(z, m, iters=PQ_FIT_ITERS, codebooks=None, words=PQ_WORDS, seed=0):
    """Codebooks [M, K, D/M] minimising sum_i ||z_i - q(z_i)||^2: Lloyd's k-means in each subspace,
    from `codebooks` or from K distinct training subvectors drawn at random (with repeats when
    there are fewer than K items: surplus words then stay unused). A word no item chose keeps its
    place."""
    zs = _sub(z, m)
    if codebooks is None:
        g = torch.Generator().manual_seed(seed)
        pick = (torch.randperm(len(zs), generator=g) if len(zs) >= words
                else torch.randint(len(zs), (words,), generator=g))
        codebooks = zs[pick[:words]].transpose(0, 1).clone()  # [M, K, d]
    c = torch.as_tensor(codebooks, dtype=torch.float32).clone()
    for _ in range(iters):
        codes = pq_encode(zs.reshape(len(zs), -1), c)
        for k in range(m):
            total = torch.zeros_like(c[k]).index_add_(0, codes[:, k], zs[:, k])
            count = torch.bincount(codes[:, k], minlength=words).to(c.dtype)
            used = count > 0
            c[k][used] = total[used] / count[used, None]
    return c


def pq_loss(z, q):
    """Quantization loss of DQN and DTQ: mean over items of ||z_i - q(z_i)||^2."""
    return ((z - q) ** 2).sum(1).mean()


def dqn_loss(z, s):
    """DQN, pairwise cosine loss: mean over pairs i != j of (s_ij - cos(z_i, z_j))^2 with s_ij = +1
    for a similar pair and -1 for a dissimilar one (DeepHash's DQN maps its 0/1 similarity so)."""
    s = torch.as_tensor(s, device=z.device).to(z.dtype) * 2 - 1
    cos = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T
    return ((s - cos) ** 2)[_pair_mask(s)].mean()


def dvsq_loss(z, labels, v):
    """DVSQ, adaptive-margin loss against the labels' word vectors v [C, D]: for each item i, each
    of its labels y and each label j it does not have,
        max(0, delta_yj - cos(z_i, v_y) + cos(z_i, v_j)),  delta_yj = 1 - cos(v_y, v_j)
    (a margin as wide as the two labels are far apart), summed and divided by C times the number
    of (item, label) pairs. The j are the labels the item lacks, as the DVSQ paper writes it;
    DeepHash's cos_softmargin_multi_label (same margin and divisor) also runs j over the item's
    other labels, which differs on multi-label items only."""
    y = torch.as_tensor(labels, device=z.device).to(z.dtype)
    v = F.normalize(torch.as_tensor(v, device=z.device).to(z.dtype), dim=1)
    cos = F.normalize(z, dim=1) @ v.T                          # [N, C]
    delta = 1 - v @ v.T                                        # [C, C]
    hinge = (delta[None] - cos[:, :, None] + cos[:, None, :]).clamp(min=0)  # [N, y, j]
    keep = y[:, :, None] * (1 - y)[:, None, :]                 # y a label of i, j not
    return (hinge * keep).sum() / (y.shape[1] * y.sum()).clamp(min=1)


def dvsq_quant_loss(z, q, v):
    """DVSQ's quantization loss: the error z - q(z) seen through the word vectors,
    mean over items of ||V (z_i - q(z_i))||^2."""
    v = F.normalize(torch.as_tensor(v, device=z.device).to(z.dtype), dim=1)
    return (((z - q) @ v.T) ** 2).sum(1).mean()


def dtq_triplets(z, s, margin=DTQ_MARGIN, gen=None):
    """DTQ's group-hard triplets inside a batch (the group): for every anchor a and positive p != a,
    one negative n drawn at random among those with d(a, n) < d(a, p) + margin (the triplets that
    still have a loss); d the squared Euclidean distance. Returns (a, p, n) index tensors."""
    s = torch.as_tensor(s, device=z.device).bool()
    with torch.no_grad():
        d = torch.cdist(z, z) ** 2
        neg_d = d.masked_fill(s, float('inf'))                   # non-negatives sorted last
        sorted_d, order = neg_d.sort(1)
        below = torch.searchsorted(sorted_d, d + margin, right=False)  # [a, p]: negatives of a within d(a, p) + margin
        a, p = (s & _pair_mask(s) & (below > 0)).nonzero(as_tuple=True)
        count = below[a, p]
        u = torch.rand(len(a), generator=gen).to(z.device) if gen is not None else torch.rand(len(a), device=z.device)
        n = order[a, (u * count).long().clamp(max=count - 1)]
    return a, p, n


def dtq_loss(z, s, margin=DTQ_MARGIN, gen=None):
    """DTQ, triplet loss: mean over the group-hard triplets of max(0, d(a, p) - d(a, n) + margin),
    d the squared Euclidean distance; 0 (with a gradient of zeros) when the batch has none."""
    a, p, n = dtq_triplets(z, s, margin, gen)
    if len(a) == 0:
        return z.sum() * 0
    d_ap = ((z[a] - z[p]) ** 2).sum(1)
    d_an = ((z[a] - z[n]) ** 2).sum(1)
    return (d_ap - d_an + margin).clamp(min=0).mean()


# -----------------------------------------------------------------------------
# the baselines as train.py runs them: which inputs each reads, and its loss on a mini-batch
METHODS = {'duheg': 'this paper', 'ssdh': 'SSDH, unsupervised', 'cibhash': 'CIBHash, unsupervised',
           'dhn': 'DHN, supervised', 'dch': 'DCH, supervised', 'dqn': 'DQN, supervised, quantization',
           'dvsq': 'DVSQ, supervised, quantization', 'dtq': 'DTQ, supervised, quantization',
           'lsh': 'random projection, no training', 'itq': 'PCA-ITQ, no training'}
SUPERVISED = frozenset({'dhn', 'dch', 'dqn', 'dvsq', 'dtq'})  # baselines that read the training labels
UNTRAINED = frozenset({'lsh', 'itq'})   # baselines fitted in closed form: no heads, no epochs
QUANTIZED = frozenset({'dqn', 'dvsq', 'dtq'})  # product-quantized codes, ranked by AQD (eval_hash.map_aqd)
TWO_VIEWS = frozenset({'cibhash'})      # baselines trained on two augmented views, as DUH-EG
PAIR_LOSSES = {'ssdh': ssdh_loss, 'dhn': dhn_loss, 'dch': dch_loss}
QUANT_LAMBDA = {'dqn': DQN_LAMBDA, 'dvsq': DVSQ_LAMBDA, 'dtq': DTQ_LAMBDA}


def similarity(method, x_train, y_train):
    """The pairwise similarity (N x N) a baseline's loss reads: SSDH's from the features, the
    supervised ones' from the labels (DVSQ reads the labels themselves); None for the others."""
    if method == 'ssdh':
        return ssdh_similarity(x_train)
    if method in SUPERVISED and method != 'dvsq':
        return label_similarity(y_train)
    return None


def out_dim(method, bits, v=None):
    """Hv's outputs: the code length, or the quantization methods' embedding D (DVSQ: the word vectors')."""
    if method not in QUANTIZED:
        return bits
    return len(v[0]) if method == 'dvsq' else PQ_DIM


def untrained_codes(method, x_train, xs, bits, seed=0):
    """LSH's or ITQ's continuous codes of each feature matrix of `xs`, fitted on x_train."""
    fit = lsh_codes if method == 'lsh' else itq_codes
    return [fit(x_train, x, bits, seed=seed) for x in xs]


def batch_loss(method, hv, x, idx, views, s=None, y=None, v=None, gen=None, pq=None):
    """A baseline's loss on the mini-batch `idx`, on Hv alone (train.py's Algorithm 2 loop calls it in
    place of L_BCL): features x, the batch's two augmented views `views` (CIBHash), the similarity
    s, labels y and word vectors v (DVSQ), the run's generator (DTQ's negatives), and pq, the
    (codes, codebooks) of the quantization methods after their first fit (refit_codebooks)."""
    if method in TWO_VIEWS:  # CIBHash: two augmented views of each image
        return cibhash_loss(hv(views[0]), hv(views[1]))
    if method not in QUANTIZED:  # a pairwise loss
        return PAIR_LOSSES[method](hv(x[idx]), s[idx][:, idx])
    z = hv(x[idx])  # DQN, DVSQ, DTQ: similarity loss + lambda * quantization loss (lambda 0 before the first fit)
    if method == 'dvsq':
        loss = dvsq_loss(z, y[idx], v)
    elif method == 'dtq':  # Group-Hard negatives drawn with the run's generator
        loss = dtq_loss(z, s[idx][:, idx], gen=gen)
    else:
        loss = dqn_loss(z, s[idx][:, idx])
    if pq is not None:
        q = pq_decode(pq[0][idx], pq[1])
        loss = loss + QUANT_LAMBDA[method] * (dvsq_quant_loss(z, q, v) if method == 'dvsq' else pq_loss(z, q))
    return loss


def refit_codebooks(z_all, bits, codebooks, seed, device):
    """The product quantizer after an epoch (fitted on the CPU from every training item's z, refined
    from the current codebooks after the first fit, as DeepHash): (codebooks, (codes, codebooks)
    on `device` for batch_loss)."""
    m = pq_shape(bits, z_all.shape[1])
    first = codebooks is None
    codebooks = pq_fit(z_all, m, PQ_FIT_ITERS if first else PQ_UPDATE_ITERS, codebooks, seed=seed)
    return codebooks, (pq_encode(z_all, codebooks).to(device), codebooks.to(device))


def class_vectors(path, n_classes, clip_model, clip_pretrained, device='cpu'):
    """DVSQ's word vectors of the labels (n_classes x D, unit rows, label order): the CLIP text
    features of the class names in `path` (one a line) through Eq. 2's prompt ensemble (word2vec in
    the DVSQ paper)."""
    import os
    import dataset
    import models
    from cache import CacheError
    from nouns_embed import embed_words
    if not os.path.isfile(path):
        raise CacheError(f"{path} does not exist: DVSQ needs the labels' names (dataset_extract.py writes "
                         f"classes.txt; or give --class_names=FILE, one name a line in label order)")
    names = [w.strip() for w in dataset.read_lines(path)]
    if len(names) != n_classes or not all(names):
        raise dataset.DataError(f"{path} has {len(names)} names{' (some empty)' if not all(names) else ''} but the "
                                f"labels have {n_classes} classes: give one name a line, in label order")
    if all(w.isdigit() for w in names):
        raise dataset.DataError(f"{path} holds class numbers, not names: DVSQ's word vectors are the CLIP text "
                                f"features of the names; write them one a line in label order and pass "
                                f"--class_names=FILE")
    model, _, tokenizer = models.load_clip(clip_model, clip_pretrained, device)
    return embed_words(names, model, tokenizer, device=device)
