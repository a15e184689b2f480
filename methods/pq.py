"""Product quantization and the supervised quantization baselines DQN, DVSQ and DTQ (they read the training labels:
upper bounds, not competitors of an unsupervised method).

They learn a continuous embedding z (a HashHead with D outputs, trained by train.py's loop) and a product quantizer
of it: M = bits / 8 codebooks of K = 256 words, each over D / M dimensions; an item's code is its M word indices
(8 bits each), and the retrieval set is ranked by the asymmetric quantizer distance between the query's z and the
items' quantized z (eval_hash.map_aqd).

    C = pq_fit(z_train, M)                       # k-means in each subspace, M x K x D/M
    codes = pq_encode(z, C)                      # N x M word indices
    loss = dqn_loss(z, s) + DQN_LAMBDA * pq_loss(z, pq_decode(codes, C))
"""
import numpy as np
import torch
import torch.nn.functional as F

from methods.pairwise import pair_mask

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
    return ((s - cos) ** 2)[pair_mask(s)].mean()


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
        a, p = (s & pair_mask(s) & (below > 0)).nonzero(as_tuple=True)
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

