"""HHCH on frozen features: Wei, Liu, Song, Xie, Zhou, "Exploring Hierarchical Information in Hyperbolic
Space for Self-Supervised Image Hashing", IEEE TIP 33:1768-1781, 2024 (arXiv 2212.08904, "Hyperbolic
Hierarchical Contrastive Hashing"), a competitor of DUH-EG's Table 1.

Port of the trainable part of the authors' release, github.com/HUST-IDSM-AI/HHCH at commit
47eac18aedf3a2f8623002a702da28aec8aafd0b (2024-03-15), read in full; file:line below refer to it:
src/main.py (the loop), src/Loss.py (the losses), src/models/model.py (the head), src/models/clustering.py
and src/models/k_means.py (hierarchical hyperbolic K-Means), src/hyptorch/{nn,pmath}.py (the Poincaré ball),
src/options.py and README.md (defaults). The hyperbolic operations are written here with hyptorch's numerics
(its clamps and 1e-5 terms), not imported; tests/test_hhch.py checks them, the losses and the clustering
against the authors' code (live, and through tests/golden/hhch.npz).

    head = build_head(in_dim, bits); opt = optimizer(head)  # train.train_competitor: each step, step_lr (= lr_at(e))
    state = epoch_start(head, x_train, aug, e, gen, device)  # ball points of the train set, then K-Means
    loss = batch_loss(head, x[idx], v1, v2, idx, state, e, gen)  # L_HIC + L_HPC + lambda_q * L_Q
    codes = head(x)                                       # in (-1, 1); their binary code is h >= 0 -> +1

What is followed: the head (model.py:33-39, 56-67), the losses exactly as computed (Loss.py:73-103 L_HIC,
applied both ways main.py:148-156; Loss.py:132-154 L_HPC; main.py:141-145 L_Q; main.py:206 their sum), the
per-epoch hierarchical hyperbolic K-Means on the embeddings of the un-augmented train images with the head
in eval mode (main.py:43-65, 92-100; clustering.py:41-69; k_means.py:103-128, 206-305: 30 iterations, empty
clusters dropped, Einstein midpoints, each level clustering the previous level's centroids), parse_proto's
chaining of the levels (Loss.py:107-129), Adam with their learning rate and step schedule (main.py:73,
model.py:89-93, util.py:33-43). L_HIC and L_HPC are on, as in the README's run (README.md:36: --HIC --HPC;
both flags default off in options.py:45-46, which would train on L_Q alone).

Departures, each for a reason:
- Features: the project's stored CLIP ViT-B/16 or VGG-16 features, not VGG19 fc7 (model.py:28-29). Their
  frozen VGG19 is put in train mode with the head (main.py:180), so its two dropout layers (p 0.5, fc6 and
  fc7, inside classifier[:6]) drop parts of v1's and v2's features at every step; stored features cannot
  redo the fc6 one and CLIP has none, so no backbone dropout here.
- Views: (v1, v2) are the harness's stored augmented views, not their on-the-fly transforms
  (DataSet_loader.py:18-25).
- What is clustered: the plain view x_train. Theirs is the "origin" image through test_transforms, which for
  Flickr25K, NUS-WIDE, COCO and ImageNet is a RandomResizedCrop (DataSet_loader.py:26-30, data_list.py:135),
  a fresh random crop each epoch; for CIFAR-10 a plain resize, as here. Their clustering does run in eval
  mode (main.py:45: no dropout), as here.
- Initial centres: K distinct rows drawn uniformly from `gen`. Theirs (pyclustering's
  random_center_initializer, clustering.py:55) reseeds Python's `random` from the clock at every call (not
  reproducible) and draws with replacement, replacing a repeated or out-of-range draw (randint(0, N) includes
  N) by an arbitrary unused row. With K >= N both use every point in order; theirs raises for K > N, ours
  then keeps the N points (a level can have fewer points than its K: empty clusters are dropped below it).
- K-Means distances: ||(-x) (+)_c y|| from Gram products (N x K), not a Möbius sum per centre over an
  N x D array (k_means.py:269-281); the same formula and 1e-5 term, equal up to rounding, and fast enough for
  every epoch. The losses use the materialised pairwise Möbius sum, as theirs.
- L_HPC's positive is read from the item-to-all-prototypes matrix at the item's own prototype, not from
  the diagonal of a batch x batch matrix (Loss.py:145, 148): the same value.
- Dropout of the head (p 0.1) draws from torch's global generator (the harness seeds it), not from `gen`.
Not ported (evaluation, done by the harness): their test images also pass through RandomResizedCrop
(DataSet_loader.py:26-30), and their MAP skips queries without labels (measure_utils.py:96-97).

Equation names follow the paper's terms (hierarchical instance-wise and prototype-wise contrastive learning,
L_HIC and L_HPC; the quantization loss L_Q); the paper's equation numbers are not cited, as only the arXiv
text, numbered differently from TIP's, was at hand.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# loss (src/options.py)
TAU = 0.3            # temperature of L_HIC and L_HPC (options.py:11)
LAMBDA_Q = 0.01      # weight of the quantization loss L_Q (options.py:25)
# hyperbolic space
HYPER_C = 0.01       # c, the ball's curvature is -c (options.py:36; the README's run, README.md:36, uses 0.1);
                     # 0: their sphere mode, codes compared by cosine, no ball (Loss.py:75-78, model.py:60-63)
CLIP_R = 2.3         # feature clipping radius before Exp_0 (options.py:37, model.py:35-38)
HYPER_DIM = 128      # dimension of the Poincaré ball (options.py:38, model.py:39)
# head on a frozen feature (model.py:33-34)
HIDDEN = 512         # hidden width: Linear(F, 512), Dropout, ReLU, Linear(512, bits), tanh
DROPOUT = 0.1        # dropout after the first Linear
# hierarchical hyperbolic K-Means (clustering.py:41-69, k_means.py)
CLUSTERS = (150, 120, 80)  # prototypes per level, fine to coarse (options.py:48; ImageNet in README.md:36:
                           # 1500, 1000, 800)
KMEANS_ITERS = 30    # iterations per level (clustering.py:57, 62: itermax=30)
KMEANS_TOL = 0.001   # stop when the centres move less (k_means.py:22); see _change: never, in practice
# optimizer (src/main.py:73, model.py:89-93: Adam, two groups at the same rate, Adam's other defaults)
LR = 1e-3            # options.py:13 (the README's ImageNet run, README.md:36, uses 1e-4)
LR_DECAY = 0.9       # from epoch LR_DECAY_START on, lr = LR * LR_DECAY ** (epoch // LR_DECAY_EVERY) (util.py:33-43)
LR_DECAY_START = 30
LR_DECAY_EVERY = 20
EPOCHS = 80          # options.py:15 (README.md:36: 60)
BATCH_SIZE = 64      # options.py:20; the last, smaller batch is kept (DataSet_loader.py:69-70: no drop_last)

_HUGE = 1e9          # what masked logits lose (Loss.py:88, 95)
_PROTO_EPS = torch.tensor(1e-5)  # added to L_HPC's denominators, a float32 scalar as theirs (Loss.py:146, 149)


# -----------------------------------------------------------------------------
# The Poincaré ball of curvature -c, with hyptorch's numerics (pmath.py)
class _Artanh(torch.autograd.Function):
    """artanh on [-1 + 1e-5, 1 - 1e-5]; its gradient 1 / (1 - x^2) at the clamped x passes also where the
    clamp is active (pmath.py:16-27)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clamp(-1 + 1e-5, 1 - 1e-5)
        ctx.save_for_backward(x)
        return 0.5 * (torch.log(1 + x) - torch.log(1 - x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (1 - x ** 2)


def artanh(x):
    return _Artanh.apply(x)


def clip_features(u, r):
    """Feature clipping (Guo et al., CVPR 2022): u * min(1, r / (||u|| + 1e-5)) (nn.py:155-161)."""
    norm = torch.norm(u, dim=-1, keepdim=True) + 1e-5
    return u * torch.minimum(torch.ones_like(norm), r / norm)


def expmap0(u, c):
    """Exp_0(u) = tanh(sqrt(c) ||u||) u / (sqrt(c) ||u||), ||u|| >= 1e-5, tanh's input in [-15, 15]
    (pmath.py:279-303; no 1/2: the ball's radius is 1/sqrt(c))."""
    c = torch.as_tensor(c).type_as(u)
    sqrt_c = c ** 0.5
    norm = torch.clamp_min(u.norm(dim=-1, p=2, keepdim=True), 1e-5)
    return (sqrt_c * norm).clamp(-15, 15).tanh() * u / (sqrt_c * norm)


def project(x, c):
    """Points beyond radius (1 - 1e-3) / sqrt(c) pulled back onto it (pmath.py:75-102)."""
    c = torch.as_tensor(c).type_as(x)
    norm = torch.clamp_min(x.norm(dim=-1, keepdim=True, p=2), 1e-5)
    edge = (1 - 1e-3) / (c ** 0.5)
    return torch.where(norm > edge, x / norm * edge, x)


def mobius_add_pairs(x, y, c):
    """x_i (+)_c y_j for every pair, B x C x D: Möbius addition
    ((1 + 2c<x,y> + c|y|^2) x + (1 - c|x|^2) y) / (1 + 2c<x,y> + c^2 |x|^2 |y|^2 + 1e-5) (pmath.py:411-422)."""
    xy = torch.einsum('ij,kj->ik', x, y)
    x2 = x.pow(2).sum(-1, keepdim=True)
    y2 = y.pow(2).sum(-1, keepdim=True).T
    num = (1 + 2 * c * xy + c * y2).unsqueeze(2) * x.unsqueeze(1) + (1 - c * x2).unsqueeze(2) * y
    den = (1 + 2 * c * xy) + c ** 2 * x2 * y2
    return num / (den.unsqueeze(2) + 1e-5)


def poincare_dist(x, y, c):
    """d_c(x_i, y_j) = 2 / sqrt(c) artanh(sqrt(c) ||(-x_i) (+)_c y_j||), B x C (pmath.py:478-503)."""
    c = torch.as_tensor(c).type_as(x)
    sqrt_c = c ** 0.5
    return 2 / sqrt_c * artanh(sqrt_c * torch.norm(mobius_add_pairs(-x, y, c), dim=-1))


def similarity(x, y, c):
    """The similarity of both losses: minus the Poincaré distance; cosine in the sphere mode c = 0 (Loss.py:75-78)."""
    if c == 0:
        return F.normalize(x, dim=1) @ F.normalize(y, dim=1).t()
    return -poincare_dist(x, y, c)


class ToBall(nn.Module):
    """Clipped Euclidean vectors into the ball: project(Exp_0(clip(u))) (hyptorch's ToPoincare with
    riemannian=False, no trained base point: nn.py:154-166, model.py:35-38)."""

    def __init__(self, c, clip_r):
        super().__init__()
        self.c, self.clip_r = c, clip_r

    def forward(self, u):
        return project(expmap0(clip_features(u, self.clip_r), self.c), self.c)

    def extra_repr(self):
        return f'c={self.c}, clip_r={self.clip_r}'


class Head(nn.Module):
    """HHCH's trained part on a frozen feature (model.py:33-39): hash_layer, F -> 512 -> bits, tanh: the
    codes h; head, Linear(bits -> 128) into the Poincaré ball: the points p that both losses compare. The
    submodule names are theirs, so their checkpoint's hash_layer.* and head.* load."""

    def __init__(self, in_dim, bits):
        super().__init__()
        self.c = HYPER_C
        self.hash_layer = nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.Dropout(DROPOUT), nn.ReLU(),
                                        nn.Linear(HIDDEN, bits))
        self.head = nn.Sequential(nn.Linear(bits, HYPER_DIM), ToBall(HYPER_C, CLIP_R))

    def forward(self, x):
        """The continuous codes h = tanh(hash_layer(x)) in (-1, 1) (model.py:85)."""
        return torch.tanh(self.hash_layer(x))

    def embed(self, x):
        """(h, p): the codes and their points in the ball (p = h in the sphere mode, model.py:56-67)."""
        h = self(x)
        return h, (h if self.c == 0 else self.head(h))


# -----------------------------------------------------------------------------
# Losses (Loss.py, main.py:141-176, 206)
def false_negative_mask(proto_index_level):
    """Items of the batch that share a prototype at this level, i != j, for both halves of the logits
    [x0 . x1, x0 . x0] (Loss.py:61-69): B x 2B, 1 where masked."""
    same = proto_index_level[:, None] == proto_index_level[None, :]
    same.fill_diagonal_(False)
    return torch.cat([same, same], dim=1)


def hic_term(x0, x1, proto_index, tau, c):
    """L_HIC one way (Loss.py:73-103): at each level l, InfoNCE of x0_i against [x1, x0] with positive x1_i,
    itself and the items of its own level-l prototype removed from the negatives; level l weighs 1 / (l + 1),
    the sum is divided by the number of levels."""
    levels, b = proto_index.shape[1], x0.shape[0]
    eye = torch.eye(b, dtype=x0.dtype, device=x0.device) * _HUGE
    logits01 = similarity(x0, x1, c) / tau  # the same at every level (their loop recomputes it)
    logits00 = similarity(x0, x0, c) / tau - eye
    positive = torch.diag(logits01)
    total = 0
    for level in range(levels):
        mask = false_negative_mask(proto_index[:, level]).to(x0.dtype)
        logits = torch.cat([logits01, logits00], dim=1) - mask * _HUGE
        loss = torch.mean(-torch.log(torch.exp(positive) / torch.sum(torch.exp(logits), dim=1)))
        total += (1 / (level + 1)) * loss
    return total / levels


def hic_loss(p1, p2, proto_index, tau, c):
    """L_HIC, both ways: (hic_term(p1, p2) + hic_term(p2, p1)) / 2 (main.py:148-156)."""
    return (hic_term(p1, p2, proto_index, tau, c) + hic_term(p2, p1, proto_index, tau, c)) / 2


def hpc_loss(p1, p2, prototypes, proto_index, tau, c):
    """L_HPC (Loss.py:132-154): at each level l, for both views, -log of exp(s(p_i, own prototype) / tau) over
    the sum of exp(s(p_i, every level-l prototype) / tau) + 1e-5; level l weighs 1 / (l + 1), the sum is
    divided by the number of levels. epoch_start keeps the prototypes in float32, as theirs (Loss.py:136, 144)."""
    total = 0
    for level, proto in enumerate(prototypes):
        proto = proto.to(p1)
        own = proto_index[:, level, None]
        loss = 0
        for z in (p1, p2):
            e = torch.exp(similarity(z, proto, c) / tau)
            loss = loss - torch.log(e.gather(1, own)[:, 0] / (torch.sum(e, dim=1) + _PROTO_EPS))
        total += (1 / (level + 1)) * loss.mean()
    return total / len(prototypes)


def quantization_loss(h1, h2):
    """L_Q = (mean((|h1| - 1)^2) + mean((|h2| - 1)^2)) / 2 (main.py:141-145)."""
    return (torch.mean((torch.abs(h1) - 1) ** 2) + torch.mean((torch.abs(h2) - 1) ** 2)) / 2


def total_loss(h1, p1, h2, p2, proto_index, prototypes, tau, lambda_q, c):
    """L_HIC + lambda_q L_Q + L_HPC, summed in their order (main.py:206), from the two views' codes h and
    points p, the batch's prototype indices (B x L) and each level's prototypes."""
    return (hic_loss(p1, p2, proto_index, tau, c) + lambda_q * quantization_loss(h1, h2)
            + hpc_loss(p1, p2, prototypes, proto_index, tau, c))


# -----------------------------------------------------------------------------
# Hierarchical hyperbolic K-Means (clustering.py:41-69, k_means.py)
def draw_centers(n, k, gen):
    """Rows of the k initial centres among n points: k distinct rows drawn from `gen`; every row, in order,
    when k >= n (pyclustering's initializer returns all points when k == n; it raises for k > n)."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:k]


def _distance(x, y, c):
    """K-Means' distance from each x_i to each y_k, N x K, float64: the Poincaré distance (k_means.py:269-281,
    pmath.py:487-498), ||(-x) (+)_c y||^2 expanded in <x, y>, |x|^2, |y|^2; squared Euclidean when c = 0."""
    x2, y2 = x.pow(2).sum(1, keepdim=True), y.pow(2).sum(1)[None]
    if c == 0:
        return (x2 - 2 * (x @ y.T) + y2).clamp_min(0)
    xy = -(x @ y.T)  # <-x, y>
    a, b = 1 + 2 * c * xy + c * y2, 1 - c * x2
    num = (a * a * x2 + 2 * a * b * xy + b * b * y2).clamp_min(0).sqrt()
    den = 1 + 2 * c * xy + c ** 2 * x2 * y2 + 1e-5
    sqrt_c = c ** 0.5
    return 2 / sqrt_c * artanh(sqrt_c * num / den)


def _centroids(x, labels, k, c):
    """Each cluster's Einstein midpoint: to Klein coordinates, Lorentz-weighted mean, back to the ball
    (k_means.py:236-254, pmath.py:435-464); the arithmetic mean when c = 0."""
    if c == 0:
        return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / \
            torch.zeros(k, 1, dtype=x.dtype).index_add_(0, labels, torch.ones(len(x), 1, dtype=x.dtype))
    klein = 2 * x / (1 + c * x.pow(2).sum(-1, keepdim=True))
    gamma = 1 / torch.sqrt(1 - c * klein.pow(2).sum(-1, keepdim=True))
    mean = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, gamma * klein) / \
        torch.zeros(k, 1, dtype=x.dtype).index_add_(0, labels, gamma)
    return mean / (1 + torch.sqrt(1 - c * mean.pow(2).sum(-1, keepdim=True)))


def _change(old, new, c):
    """How far the centres moved (k_means.py:283-305): with c > 0 the largest distance over ALL pairs of old
    and new centres, not each centre to its update, so it stays above KMEANS_TOL and every level runs
    KMEANS_ITERS iterations; with c = 0 the largest squared move of a centre. inf when clusters were dropped."""
    if len(old) != len(new):
        return math.inf
    if c == 0:
        return float((old - new).pow(2).sum(1).max())
    return float(_distance(old, new, c).max())


def hyperbolic_kmeans(x, centers, c, iters, tol):
    """K-Means in the Poincaré ball from the given centres (k_means.py:103-128): assign each point to its
    nearest centre (first on ties), drop empty clusters keeping the others' order (k_means.py:224), move
    each centre to its cluster's Einstein midpoint; until the change is at most `tol` or after `iters`
    iterations. Returns (labels of the points, centres): the centres are the midpoints of those clusters."""
    change, labels = math.inf, None
    for _ in range(iters):
        if not change > tol:
            break
        _, labels = torch.unique(_distance(x, centers, c).argmin(1), sorted=True, return_inverse=True)
        new = _centroids(x, labels, int(labels.max()) + 1, c)
        change, centers = _change(centers, new, c), new
    return labels, centers


def hierarchical_kmeans(points, clusters, c, draw, iters=None, tol=None):
    """Hierarchical hyperbolic K-Means (clustering.py:41-69): level 0 clusters the points, each next level
    clusters the previous level's centroids; draw(n, k) gives the rows of the initial centres. Returns
    (prototypes: per level a K_l x D float64 tensor, labels: per level the cluster of each of its inputs)."""
    iters, tol = KMEANS_ITERS if iters is None else iters, KMEANS_TOL if tol is None else tol
    data, prototypes, labels = points.to(torch.float64), [], []
    for k in clusters:
        lab, data = hyperbolic_kmeans(data, data[draw(len(data), k)], c, iters, tol)
        prototypes.append(data)
        labels.append(lab)
    return prototypes, labels


def proto_indices(labels):
    """Each item's prototype at every level, N x L, the levels chained (parse_proto, Loss.py:107-129)."""
    index = [labels[0]]
    for lab in labels[1:]:
        index.append(lab[index[-1]])
    return torch.stack(index, dim=1)


# -----------------------------------------------------------------------------
# What the training harness calls
def build_head(in_dim, bits, dataset=None, n_classes=None):
    """The head of a run (train.train_competitor; neither the dataset nor its label count changes it)."""
    return Head(in_dim, bits)


def starts_phase(epoch):
    """One phase: one optimiser, built before the first epoch (main.py:73)."""
    return epoch == 0


def optimizer(head, epoch=0):
    """Adam on the two parts at LR, Adam's other defaults (main.py:73, model.py:89-93)."""
    return torch.optim.Adam([{'params': head.hash_layer.parameters(), 'lr': LR},
                             {'params': head.head.parameters(), 'lr': LR}], lr=LR)


def lr_at(epoch):
    """Their step schedule: LR before epoch LR_DECAY_START, then LR * LR_DECAY ** (epoch // LR_DECAY_EVERY)
    (util.py:33-43), set into every group at the start of the epoch (main.py:86)."""
    return LR if epoch < LR_DECAY_START else LR * LR_DECAY ** (epoch // LR_DECAY_EVERY)


def step_lr(epoch, step, steps_per_epoch, epochs):
    """The rate of every step of `epoch` (train.train_competitor sets it before each step): lr_at(epoch)."""
    return lr_at(epoch)


@torch.no_grad()
def ball_points(head, x, device, chunk=4096):
    """The points p of the plain features in the ball, head in eval mode (compute_features, main.py:43-65),
    as float64 on the CPU; the head's mode is restored."""
    mode = head.training
    head.eval()
    try:
        return torch.cat([head.embed(torch.as_tensor(x[a:a + chunk]).to(device).float())[1].double().cpu()
                          for a in range(0, len(x), chunk)])
    finally:
        head.train(mode)


def epoch_start(head, x_train, aug, epoch, gen, device):
    """Before each epoch's batches (main.py:92-100): hierarchical hyperbolic K-Means of the train set's
    points in the ball. Returns the state batch_loss reads: the prototypes of each level (float32, on
    `device`) and each train item's prototype at every level (N x L). `aug` and `epoch` are not used."""
    points = ball_points(head, x_train, device)
    prototypes, labels = hierarchical_kmeans(points, CLUSTERS, head.c, lambda n, k: draw_centers(n, k, gen))
    return {'prototypes': [p.float().to(device) for p in prototypes],
            'proto_index': proto_indices(labels).to(device)}


def batch_loss(head, x, v1, v2, idx, state, epoch, gen):
    """L_HIC + lambda_q L_Q + L_HPC on the two views of the batch's items (main.py:198-206); idx are their rows
    of x_train, for their prototypes. The plain features x only enter through epoch_start's clustering."""
    h1, p1 = head.embed(v1)
    h2, p2 = head.embed(v2)
    index = state['proto_index'][torch.as_tensor(idx, device=state['proto_index'].device)].to(p1.device)
    return total_loss(h1, p1, h2, p2, index, state['prototypes'], TAU, LAMBDA_Q, head.c)
