"""Pairwise baselines on the relaxed codes h in (-1, 1)^L of a HashHead (models.py), trained by train.py's loop on
frozen features (baselines.batch_loss): SSDH (unsupervised: its similarity comes from the features' cosine
distances) and DeepHash's DHN and DCH (supervised: they read the training labels, so they are upper bounds, not
competitors of an unsupervised method). Every loss is a torch scalar that works on any batch of two or more items.

    s = ssdh_similarity(x_train)                 # once, N x N int8 in {+1, -1, 0}
    loss = ssdh_loss(h, s[idx][:, idx])          # per batch
    loss = dhn_loss(h, label_similarity(y[idx])) # or dch_loss(...)
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


def pair_mask(s):
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
    return pair[pair_mask(s)].mean() + lam * quant.mean()


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
    pairs = pair_mask(s)
    d = _hamming_relaxed(h, h)
    ce = s * torch.log1p(d / gamma) + (1 - s) * torch.log1p(gamma / d.clamp(min=DCH_EPS))
    s, ce = s[pairs], ce[pairs]
    n, n1 = s.numel(), s.sum()
    w = torch.where(s > 0, n / n1.clamp(min=1), n / (n - n1).clamp(min=1))  # class-imbalance weights
    quant = torch.log1p(_hamming_relaxed(h.abs(), torch.ones_like(h[:1])).squeeze(1) / gamma)
    return (w * ce).mean() + lam * quant.mean()

