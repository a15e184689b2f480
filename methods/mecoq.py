"""MeCoQ (Wang, Zeng, Chen, Dai, Xia, "Contrastive Quantization with Code Memory for Unsupervised Image
Retrieval", AAAI 2022): a competitor of Table 1, trained on the project's frozen features.

Ported from the authors' code, gimpong/AAAI22-MeCoQ at commit 7c96e92cdfd554435688bcd6e73ed1b9a0fd6dfc:
loss.py (MeCoQLoss), network.py (PQLayer, the queue of MeCoQ), engine.py (the training step), main.py (the
defaults), utils.py (the learning-rate schedule and the Evaluator's ranking), scripts/run00NN.sh (per dataset).
Only the trainable part is ported: Linear(F -> feat_dim) and a product quantizer of M = bits / 8 codebooks of
K = 256 unit-length words over feat_dim / M dimensions. Per step, on two augmented views v1, v2 of a batch:

    z = W x + b                                      the embedding; a query is ranked by its raw z
    p_m = softmax(alpha <z_m / |z_m|, c_mk>)_k        soft codeword assignment, alpha = 10
    z_hat_m = sum_k p_mk c_mk                         soft quantization; the loss sees z_hat, never z
    L = L_debiased(z_hat(v1), z_hat(v2); memory) + lambda * H(p) + gamma * mean_mkj <c_mk, c_mj>

L_debiased is SimCLR's NT-Xent with the debiased negative term of Chuang et al. (2020) as loss.py writes it:
Ng = max((sum_neg e^{s/T} - rho N e^{s+/T}) / (1 - rho), e^{-N/T}), N = 2B - 2 (the in-batch negatives
only, although sum_neg also runs over the memory), and -log(e^{s+/T} / (e^{s+/T} + Ng)) averaged over the 2B
rows (PER_ROW_LOSS; the release pairs every row with every row, below). The code memory holds QUEUE_SIZE
soft codes p (not features): before each use it is rebuilt into features with the current codebooks
(z_hat = sum_k p_mk c_mk, not normalised), so it does not drift as the codebooks move. It is filled from the
first step and read from `queue_begin_epoch` on. H(p) is the mean entropy of the soft codes (a low entropy
makes them near-hard), the last term decorrelates the words.

Paper or release: two switches; both True (the defaults) is the paper, and what the project's Table 1 shows;
both False is the release exactly (checked step by step against its engine.train in tests/test_mecoq.py).
  * TRAIN_CODEBOOKS. The paper learns the codebooks; the release never does: PQLayer's codebook is
    nn.Parameter(..., requires_grad=False) (network.py:13-14, nothing sets flag) and the word decorrelation
    term reads `codebooks`, i.e. F.normalize(_C.data) (network.py:95-97, engine.py:55), a constant with no
    gradient. True: every term, the rebuilt memory included, sends its gradient to the words, and the
    decorrelation term is taken on normalize(C) with its gradient. Both keep the release's in-place
    re-normalisation of the words before every step (engine.py:20).
  * PER_ROW_LOSS. In loss.py:70-87 the positives are a column, pos_probs [2B, 1], and the negative sums a
    vector, [2B]: Ng and pos / (pos + Ng) broadcast to 2B x 2B, and the loss is the mean over every pair (i, j)
    of -log(pos_i / (pos_i + Ng_ij)), Ng_ij = max((neg_j - rho N pos_i) / (1 - rho), e^{-N/T}): each row's
    positive against every row's negatives. NT-Xent (SimCLR) and the debiased loss of Chuang et al. (2020),
    which the paper builds on, are per row: the diagonal i = j of that matrix. True takes it, False the
    release's full matrix. (The paper's own text was not at hand; its equation numbers are not cited below.)

Ranking (their Evaluator, utils.py:175-185, the default asymmetric distance, main.py:111-114): an item's
code is argmax_k <z_m / |z_m|, c_mk> per codebook (network.py:53-61); a query's score for it is
sum_m <z_q,m, c_m,code_m> with the query's raw z (main.py's only_feats=True, norm_feats=False) and unit words,
descending. That is the inner product, not L2: eval_hash.map_aqd(head(x_q), encode_codes(head, x_r),
codebooks(head), ..., metric=AQD) with AQD = 'ip' ranks the same, but for ties: items that share a code (common:
M = 2 codebooks give 65,536 codes) come in index order there, in torch.argsort's arbitrary order in theirs.
Their `--symmetric_distance` (code-to-code word inner products) has no counterpart in eval_hash.

Departures, each forced by the project's protocol unless said otherwise:
  * frozen features in place of VGG-16: their Flickr/NUS runs freeze VGG-16 too (trainable_layer_num 0), their
    CIFAR runs fine-tune fc6 and fc7 (trainable_layer_num 2); here no backbone layer trains. Their VGG keeps
    the classifier's last Dropout(0.5) (network.py:113: classifier[:6]) in front of the projection, active in
    training: INPUT_DROPOUT applies it to the features in train mode (on the CLIP features too).
  * augmented views: the project's stored views of each image (dataset.py), not their TwoCropsTransform.
  * no model selection on the query set: they evaluate the test queries after every epoch and keep the best
    epoch, stopping after 10 without gain (utils.Monitor, engine.py:69-99); here the model after EPOCHS is
    scored, as for every method of the table.
  * settings: their scripts cover flickr25k, nuswide and CIFAR-10 (I and II) at 16/32/64 bits. The project's
    cifar10 split (1,000 queries and 500 training images a class, the other 50,000 retrieved) is their
    protocol II (data.py:151-158), so cifar10 takes the CIFAR-II scripts; 'cifar10-I' keeps the protocol-I rows.
    Any other dataset or code length falls back to DEFAULT_DATASET's row for the nearest code length, with
    feat_dim = FEAT_PER_CODEBOOK * M (settings_for).
Comments name each term and the line of the authors' code it ports (the paper's equation numbers: above).

Interface for train.py's loop (train.train_competitor; `head` carries its settings, code memory and codebooks):
    head = build_head(in_dim, bits, dataset); opt = optimizer(head)
    for epoch in range(EPOCHS):
        state = epoch_start(head, x_train, aug, epoch, gen, device)
        for every batch (BATCH_SIZE, the last one shorter), step = global batch count:
            set every param group's lr to step_lr(epoch, step, batches_per_epoch, EPOCHS) (= lr_at)
            loss = batch_loss(head, x_train, v1, v2, idx, state, epoch, gen); backward; opt.step()
    codes = encode_codes(head, x_retrieval); ranked by eval_hash.map_aqd(head(x_query), codes, codebooks(head))
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# paper or release
TRAIN_CODEBOOKS = True  # False: the authors' release (codebooks never trained; the gamma term has no gradient)
PER_ROW_LOSS = True     # False: the authors' release (loss.py:87 broadcasts pos [2B, 1] against Ng [2B]: 2B x 2B)
# quantization (network.py, main.py:69-80)
WORD_BITS = 8           # bits per codebook: K = 2 ** 8 = 256 words (main.py:75-77 --K 256), M = bits / 8
ALPHA = 10.0            # soft-assignment scale alpha (main.py:78-80 --alpha 10)
FEAT_PER_CODEBOOK = 16  # feat_dim / M where no script says (main.py:69-74: --feat_dim 64, --M 4; Flickr, CIFAR-I)
INPUT_DROPOUT = 0.5     # VGG-16's last Dropout(0.5), kept by the release before the projection (network.py:113)
# loss (loss.py; main.py:89-103)
GAMMA = 0.5             # word-decorrelation weight (main.py:101-103 --hp_gamma 0.5; no script sets it)
QUEUE_SIZE = 384        # soft codes in the code memory (network.py:104, queue_size=384)
# optimiser (main.py:33-66, 188-197; utils.py:13-32)
EPOCHS = 50             # main.py:36-38 --epoch_num 50
BATCH_SIZE = 128        # main.py:33-35 --batch_size 128; also the memory's enqueue size (engine.py:14)
LR = 0.01               # SGD learning rate after warm-up (main.py:42-44 --lr 0.01)
MOMENTUM = 0.9          # main.py:48-50 --momentum 0.9
START_LR = 1e-5         # warm-up start (main.py:61-63 --start_lr 1e-5)
FINAL_LR = 1e-5         # end of the cosine decay (main.py:64-66 --final_lr 1e-5)
WARMUP_EPOCHS = 1       # linear warm-up, per step (main.py:58-60 --warmup_epoch_num 1)
# per dataset (scripts/run00NN.sh): weight_decay is their hp_beta, rho their pos_prior (mode debias throughout)
DEFAULT_DATASET = 'flickr25k'  # the rows a dataset without a script (mscoco, folder) takes
AQD = 'ip'              # eval_hash.map_aqd metric: their Evaluator ranks by the inner product (utils.py:175-185)

_FIELDS = ('feat_dim', 'T', 'weight_decay', 'lam', 'rho', 'queue_begin_epoch')
SCRIPTS = {  # (dataset, bits): (feat_dim, T, hp_beta, hp_lambda, pos_prior, queue_begin_epoch)
    ('flickr25k', 16): (32, 0.4, 1e-1, 0.5, 0.15, 5),     # run0001.sh:9-15
    ('flickr25k', 32): (64, 0.45, 1e-1, 1.0, 0.15, 5),    # run0003.sh:9-15
    ('flickr25k', 64): (128, 0.4, 1e-1, 2.0, 0.15, 5),    # run0005.sh:9-15
    ('nuswide', 16): (64, 0.2, 1e-2, 1.0, 0.15, 10),      # run0019.sh:9-15
    ('nuswide', 32): (32, 0.4, 1e-2, 0.2, 0.15, 10),      # run0021.sh:9-15
    ('nuswide', 64): (128, 0.4, 1e-2, 0.01, 0.15, 10),    # run0023.sh:9-15
    ('cifar10', 16): (16, 0.35, 1e-2, 0.01, 0.1, 15),     # run0013.sh:9-15 (CIFAR-10 II: the project's split)
    ('cifar10', 32): (48, 0.35, 5e-3, 0.1, 0.1, 15),      # run0015.sh:9-15
    ('cifar10', 64): (96, 0.35, 1e-2, 0.05, 0.1, 15),     # run0017.sh:9-15
    ('cifar10-I', 16): (32, 0.25, 1e-3, 0.05, 0.1, 3),    # run0007.sh:9-15 (CIFAR-10 I: train = retrieval)
    ('cifar10-I', 32): (64, 0.4, 1e-3, 0.05, 0.1, 3),     # run0009.sh:9-15
    ('cifar10-I', 64): (128, 0.4, 1e-3, 0.05, 0.1, 3),    # run0011.sh:9-15
}


# -----------------------------------------------------------------------------
# settings and optimiser
def settings_for(dataset, bits):
    """The script's hyper-parameters for (dataset, bits) as a dict of _FIELDS plus gamma, M and `script`
    (where they come from). A dataset without scripts takes DEFAULT_DATASET's; a code length without one takes
    the nearest scripted length's (the shorter on a tie) with feat_dim = FEAT_PER_CODEBOOK * M."""
    if bits % WORD_BITS or bits <= 0:
        raise ValueError(f'MeCoQ needs a code length that is a multiple of {WORD_BITS} bits (one codebook of '
                         f'{2 ** WORD_BITS} words each), got {bits}')
    m = bits // WORD_BITS
    name = dataset if any(d == dataset for d, _ in SCRIPTS) else DEFAULT_DATASET
    near = min((b for d, b in SCRIPTS if d == name), key=lambda b: (abs(b - bits), b))
    row = dict(zip(_FIELDS, SCRIPTS[name, near]))
    if near != bits:
        row['feat_dim'] = FEAT_PER_CODEBOOK * m
    script = f'{name} {near} bits' + ('' if (name, near) == (dataset, bits) else f', for {dataset} {bits} bits')
    return dict(row, gamma=GAMMA, M=m, script=script)


def lr_at(step, steps_per_epoch, epochs=None):
    """utils.WarmUpAndCosineDecayScheduler, set before every step: np.linspace(START_LR, LR) over the warm-up
    steps, then FINAL_LR + (LR - FINAL_LR)(1 + cos(pi k / decay_steps)) / 2; past the end, its last value."""
    epochs = EPOCHS if epochs is None else epochs
    warm, decay = steps_per_epoch * WARMUP_EPOCHS, steps_per_epoch * (epochs - WARMUP_EPOCHS)
    step = min(step, warm + decay - 1)
    if step < warm:  # np.linspace(START_LR, LR, warm)[step]
        return START_LR if warm == 1 else START_LR + (LR - START_LR) * step / (warm - 1)
    return FINAL_LR + 0.5 * (LR - FINAL_LR) * (1 + math.cos(math.pi * (step - warm) / decay))


def step_lr(epoch, step, steps_per_epoch, epochs):
    """The rate set before each step (train.train_competitor): lr_at(step, steps_per_epoch, epochs)."""
    return lr_at(step, steps_per_epoch, epochs)


def starts_phase(epoch):
    """One phase: one optimiser, built before the first epoch (main.py:188-197)."""
    return epoch == 0


def optimizer(head, epoch=0):
    """main.py:188-197: SGD, momentum 0.9, weight decay hp_beta, on the projection and the codebooks (the
    release's codebook takes no step: it has no gradient)."""
    groups = [{'params': head.projection.parameters(), 'lr': LR}, {'params': [head.C], 'lr': LR}]
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=head.settings['weight_decay'])


# -----------------------------------------------------------------------------
# the network: projection and product quantizer (network.py)
def build_head(in_dim, bits, dataset=None, n_classes=None):
    """The head of a run (train.train_competitor): the script settings of `dataset` (settings_for)."""
    return Head(in_dim, bits, dataset)


class Head(nn.Module):
    """Linear(in_dim -> feat_dim) and M codebooks of 256 words over feat_dim / M dimensions (MeCoQ.projection,
    PQLayer._C, xavier-uniform initialised, network.py:9-15, 120-122). forward(x) is z, the embedding that
    is quantized and, raw, the query of the ranking. `dataset` picks the script's settings (settings_for);
    keyword overrides replace any of them (feat_dim, T, weight_decay, lam, rho, queue_begin_epoch, gamma)."""

    def __init__(self, in_dim, bits, dataset=None, **overrides):
        super().__init__()
        unknown = set(overrides) - set(_FIELDS) - {'gamma'}
        if unknown:
            raise ValueError(f"unknown MeCoQ setting(s) {sorted(unknown)}; known: {', '.join(_FIELDS)}, gamma")
        self.settings = dict(settings_for(dataset, bits), **overrides)
        self.M, feat_dim = self.settings['M'], self.settings['feat_dim']
        if feat_dim % self.M:
            raise ValueError(f'feat_dim {feat_dim} is not a multiple of the {self.M} codebooks of {bits} bits')
        self.projection = nn.Linear(in_dim, feat_dim)
        self.C = nn.Parameter(torch.empty(self.M, 2 ** WORD_BITS, feat_dim // self.M), requires_grad=TRAIN_CODEBOOKS)
        nn.init.xavier_uniform_(self.C.data)
        self.memory = None  # the code memory, made by epoch_start: not a buffer, so not in state_dict (engine.py:91)

    def forward(self, x):
        if self.training and INPUT_DROPOUT:  # the release's VGG classifier ends with Dropout(0.5), on in training
            x = F.dropout(x, INPUT_DROPOUT, training=True)
        return self.projection(x)


def soft_quantize(z, C, alpha=ALPHA):
    """Soft codeword assignment and soft quantization (PQLayer.forward, network.py:53-84): per codebook m,
    p_m = softmax_k(alpha <z_m / |z_m|, c_mk>) and z_hat_m = sum_k p_mk c_mk. Returns (z_hat [B, D], p [B, M, K])."""
    zs = F.normalize(z.reshape(len(z), C.shape[0], C.shape[2]), dim=-1)
    p = F.softmax(alpha * torch.einsum('bmd,mkd->bmk', zs, C), dim=-1)
    return reconstruct(p, C), p


def reconstruct(p, C):
    """Features from soft codes with the current words: z_hat_m = sum_k p_mk c_mk (PQLayer.reconstruct,
    network.py:39-45); how the code memory becomes negatives (MeCoQ.get_queue_feats, network.py:145-146)."""
    return torch.einsum('mkd,bmk->bmd', C, p).reshape(len(p), -1)


def hard_codes(z, C):
    """Hard assignment, the item's code: argmax_k <z_m / |z_m|, c_mk> per codebook (network.py:53-61)."""
    zs = F.normalize(z.reshape(len(z), C.shape[0], C.shape[2]), dim=-1)
    return torch.einsum('bmd,mkd->bmk', zs, C).argmax(-1)


@torch.no_grad()
def normalize_codebooks(head):
    """Every word back to unit length, in place, before each step (PQLayer._codebook_normalization,
    network.py:17-22, called at engine.py:20)."""
    head.C.copy_(F.normalize(head.C, dim=-1))


def codebooks(head):
    """The unit-length words the ranking uses (PQLayer.codebooks, network.py:95-97): [M, K, D/M], detached."""
    return F.normalize(head.C.detach(), dim=-1).cpu()


# -----------------------------------------------------------------------------
# the loss (loss.py)
def debiased_nt_xent(f1, f2, queue_feats, T, rho, per_row=True):
    """Debiased contrastive loss (MeCoQLoss._simclr_loss, mode 'debias', loss.py:59-88): cosine logits of the 2B
    quantized views over T; each row's positive is its other view, its negatives the 2B - 2 other views and the
    rebuilt memory (not normalised). Ng = max((sum_neg - rho N pos) / (1 - rho), e^{-N/T}), N = 2B - 2; the mean
    of -log(pos / (pos + Ng)) over the rows, or (per_row False, the release) over all 2B x 2B pairs (pos_i, neg_j)."""
    b = len(f1)
    f = F.normalize(torch.cat([f1, f2]), dim=-1)
    e = torch.exp(f @ f.T / T)
    pos_mask = torch.eye(b, dtype=torch.bool, device=f.device).repeat(2, 2)  # self and other view
    pos = e[torch.arange(2 * b, device=f.device), torch.arange(2 * b, device=f.device).roll(b)]
    neg = e.masked_fill(pos_mask, 0).sum(-1)
    if queue_feats is not None:
        neg = neg + torch.exp(f @ queue_feats.T / T).sum(-1)
    n = 2 * b - 2
    pos = pos if per_row else pos[:, None]  # the release: a column against a row, [2B, 1] with [2B] -> [2B, 2B]
    ng = torch.clamp((neg - rho * n * pos) / (1 - rho), min=math.exp(-n / T))
    return -torch.log(pos / (pos + ng)).mean()


def code_entropy(p):
    """Entropy of the soft codes, summed over the words, mean over items and codebooks (loss.py:90-91)."""
    return (-p * p.log()).sum(-1).mean()


def codeword_correlation(C):
    """Word decorrelation: the mean over m, k, j of <c_mk, c_mj> (loss.py:93-94), on unit words."""
    return torch.einsum('mkd,mjd->mkj', C, C).mean()


def mecoq_loss(q1, q2, p1, p2, queue_feats, C, s):
    """MeCoQLoss.__call__ (loss.py:22-57): contrastive + lambda * mean entropy of both views + gamma * word
    correlation on the unit words: with the release's frozen C (requires_grad False) the last term is the
    constant of loss.py's F.normalize(C.data); with trained codebooks it has its gradient, as in the paper."""
    words = F.normalize(C, dim=-1)
    loss = debiased_nt_xent(q1, q2, queue_feats, s['T'], s['rho'], PER_ROW_LOSS)
    if s['lam']:
        loss = loss + s['lam'] * (code_entropy(p1) + code_entropy(p2)) / 2
    if s['gamma']:
        loss = loss + s['gamma'] * codeword_correlation(words)
    return loss


# -----------------------------------------------------------------------------
# the code memory (network.py:128-146, engine.py:12-16, 61-64)
def new_memory(m, dtype, device, queue_size=None, enqueue_size=None):
    """An empty memory of soft codes [queue_size, M, K] (zeros, as register_queue) and its write pointer."""
    queue_size = QUEUE_SIZE if queue_size is None else queue_size
    codes = torch.zeros((queue_size, m, 2 ** WORD_BITS), dtype=dtype, device=device)
    return dict(codes=codes, ptr=0, enqueue_size=BATCH_SIZE if enqueue_size is None else enqueue_size)


def push(memory, p):
    """MeCoQ.dequeue_enqueue: write a batch's soft codes at the pointer, then move it by the enqueue size
    (even for a shorter last batch). Out of place: the step's rebuilt memory still needs the old codes."""
    n = len(p)
    if n > memory['enqueue_size'] or memory['ptr'] + n > len(memory['codes']):
        raise ValueError(f"a batch of {n} does not fit MeCoQ's memory ({len(memory['codes'])} codes, enqueue size "
                         f"{memory['enqueue_size']}): use batches of at most BATCH_SIZE = {memory['enqueue_size']}")
    codes = memory['codes'].clone()
    codes[memory['ptr']:memory['ptr'] + n] = p.detach()
    memory.update(codes=codes, ptr=(memory['ptr'] + memory['enqueue_size']) % len(codes))


# -----------------------------------------------------------------------------
# what train.py's loop calls
def epoch_start(head, x_train, aug, epoch, gen, device):
    """Per epoch: a fresh memory at the first epoch (register_queue before training, engine.py:12-14), kept on
    the head across epochs; it is read from queue_begin_epoch on (engine.py:16) and filled always."""
    s = head.settings
    if epoch == 0 or head.memory is None:
        head.memory = None if s['queue_begin_epoch'] is None else new_memory(head.M, head.C.dtype, device)
    begin = s['queue_begin_epoch']
    return dict(settings=s, memory=head.memory, use_queue=begin is not None and epoch >= begin)


def batch_loss(head, x, v1, v2, idx, state, epoch, gen):
    """One step of engine.train (engine.py:20-64): words re-normalised, both views soft-quantized, the
    memory rebuilt with the current words (if in use), the loss, then both views' soft codes pushed into the
    memory. x, idx, epoch and gen are not needed."""
    if v2 is None:
        raise ValueError('MeCoQ trains on two augmented views of each image: run it with the augmented views on')
    normalize_codebooks(head)
    q1, p1 = soft_quantize(head(v1), head.C, ALPHA)
    q2, p2 = soft_quantize(head(v2), head.C, ALPHA)
    memory = state['memory']
    queue_feats = reconstruct(memory['codes'], head.C) if state['use_queue'] else None
    loss = mecoq_loss(q1, q2, p1, p2, queue_feats, head.C, state['settings'])
    if memory is not None:
        push(memory, p1)
        push(memory, p2)
    return loss


@torch.no_grad()
def encode_codes(head, x, batch=4096):
    """The retrieval set's codes: word indices [N, M] (uint8) by hard assignment (get_db_codes_and_targets,
    utils.py:35-47, with the words as they are, as there)."""
    was_training, device = head.training, head.C.device
    head.eval()
    out = [hard_codes(head(torch.as_tensor(x[a:a + batch], dtype=head.C.dtype, device=device)), head.C).cpu()
           for a in range(0, len(x), batch)]
    head.train(was_training)
    codes = torch.cat(out) if out else torch.zeros((0, head.M), dtype=torch.long)
    return codes.numpy().astype(np.uint8 if WORD_BITS <= 8 else np.int64)
