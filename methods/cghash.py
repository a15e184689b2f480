"""CGHash (Song, Su and Chen, "Unsupervised Hashing with Contrastive Learning by Exploiting Similarity Knowledge
and Hidden Structure of Data", ACM MM 2023) as a head on the project's frozen features: a port of the trainable
part of the authors' code, github.com/KARLSZP/CGHash at e5bf6b1fe955d44dfa081c4f02a4c250330a6d7d (2023-08-01,
the newest commit; cited below as file:line of that commit). The paper's full text was not at hand, so the
comments name the loss terms and the code that computes them, not equation numbers.

Their method, as run_cifar10.sh runs it (mine_neighbors.py, then cghash.py, then selflabel.py):
  0. k-NN mining, once, before training: the 20 nearest train images of each train image by the dot product of
     L2-normalised pretrained features, itself included (memory_bank.py:24-25, mine_neighbors.py:39-45).
  1. SCAN_EPOCHS (cghash.py): an anchor view and a view of one of its k + 1 mined neighbours, drawn uniformly
     each epoch (custom_dataset.py:64, 76); stochastic codes z = sign(sigmoid(proj / tau) - u), u ~ U(0, 1),
     straight-through (models.py:58-62, 88-95); pseudo-label logits = Linear(z) (models.py:41);
     loss = -log <p_a, p_n> + 5 (-H(mean p_a)) + H(p_a) + 0.1 masked code contrast (cghash_train.py:41-61).
  2. SELFLABEL_EPOCHS (selflabel.py): cross-entropy on a strong view against the plain view's pseudo-label where
     its probability exceeds 0.9, class-balanced (selflabel_train.py:26-36, losses.py:182-221).

How train.py's loop drives it (plain functions; x_train, aug as train.train_competitor holds them):
    head = build_head(F, bits, dataset, n_classes).to(device)     # Head(F, bits, clusters_for(dataset, n_classes))
    for epoch in range(EPOCHS):
        if starts_phase(epoch): opt = optimizer(head, epoch)   # a fresh Adam per phase, constant lr (step_lr)
        state = epoch_start(head, x_train, aug, epoch, gen, device)
        for idx in batches: loss = batch_loss(head, x_train[idx], v1, v2, idx, state, epoch, gen)
    codes = sign(head(x))                                          # head(x) in (-1, 1), deterministic

Departures from their code, and why:
  - Frozen features: their configs fine-tune a SimCLR ResNet-18 (cghash_cifar10_64.yml:28-29); we train their
    frozen-backbone path (cghash_train.py:17-18, 33-38), the projector and predictor on the project's features.
    The projector keeps their shape in_dim -> in_dim // 4 -> bits (models.py:36-41): 128 hidden for CLIP 512-d.
  - Mining on the frozen feature itself (cosine), not on the SimCLR model's 128-d MLP-head output
    (mine_cifar10.yml:18-20, 28; models.py:27), which we do not have.
  - Views: the anchor is the stored view v1 (theirs a fresh RandAugment(4) + cutout view, cghash_cifar10_64.yml:
    10-20; the dataset gets one transform, cghash.py:71-72, so anchor and neighbour share it, custom_dataset.py:
    56-57); the neighbour is a stored view of the mined neighbour drawn with `gen`; self-labelling's strong view
    is v1 too (theirs RandAugment(8) + two cutout holes, selflabel_cifar10_64.yml:16-18): one recipe is stored.
  - No label-based selection: their cghash.py keeps the checkpoint of best test mAP every 20 epochs and stops
    after five evaluations without gain (cghash.py:19, 150-186); selflabel.py starts from that checkpoint
    (selflabel.py:60) and keeps its own best (selflabel.py:168-185). That reads the test labels; we train all
    200 + 200 epochs and keep the last head.
  - Codes at evaluation: sign(sigmoid(proj / tau) - 0.5), their 'all' channel (models.py:73-77) and commented-out
    "0.5 binarilization" (evaluate_utils.py:240-242). Their evaluation thresholds each bit at its median over the
    query set and, separately, over the retrieval set (evaluate_utils.py:237-238, 244-255), which depends on the
    query set; median_codes() gives that rule for a comparison.
  - A batch with no prediction above CONFIDENCE: theirs raises ValueError (losses.py:150-151); ours is a zero loss.
  - pos_reweight=None is not ported: that path leaves neg_term undefined and adds raw similarities
    (losses.py:135-138); the config's 0.5 path is.
  - Their frozen path builds Adam(params, **optimizer_kwargs) (configurations.py:334), a TypeError on the
    config's backbone_lr_scale (cghash_cifar10_64.yml:36); we use what the fine-tuning path gives the projector
    and predictor (configurations.py:345-350): lr 1e-3, weight decay 1e-4; then a fresh Adam at lr 1e-4 for
    self-labelling (selflabel.py:66, selflabel_cifar10_64.yml:33-35). Their GradScaler runs without autocast
    (cghash_train.py:22-23), so it only scales fp32 losses: not ported.
  - Every random draw (neighbour, its view, the code noise) comes from `gen`, not numpy in DataLoader workers.
  - The batch sampler is the harness's: theirs drops the last partial batch (configurations.py:216) of CIFAR-10's
    50,000 train images; the losses here take any batch.
  - Cluster counts: their only configs are CIFAR-10's, num_classes 10 (cghash_cifar10_64.yml:7). One setting,
    num_classes, is both the predictor's width (configurations.py:91-92) and, for their multi-label datasets
    (cghash.py:107), the width of the label vectors the memory bank holds (memory_bank.py:20, mine_neighbors.py:
    44-46); so for a multi-label set it must be the number of labels: CLUSTERS below. Only the count is read,
    never a label.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# schedule (run_cifar10.sh runs the two stages one after the other)
SCAN_EPOCHS = 200        # cghash.py's epochs (cghash_cifar10_64.yml:59)
SELFLABEL_EPOCHS = 200   # selflabel.py's epochs (selflabel_cifar10_64.yml:49)
EPOCHS = SCAN_EPOCHS + SELFLABEL_EPOCHS
BATCH_SIZE = 1024        # both stages (cghash_cifar10_64.yml:53, selflabel_cifar10_64.yml:48)
# neighbours
NUM_NEIGHBORS = 20       # k of the mining (mine_cifar10.yml:27) and of the sampling (cghash_cifar10_64.yml:57)
MINE_CHUNK = 4096        # rows of the similarity matrix computed at once (ours; theirs all N x N)
# codes
TAU = 1.0                # sigmoid temperature of the code probabilities (cghash_cifar10_64.yml:55)
# loss of the first stage (cghash_cifar10_64.yml:41-51)
CONSISTENT_W = 1.0       # weight of -log <p_anchor, p_neighbour>
ENTROPY_W = 5.0          # weight of -H(mean p): spreads the batch over the clusters
SHARP_W = 1.0            # weight of mean H(p): sharpens each prediction
CONT_W = 0.1             # weight of the masked code contrast
CONT_TAU = 1.0           # temperature of the code contrast
POS_REWEIGHT = 0.5       # share of the instance pair against the prototype pair, in [0, 1]
EPS = 1e-8               # probability floor of the entropies and of the prototype's divisor (losses.py:5)
# self-labelling (selflabel_cifar10_64.yml:41-45)
CONFIDENCE = 0.9         # a plain view's top probability above this makes its pseudo-label a target
CLASS_BALANCING = True   # weigh each target class by 1 / its share of the confident targets
# optimizer: Adam, constant learning rate (cghash_cifar10_64.yml:32-37, selflabel_cifar10_64.yml:32-37)
LR = 1e-3                # first stage
SELFLABEL_LR = 1e-4      # self-labelling
WEIGHT_DECAY = 1e-4      # both stages (Adam's L2 term)

# clusters per dataset: the number of classes or labels (their num_classes); None: the folder's class count
CLUSTERS = {'cifar10': 10, 'nuswide': 21, 'flickr25k': 24, 'mscoco': 80, 'folder': None}


def clusters_for(dataset, n_classes):
    """The predictor's clusters for `dataset`: CLUSTERS' entry, or n_classes where it is None or absent."""
    return CLUSTERS.get(dataset) or n_classes


def phase(epoch):
    """'scan' for the first SCAN_EPOCHS epochs (cghash.py), 'selflabel' after (selflabel.py)."""
    return 'scan' if epoch < SCAN_EPOCHS else 'selflabel'


def starts_phase(epoch):
    """True where a stage starts and builds its own Adam (cghash.py:62, selflabel.py:66)."""
    return epoch == 0 or epoch == SCAN_EPOCHS


def step_lr(epoch, step, steps_per_epoch, epochs):
    """The rate of every step: the phase's constant LR or SELFLABEL_LR (train.train_competitor sets it each step)."""
    return LR if phase(epoch) == 'scan' else SELFLABEL_LR


def optimizer(head, epoch=0):
    """A fresh Adam for the stage of `epoch`, weight decay as L2 (configurations.py:345-350, selflabel.py:66)."""
    lr = LR if phase(epoch) == 'scan' else SELFLABEL_LR
    return torch.optim.Adam(head.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)


# -----------------------------------------------------------------------------
# the head: codes and pseudo-labels
class _Hash(torch.autograd.Function):
    """sign() forward (0 at 0, as theirs), identity backward: their straight-through hash (models.py:88-99)."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def build_head(in_dim, bits, dataset=None, n_classes=None):
    """The head of a run (train.train_competitor): clusters_for(dataset, n_classes) pseudo-labels, TAU."""
    return Head(in_dim, bits, clusters_for(dataset, n_classes), TAU)


class Head(nn.Module):
    """Their CGHashModel without the backbone (models.py:31-85): projector F -> F // 4 -> bits, code
    probabilities sigmoid(proj / tau), predictor bits -> n_clusters on the binary code. forward() gives the
    continuous codes 2 sigmoid(proj / tau) - 1 in (-1, 1), whose sign is the retrieval code."""

    def __init__(self, in_dim, bits, n_clusters, tau=TAU):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(in_dim, in_dim // 4), nn.ReLU(inplace=True),
                                       nn.Linear(in_dim // 4, bits))
        self.predictor = nn.Linear(bits, n_clusters)
        self.tau = tau
        self.register_buffer('knn', None, persistent=False)  # mined neighbours, (N, k + 1), set by epoch_start

    def prob(self, x):
        """Probability of each bit being +1 (models.py:59)."""
        return torch.sigmoid(self.projector(x) / self.tau)

    def forward(self, x):
        return 2 * self.prob(x) - 1

    def sample(self, x, gen):
        """Stochastic code z = sign(p - u), u ~ U(0, 1) from `gen`, and its pseudo-label logits (models.py:58-63)."""
        p = self.prob(x)
        u = torch.rand(p.shape, generator=gen, dtype=p.dtype, device=gen.device).to(p.device)
        z = _Hash.apply(p - u)
        return z, self.predictor(z)


def median_codes(h):
    """Their evaluation's codes (evaluate_utils.py:237-255): each bit -1 below its median over the rows of h
    (one set: the query set or the retrieval set), +1 otherwise."""
    h = np.asarray(h)
    return np.where(h < np.median(h, axis=0), -1.0, 1.0).astype(np.float32)


# -----------------------------------------------------------------------------
# neighbours: the similarity knowledge of the pretrained features
@torch.no_grad()
def mine_neighbours(x, k=NUM_NEIGHBORS, chunk=MINE_CHUNK):
    """Top k + 1 of each row by cosine similarity, itself included, most similar first (memory_bank.py:24-25 on
    L2-normalised features, models.py:27). x (N, F) -> LongTensor (N, k + 1) on x's device."""
    z = F.normalize(x.float(), dim=1)
    return torch.cat([(z[a:a + chunk] @ z.T).topk(k + 1, dim=1)[1] for a in range(0, len(z), chunk)])


def pick_neighbours(idx, state, gen):
    """Features of one neighbour of each item of idx: one of its k + 1 mined ones, uniformly (custom_dataset.py:
    76), as a stored view drawn uniformly (their fresh augmentation, custom_dataset.py:78); the plain feature
    where no views are stored."""
    knn, aug = state['knn'], state['aug']
    col = torch.randint(knn.shape[1], (len(idx),), generator=gen, device=gen.device).to(knn.device)
    j = knn[idx.to(knn.device), col]
    if aug is None:
        return state['x'][j.to(state['x'].device)]
    w = torch.randint(aug.shape[1], (len(idx),), generator=gen, device=gen.device).to(aug.device)
    return aug[j.to(aug.device), w].float()


# -----------------------------------------------------------------------------
# first stage: consistency, entropy, masked code contrast
def _entropy(p):
    """-sum p log p, floored at EPS (losses.py:9-28): of each row, averaged, for a matrix; of the vector."""
    b = p.clamp(min=EPS)
    b = b * torch.log(b)
    return -b.sum(dim=1).mean() if b.dim() == 2 else -b.sum()


def consistency_loss(logits_a, logits_n, w=CONSISTENT_W):
    """Neighbours agree: w * mean -log <softmax(a), softmax(n)> (ConsistentLoss, losses.py:47-60)."""
    sim = (F.softmax(logits_a, dim=1) * F.softmax(logits_n, dim=1)).sum(dim=1)
    return w * (-torch.log(sim)).mean()


def entropy_loss(logits, w=ENTROPY_W, sharp=SHARP_W):
    """Balanced and confident clusters: -w H(mean p) + sharp * mean H(p) (EntropyLoss, losses.py:79-89)."""
    p = F.softmax(logits, dim=1)
    return w * -_entropy(p.mean(dim=0)) + sharp * _entropy(p)


def pseudo_positives(logits):
    """Pairs with the same pseudo-label (argmax), the diagonal excluded (cghash_train.py:54-56)."""
    target = logits.argmax(dim=1)
    return (target.unsqueeze(1) == target).fill_diagonal_(False)


def _sim(a, b):
    """Their 'cos_sim' of +-1 codes, row by row: <a_i, b_i> / L (losses.py:99-101)."""
    return (a * b).sum(dim=1) / a.shape[1]


def masked_contrast_loss(z_a, z_n, pos, w=CONT_W, tau=CONT_TAU, r=POS_REWEIGHT):
    """Masked code contrast (MaskedContLoss, losses.py:109-141): positives the neighbour's code and, against the
    prototype c_i = mean of the anchor codes with i's pseudo-label, the neighbour's similarity to c_i; negatives
    the other anchors and the anchor's own similarity to c_i; r weighs instance against prototype terms."""
    proto = pos.to(z_a.dtype) @ z_a / (pos.sum(dim=1)[:, None] + EPS)
    pos_sim, neg_sim = _sim(z_a, z_n) / tau, z_a @ z_a.T / z_a.shape[1] / tau  # all anchor pairs (losses.py:102-103)
    proto_pos, proto_neg = _sim(z_n, proto) / tau, _sim(z_a, proto) / tau
    pos_term = r * pos_sim.exp() + (1 - r) * proto_pos.exp()
    neg_term = r * (neg_sim.exp().sum(dim=1) - neg_sim.exp().diag()) + (1 - r) * proto_neg.exp()
    return w * -torch.log(pos_term / (pos_term + neg_term)).mean()


def scan_terms(head, anchor, neighbour, gen):
    """The first stage's three weighted terms on anchor and neighbour features, codes drawn anchor first
    (cghash_train.py:37-61): (consistency, entropy, contrast)."""
    z_a, logits_a = head.sample(anchor, gen)
    z_n, logits_n = head.sample(neighbour, gen)
    return (consistency_loss(logits_a, logits_n, CONSISTENT_W), entropy_loss(logits_a, ENTROPY_W, SHARP_W),
            masked_contrast_loss(z_a, z_n, pseudo_positives(logits_a), CONT_W, CONT_TAU, POS_REWEIGHT))


# -----------------------------------------------------------------------------
# second stage: self-labelling
def selflabel_loss(logits_weak, logits_strong, threshold=CONFIDENCE, balance=CLASS_BALANCING):
    """Cross-entropy of the strong view's logits against the weak view's argmax where its probability exceeds
    `threshold`, each class weighted by 1 / its share of those targets (ConfidenceBasedCE, losses.py:182-221);
    a zero loss where none does (theirs raises)."""
    top, target = F.softmax(logits_weak, dim=1).max(dim=1)
    mask = top > threshold
    if not mask.any():
        return logits_strong.sum() * 0
    target = target[mask]
    weight = None
    if balance:
        cls, counts = torch.unique(target, return_counts=True)
        weight = torch.ones(logits_strong.shape[1], dtype=logits_strong.dtype, device=logits_strong.device)
        weight[cls] = 1 / (counts.to(weight.dtype) / len(target))
    return F.cross_entropy(logits_strong[mask], target, weight=weight)


def selflabel_step_loss(head, weak, strong, gen):
    """Self-labelling on a batch: targets from the plain view's stochastic codes without gradient, then the
    strong view's (selflabel_train.py:26-28)."""
    with torch.no_grad():
        _, logits_weak = head.sample(weak, gen)
    _, logits_strong = head.sample(strong, gen)
    return selflabel_loss(logits_weak, logits_strong, CONFIDENCE, CLASS_BALANCING)


# -----------------------------------------------------------------------------
# the harness's interface
def epoch_start(head, x_train, aug, epoch, gen, device):
    """Per-epoch state. The neighbours are mined once, from the frozen features, the first time (epoch 0) and
    kept on the head (mine_neighbors.py runs once, before training); `gen` is not used here."""
    x_train = torch.as_tensor(x_train).to(device)
    if head.knn is None or len(head.knn) != len(x_train):
        head.knn = mine_neighbours(x_train, NUM_NEIGHBORS, MINE_CHUNK)
    return dict(phase=phase(epoch), knn=head.knn, x=x_train, aug=None if aug is None else aug.to(device))


def batch_loss(head, x, v1, v2, idx, state, epoch, gen):
    """The loss of the batch idx: x its plain features (B, F), v1 and v2 two stored views (B, F) or None (v2 is
    not used). First stage: anchor v1 (a view, as theirs), neighbour a view of a mined neighbour, the sum of
    scan_terms. Self-labelling: weak x, strong v1."""
    anchor = v1.float() if v1 is not None else x
    if state['phase'] == 'selflabel':
        return selflabel_step_loss(head, x, anchor, gen)
    neighbour = pick_neighbours(idx, state, gen)
    consist, ent, cont = scan_terms(head, anchor, neighbour, gen)
    return consist + ent + cont
