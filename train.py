"""Step 3 (Section 3.3, Algorithm 2): train the hashing heads Hv and He with the bidirectional
contrastive loss, then score binary codes by MAP@K.

Reads what dataset_extract.py and nouns_embed.py left in CACHE_DIR; writes, per code length,
RUN_DIR/<bits>bits/heads.pt (the trained heads and the config), codes.npz (continuous outputs
and labels of query and retrieval sets, for eval_hash.py --run; the quantization methods add the
retrieval set's product-quantized codes and the codebooks) and result.json, and appends one JSON
line per run to RESULTS. --method trains another method on the same protocol instead (baselines.py).
"""
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import baselines
import cache
import dataset
import eval_hash
import external
import models
import nouns_embed
import provenance
import runs
import views
from baselines import COMPETITORS, QUANTIZED, SUPERVISED, TWO_VIEWS, UNTRAINED
from cache import CacheError, atomic_write, feature_dir, load_array, split_tag
from configurator import check_choice, check_ranges, configure, given_settings, released_defaults
from dataset import DataError
from external import external_features
from methods.pq import PQ_WORDS, pq_shape
from models import HashHead, pretrained_tag, resolve_device

# data (what dataset_extract.py and nouns_embed.py produced)
DATASET = 'cifar10'         # cifar10 | nuswide | flickr25k | mscoco | folder | demo (generated: the quick start)
CACHE_DIR = nouns_embed.CACHE_DIR  # where dataset_extract.py and nouns_embed.py left their files
SPLIT_SEED = 0              # which split (dataset_extract.py --split_seed)
SPLIT_DIR = ''              # or the name of your own split folder (dataset_extract.py --split_dir)
BACKBONE = nouns_embed.CLIP_MODEL  # features feeding Hv: ViT-B-16 | ViT-B-32 | vgg16 | tiny-test (a tiny CLIP for
                            # quick runs and tests: the README's offline quick start)
BACKBONE_PRETRAINED = ''    # '' -> 'openai' for CLIP, 'imagenet' for vgg16; a checkpoint file; 'random' (random
                            # weights: quick runs, tests)
CLIP_MODEL = nouns_embed.CLIP_MODEL  # the CLIP space of nouns and images for the external feature: ViT-B-16 |
                            # ViT-B-32 | tiny-test
CLIP_PRETRAINED = nouns_embed.CLIP_PRETRAINED  # its weights (as given to dataset_extract.py / nouns_embed.py): a tag,
                            # a checkpoint file, or 'random'
VOCAB = 'wordnet'           # vocabulary of nouns_embed.py: wordnet | imagenet | a word-list file (Table 5);
                            # wordnet:2000 its sample of 2,000 words (quick runs; nouns_embed.py --vocab)
N_K = nouns_embed.N_K       # clusters of the noun selection (Eq. 3); nouns_embed.py's default
T1 = nouns_embed.T1         # threshold of representative nouns (Eq. 3); nouns_embed.py's default
T1_READING = None           # Eq. 3 read as 'distance' (paper) or 'similarity' (authors' code); None: distance, or
                            # similarity with --released (nouns_embed.py --t1_reading)
VIEW_RECIPE = None          # the views dataset_extract.py made: simclr | released; None: simclr, or released with
                            # --released
# method
METHOD = 'duheg'            # duheg (this paper) | ssdh, cibhash (unsupervised) | dhn, dch, dqn, dvsq, dtq (SUPERVISED:
                            # read labels; dqn, dvsq, dtq: product quantization, ranked by AQD) | lsh, itq (no
                            # training); baselines train Hv alone, on the plain view (cibhash: two augmented views) |
                            # hhch, mecoq (quantization, AQD), cghash: Table 1's competitors, ported from their
                            # authors' code (methods/), each on its authors' loop and schedule (baselines.py)
METHOD_ARGS = ''            # hhch, mecoq, cghash: settings of the method's own file as --key=value words, e.g.
                            # --method_args='--clusters=20,10' (hhch), '--train_codebooks=false --per_row_loss=false'
                            # (mecoq as released); --method_args=--help lists them
CLASS_NAMES = ''            # dvsq: the labels' names, one a line in label order, whose CLIP text features (Eq. 2) are
                            # DVSQ's word vectors; '' -> the dataset's classes.txt (dataset_extract.py writes it)
BITS = (16, 32, 64)         # code lengths L, one run each
TAU1 = 0.004                # Eq. 6 temperature (not printed in the paper; the authors' code)
TAU2 = 0.0                  # Eq. 9 temperature; 0 -> the authors' per-dataset value (TAU2_DEFAULT)
T2 = 0.97                   # Eq. 8 threshold of positives (Table 1; best per dataset in T2_BEST)
SIM = True                  # Table 2: in-batch positives from the external feature (off: pos(i) = {i})
AUG = True                  # Table 2: two augmented views (off: one plain view, only L_b(hv, he))
EXTERNAL = 'efc'            # Table 3: efc (selected nouns) | ek (all nouns) | imgk (train images as nouns)
                            #          | imgcls (selection run on train images) | none (IMGAUG: L_b(hv1, hv2) only)
NORM_INPUTS = None          # L2-normalise Hv's inputs (views, query, retrieval features); None: no, or yes with
                            # --released
RELEASED = False            # the authors' released code: their views and vocabulary (t_com = t_rep), one fixed pair of
                            # views, L2-normalised inputs, drop_last batches, softmax clamped to [1e-12, 1 - 1e-12] in
                            # Eq. 9, Eq. 5-6 in fp16 on a GPU
# optimiser (Section 4.1.2, Eq. 10-11; a competitor has its authors' optimiser and schedule, and takes EPOCHS and
# BATCH_SIZE only when they are given on the command line, else its authors': hhch 80 / 64, mecoq 50 / 128, cghash
# 400 / 1024)
EPOCHS = 60                 # T_max
WARMUP = 10                 # T_warm
LR_MIN = 1e-5               # Eq. 10-11: lr_min, the learning rate at the start and the end
LR_MAX = 1e-4               # Eq. 10-11: lr_max, reached after the warm-up
BATCH_SIZE = 512            # mini-batch size N (positives of Eq. 8 are found inside a batch); mecoq: at most 128
# system
SEED = 0                    # seed of the heads' initialisation, the batches and the view pairs
DEVICE = 'auto'             # auto | cpu | cuda
THREADS = 0                 # torch CPU threads; 0: torch's default (every core); 1 when other jobs share the cores
RUN_DIR = ''                # '' -> runs/<dataset>/<automatic name from the settings>
RESULTS = 'runs/results.jsonl'  # every run appends one JSON line here
TOPK = 0                    # MAP@K; 0 -> the dataset's K (1000 CIFAR-10, 5000 others)
FORCE = False               # recompute the cached external features; replace a RUN_DIR made from other settings

_RANGES = dict(SPLIT_SEED='[0, inf)', N_K='[1, inf)', BITS='[1, 1024]', TAU1='(0, inf)', TAU2='[0, inf)',
               T2='(-1, 1]', EPOCHS='[1, inf)', WARMUP='[0, inf)', LR_MIN='[0, inf)', LR_MAX='(0, inf)',
               BATCH_SIZE='[2, inf)', SEED='[0, inf)', THREADS='[0, inf)', TOPK='[0, inf)')  # checked before any work
TAU2_DEFAULT = {'mscoco': 0.2}            # the authors' code: 0.8 elsewhere
T2_BEST = {'cifar10': 0.99, 'nuswide': 0.98, 'flickr25k': 0.97, 'mscoco': 0.95}  # Figure 5b
RELEASED_DEFAULTS = dict(  # each None setting above: (its default, the authors' released code's), by RELEASED
    T1_READING=nouns_embed.RELEASED_DEFAULTS['T1_READING'], VIEW_RECIPE=('simclr', 'released'),
    NORM_INPUTS=(False, True))
# -----------------------------------------------------------------------------
def lr_at(epoch, lr_min=1e-5, lr_max=1e-4, warm=10, total=60):
    """Eq. 10-11: linear warm-up from lr_min to lr_max over `warm` epochs, then half-cosine back."""
    if epoch < warm:
        temp = epoch / warm
    else:
        temp = 0.5 * (1 + math.cos((epoch - warm) * math.pi / (total - warm)))
    return lr_min + (lr_max - lr_min) * temp


def tau2_for(dataset, tau2=0.0):
    """Eq. 9's temperature: `tau2`, or the authors' per-dataset value when it is 0."""
    return tau2 or TAU2_DEFAULT.get(dataset, 0.8)


def positives(e, t2, sim=True):
    """Eq. 8: j is a positive of i when cos(e_i, e_j) > T2; i is always its own positive."""
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    if not sim:
        return eye
    e = F.normalize(e, dim=1)
    return (e @ e.T > t2) | eye


def bcl_term(a, b, pos, tau2, clamp=False):
    """Eq. 9: L_b(a, b) = -1/N sum_i log( sum_{j in pos(i)} exp(sim(a_i, b_j)/tau2) / sum_k exp(sim(a_i, b_k)/tau2) ),
    sim the cosine of the relaxed codes. clamp: the authors' form, each softmax entry clamped to
    [1e-12, 1 - 1e-12] before the positives' entries are summed."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau2
    if clamp:
        p = torch.softmax(logits, dim=1).clamp(1e-12, 1 - 1e-12)
        return -torch.log((p * pos).sum(1)).mean()
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, float('-inf')), 1)).mean()


def bcl_loss(hv1, hv2, he, pos, tau2, clamp=False):
    """Eq. 1: L_BCL = L_b(hv1, hv2) + L_b(hv1, he) + L_b(hv2, he); missing views are left out
    (AUG off: L_b(hv, he); IMGAUG: L_b(hv1, hv2))."""
    pairs = [(hv1, hv2), (hv1, he), (hv2, he)]
    return sum(bcl_term(a, b, pos, tau2, clamp) for a, b in pairs if a is not None and b is not None)


# -----------------------------------------------------------------------------
# the inputs: what dataset_extract.py and nouns_embed.py left in CACHE_DIR (dataset.py's cache layout)
def input_paths(cfg):
    """{name: path} of the cached files a run with config `cfg` (train.py's settings) is made from:
    the features of Hv, their augmented views, the split and labels, and what the external feature
    is built from (the training images in CLIP's space, the vocabulary). Their fingerprints key the
    external-feature cache and each results line; reproduce.py compares them to tell a done cell
    from one whose inputs changed."""
    cfg = dict(cfg, **released_defaults(cfg, RELEASED_DEFAULTS))
    tag = split_tag(cfg['SPLIT_SEED'], cfg['SPLIT_DIR'])
    pretrained = cfg['BACKBONE_PRETRAINED'] or models.default_weights(cfg['BACKBONE'])
    fdir = feature_dir(cfg['CACHE_DIR'], cfg['DATASET'], cfg['BACKBONE'], pretrained, cfg['VIEW_RECIPE'])
    paths = cache.split_paths(cfg['CACHE_DIR'], cfg['DATASET'], tag)  # labels and split first: step 1's start
    paths['features'] = os.path.join(fdir, 'images.npy')
    duheg = cfg['METHOD'] == 'duheg'
    if (duheg and cfg['AUG']) or cfg['METHOD'] in TWO_VIEWS:
        paths['views'] = cache.views_path(fdir, tag)
    if cfg['METHOD'] == 'dvsq':
        paths['classes'] = cfg.get('CLASS_NAMES') or os.path.join(cache.dataset_dir(cfg['CACHE_DIR'], cfg['DATASET']),
                                                                  'classes.txt')
    if duheg and cfg['EXTERNAL'] != 'none':
        paths['clip'] = external.clip_images_path(cfg)
        if external.vocabulary_path(cfg):
            paths['vocabulary'] = external.vocabulary_path(cfg)
    return paths


def load_features():
    """Image features of query / retrieval / train (plain view), the augmented train views,
    the training images' CLIP features, labels and split."""
    paths = input_paths(globals())
    tag = split_tag(SPLIT_SEED, SPLIT_DIR)
    labels, query, retrieval, train = cache.load_split(CACHE_DIR, DATASET, tag)
    fdir = os.path.dirname(paths['features'])
    feats = cache.load_features(CACHE_DIR, DATASET, BACKBONE, BACKBONE_PRETRAINED, VIEW_RECIPE)
    if len(feats) != len(labels):
        raise CacheError(f"{paths['features']} has {len(feats)} rows but {paths['labels']} {len(labels)}: the two "
                         f"come from different datasets; rerun dataset_extract.py --force")
    aug = None
    if 'views' in paths:  # IMGAUG (EXTERNAL none) requires AUG, checked in main
        aug = load_array(paths['views'], cache.extraction_of(paths['features']), whose=paths['features'],
                         producer=f'dataset_extract.py --dataset={DATASET} --backbone={BACKBONE} (AUG_VIEWS >= 1)')
        if aug.shape[1] < 1 or aug.shape[0] != len(train):
            raise CacheError(f"{paths['views']} has shape {aug.shape}, expected ({len(train)}, views, F)")
        if aug.shape[1] < 2:  # Eq. 1's L_b(hv1, hv2) (and CIBHash) needs two different views of an image
            raise CacheError(f"{paths['views']} holds {aug.shape[1]} view of each image; --method={METHOD} "
                             f"{'with --aug=true ' if METHOD == 'duheg' else ''}trains on two: rerun "
                             f"dataset_extract.py --aug_views=2 (or more) --force"
                             f"{', or train with --aug=false' if METHOD == 'duheg' and EXTERNAL != 'none' else ''}")
    clip = None  # the training images in CLIP's space, for the external feature
    if 'clip' in paths:
        clip = feats if paths['clip'] == paths['features'] else \
            cache.load_features(CACHE_DIR, DATASET, CLIP_MODEL, CLIP_PRETRAINED, VIEW_RECIPE)
    bad = cache.read_sidecar(paths['features'])['settings'].get('bad', [])
    if bad:  # images dataset_extract.py --bad_images=skip could not read
        query, retrieval, train_keep = (np.setdiff1d(p, bad) for p in (query, retrieval, train))
        keep = np.isin(train, train_keep)
        train, aug = train[keep], (aug[keep] if aug is not None else None)
        print(f"left out {len(bad)} unreadable images listed in {fdir}/bad_images.txt")
    if NORM_INPUTS:  # the authors' code L2-normalises every input of Hv
        feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True).clip(min=1e-12)
        if aug is not None:
            norm = np.linalg.norm(aug.astype(np.float32), axis=-1, keepdims=True).clip(min=1e-12)
            aug = (aug / norm).astype(aug.dtype)
    return feats, aug, None if clip is None else clip[train], labels, query, retrieval, train


def vocabulary(clip_train):
    """The word features the external feature is built from (Table 3 / Table 5)."""
    if EXTERNAL == 'imgk':
        return clip_train
    if EXTERNAL in ('efc', 'ek'):
        return external.run_vocabulary(globals())[0]
    # imgcls: Algorithm 1's selection on the training images, same ratio of clusters to points as for nouns
    n_k = max(2, round(N_K * len(clip_train) / len(external.run_vocabulary(globals(), mmap=True)[0])))
    t = F.normalize(torch.as_tensor(clip_train, dtype=torch.float32), dim=1).numpy()
    rep, cen = nouns_embed.select_vocabulary(t, n_k, T1, iters=100, restarts=1, seed=SEED, released=RELEASED,
                                             reading=T1_READING)
    return t[rep] if RELEASED else t[np.union1d(rep, cen)]


def external_cache(clip_train, train, device='cpu'):
    """e_i of every training image (Eq. 5-6), cached beside the CLIP features; rebuilt when any input
    changed (the CLIP features, the split, the vocabulary: their fingerprints are its settings)."""
    paths = input_paths(globals())
    settings = dict(dataset=DATASET, split=split_tag(SPLIT_SEED, SPLIT_DIR), clip=CLIP_MODEL,
                    pretrained=pretrained_tag(CLIP_PRETRAINED),
                    clip_build=models.clip_build(CLIP_MODEL, CLIP_PRETRAINED),
                    vocab=VOCAB, n_k=N_K, t1=T1, t1_reading=T1_READING, tau1=TAU1,
                    external=EXTERNAL, released=RELEASED, n_train=len(train),
                    inputs=cache.fingerprints(**{k: paths[k] for k in ('clip', 'train', 'vocabulary') if k in paths}))
    path = cache.external_path(os.path.dirname(paths['clip']), EXTERNAL, VOCAB, N_K, T1, T1_READING, TAU1, RELEASED,
                                 settings['split'])

    def build():
        t = vocabulary(clip_train)
        if t.shape[1] != clip_train.shape[1]:
            raise CacheError(f"the training images' CLIP features are {clip_train.shape[1]}-d but the vocabulary "
                             f"{t.shape[1]}-d: they come from different CLIP models; run dataset_extract.py and "
                             f"nouns_embed.py with the same --clip_model and --clip_pretrained")
        half = RELEASED and device.startswith('cuda')  # the authors' Eq. 5-6 runs in fp16 on the GPU
        return external_features(clip_train, t, TAU1, device=device, half=half).numpy()
    return cache.cached(path, settings, build, 'train.py', FORCE, rebuild_stale='the external features',
                          quiet=True)[0]


# -----------------------------------------------------------------------------
# Algorithm 2
def views_for(epochs):
    """Augmented views extracted per train image by default: two fresh ones, (2t, 2t+1), for each epoch
    t (Algorithm 2, line 10); dataset_extract.py's AUG_VIEWS None extracts as many."""
    return 2 * epochs


def pick_views(n, n_views, gen, epoch=0):
    """Which two augmented views of each image form (v1, v2) at `epoch` (Algorithm 2, line 10:
    new views every epoch): views 2t and 2t+1 at epoch t when views_for(EPOCHS) are stored (the
    default extraction); a random pair of the stored ones when fewer; the fixed pair (0, 1) of the
    authors' code when RELEASED or when only two are stored."""
    z = torch.zeros(n, dtype=torch.long)
    if n_views < 2:
        return z, z
    if RELEASED or n_views == 2:
        return z, z + 1
    if n_views >= views_for(EPOCHS):
        return z + 2 * epoch, z + 2 * epoch + 1
    first = torch.randint(n_views, (n,), generator=gen)
    second = (first + 1 + torch.randint(n_views - 1, (n,), generator=gen)) % n_views
    return first, second


def train_heads(bits, x_train, aug, e, device, tau2, t2, s=None, y=None, v=None):
    """Algorithm 2: Adam on Hv and He, per-epoch learning rate of Eq. 10-11, in-batch positives (Eq. 8)
    and L_BCL (Eq. 1). A baseline's loss on Hv alone replaces L_BCL (baselines.batch_loss); the
    quantization methods refit their codebooks after every epoch. Returns (hv, he, opt, codebooks)."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    out_dim = baselines.out_dim(METHOD, bits, v)
    if METHOD in QUANTIZED:
        pq_shape(bits, out_dim)  # a code length it cannot split fails here, before training
    hv = HashHead(x_train.shape[1], out_dim).to(device)
    he = HashHead(e.shape[1], bits).to(device) if e is not None else None
    opt = torch.optim.Adam(list(hv.parameters()) + (list(he.parameters()) if he is not None else []), lr=LR_MIN)
    x_cpu, x_train = x_train, torch.as_tensor(x_train).to(device)
    e, aug, s, y, v = (torch.as_tensor(a).to(device) if a is not None else None for a in (e, aug, s, y, v))
    n, codebooks, pq = len(x_train), None, None
    bar = tqdm(range(EPOCHS), desc=f'train {bits} bits', unit='epoch')
    for epoch in bar:
        lr = lr_at(epoch, LR_MIN, LR_MAX, WARMUP, EPOCHS)  # Eq. 10-11
        for g in opt.param_groups:
            g['lr'] = lr
        hv.train()
        he is not None and he.train()
        perm = torch.randperm(n, generator=gen).to(device)
        views = [w.to(device) for w in pick_views(n, aug.shape[1] if aug is not None else 0, gen, epoch)]
        total = torch.zeros((), device=device)  # summed on the device: no GPU sync at every step
        for a in range(0, n, BATCH_SIZE):
            idx = perm[a:a + BATCH_SIZE]
            if len(idx) < 2 or (RELEASED and len(idx) < BATCH_SIZE):  # BatchNorm needs two; drop_last (released)
                continue
            x1, x2 = ((aug[idx, w[idx]].float() for w in views) if aug is not None  # two views (stored in fp16)
                      else (x_train[idx], None))                                      # AUG off: one plain view
            if METHOD != 'duheg':
                loss = baselines.batch_loss(METHOD, hv, x_train, idx, (x1, x2), s, y, v, gen, pq)
            else:
                pos = positives(e[idx], t2, SIM) if e is not None else torch.eye(len(idx), dtype=torch.bool,
                                                                                  device=device)  # Eq. 8; IMGAUG: {i}
                loss = bcl_loss(hv(x1), hv(x2) if x2 is not None else None, he(e[idx]) if e is not None else None,
                                pos, tau2, clamp=RELEASED)  # Eq. 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        bar.set_postfix(loss=f'{total.item() / n:.4f}', lr=f'{lr:.2e}')
        if METHOD in QUANTIZED:
            codebooks, pq = baselines.refit_codebooks(torch.as_tensor(encode(hv, x_cpu, device)), bits, codebooks,
                                                      SEED, device)
    return hv, he, opt, codebooks


def train_competitor(bits, x_train, aug, device, n_classes):
    """A competitor of Table 1 on its authors' loop, through its module's plain functions (baselines.COMPETITORS):
    its head and optimiser (a fresh one where a phase starts), its learning rate set before every step, its
    per-epoch state (HHCH's clustering, MeCoQ's code memory, CGHash's mined neighbours), its loss on the batch's two
    stored views (pick_views, as DUH-EG's) and plain features; EPOCHS and BATCH_SIZE resolved by method_config.
    Returns (head, None, opt, None), as train_heads."""
    own = COMPETITORS[METHOD]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    head = own.build_head(x_train.shape[1], bits, DATASET, n_classes).to(device)
    x_train, aug = torch.as_tensor(x_train).to(device), torch.as_tensor(aug).to(device)
    n, opt = len(x_train), None
    steps = -(-n // BATCH_SIZE)  # batches an epoch, the last one shorter
    bar = tqdm(range(EPOCHS), desc=f'train {METHOD} {bits} bits', unit='epoch')
    for epoch in bar:
        if own.starts_phase(epoch):
            opt = own.optimizer(head, epoch)
        head.train()
        state = own.epoch_start(head, x_train, aug, epoch, gen, device)
        perm = torch.randperm(n, generator=gen).to(device)
        views = [w.to(device) for w in pick_views(n, aug.shape[1], gen, epoch)]
        total = torch.zeros((), device=device)
        for k in range(steps):
            idx = perm[k * BATCH_SIZE:(k + 1) * BATCH_SIZE]
            lr = own.step_lr(epoch, epoch * steps + k, steps, EPOCHS)
            if len(idx) < 2:  # a contrastive loss needs two items
                continue
            for g in opt.param_groups:  # the authors' rate of this step
                g.update(lr=lr)
            v1, v2 = (aug[idx, w[idx]].float() for w in views)  # two stored views (fp16)
            loss = own.batch_loss(head, x_train[idx], v1, v2, idx, state, epoch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        bar.set_postfix(loss=f'{total.item() / n:.4f}', lr=f'{lr:.2e}')
    return head, None, opt, None


@torch.no_grad()
def encode(hv, x, device, batch=4096):
    hv.eval()
    return torch.cat([hv(torch.as_tensor(x[a:a + batch]).to(device)).cpu() for a in range(0, len(x), batch)]).numpy()


# -----------------------------------------------------------------------------
def missing_inputs(paths):
    """One line for the first input of this run that is not there yet, naming the step that makes it
    and the settings to give it; for the features, also what this cache holds."""
    for name, path in paths.items():
        if os.path.exists(path):
            continue
        if name == 'vocabulary':
            flags = f"--vocab={VOCAB} --clip_model={CLIP_MODEL} --clip_pretrained={CLIP_PRETRAINED}"
            flags += f" --cache_dir={CACHE_DIR}" + (f" --n_k={N_K} --t1={T1}" if EXTERNAL == 'efc' else '')
            if EXTERNAL == 'efc' and T1_READING != nouns_embed.RELEASED_DEFAULTS['T1_READING'][RELEASED]:
                flags += f" --t1_reading={T1_READING}"
            return (f"{path} does not exist: run nouns_embed.py first (step 2): python nouns_embed.py {flags}"
                    f"{' --released' if RELEASED else ''}")
        if name == 'classes':
            return f"{path} does not exist: --method=dvsq reads the labels' names; give --class_names=FILE"
        d = cache.dataset_dir(CACHE_DIR, DATASET)
        held = sorted(f for f in os.listdir(d) if os.path.exists(os.path.join(d, f, 'images.npy.json'))) \
            if os.path.isdir(d) else []
        flags = f"--dataset={DATASET} --cache_dir={CACHE_DIR}" + (f" --split_dir={SPLIT_DIR}" if SPLIT_DIR else
                                                                   f" --split_seed={SPLIT_SEED}")
        flags += f" --backbone={BACKBONE} --backbone_pretrained={BACKBONE_PRETRAINED}"
        if BACKBONE not in models.CLIP_MODELS:
            flags += f" --clip_model={CLIP_MODEL} --clip_pretrained={CLIP_PRETRAINED}"
        have = (f"; {d} holds the features of {', '.join(held)} (pass train.py the --backbone and "
                f"--backbone_pretrained, --clip_model and --clip_pretrained they were extracted with)") if held else ''
        views = ' (its augmented views: --aug_views=2 or more; or train with --aug=false)' if name == 'views' else ''
        return (f"{path} does not exist: run dataset_extract.py first (step 1): python dataset_extract.py {flags}"
                f"{' --released' if RELEASED else ''}{views}{have}")
    return None


def check_settings():
    """Every setting checked, and the None ones resolved (RELEASED_DEFAULTS), before any work."""
    global BACKBONE_PRETRAINED
    check_choice('dataset', DATASET, dataset.DATASETS)
    check_ranges(globals(), _RANGES)
    if not BITS:
        raise SystemExit("error: --bits is empty: give the code lengths, e.g. --bits=16,32,64")
    if WARMUP >= EPOCHS and METHOD not in COMPETITORS:  # a competitor has its own schedule
        raise SystemExit(f"error: --warmup={WARMUP} must be below --epochs={EPOCHS} (Eq. 10-11: T_warm < T_max)")
    if LR_MIN > LR_MAX:
        raise SystemExit(f"error: --lr_min={LR_MIN} must be at most --lr_max={LR_MAX} (Eq. 10-11)")
    check_choice('external', EXTERNAL, ('efc', 'ek', 'imgk', 'imgcls', 'none'))
    if EXTERNAL == 'none' and not AUG:
        raise SystemExit("error: --external=none (IMGAUG) trains on two augmented views: it needs --aug=true")
    check_choice('method', METHOD, baselines.METHODS)
    if not AUG and METHOD in TWO_VIEWS:
        raise SystemExit(f"error: --aug=false: --method={METHOD} trains on two augmented views of each image (--aug "
                         f"is DUH-EG's Table 2 switch); leave --aug on")
    check_choice('clip_model', CLIP_MODEL, models.CLIP_MODELS)
    BACKBONE_PRETRAINED = BACKBONE_PRETRAINED or models.default_weights(BACKBONE)
    globals().update(released_defaults(globals(), RELEASED_DEFAULTS))
    check_choice('t1_reading', T1_READING, nouns_embed.T1_RANGES)
    nouns_embed.check_t1(T1, T1_READING)
    check_choice('view_recipe', VIEW_RECIPE, views.VIEW_RECIPES)
    if not isinstance(NORM_INPUTS, bool):
        raise SystemExit(f"error: --norm_inputs={NORM_INPUTS!r}: choose true or false")


def method_config(cfg, given):
    """What a competitor (baselines.COMPETITORS) trains with, as its run records it: EPOCHS and BATCH_SIZE as typed
    on the command line (`given`, the settings typed there), else its authors' (its module's); METHOD_SETTINGS, its
    module's settings with METHOD_ARGS applied (baselines.method_settings), which key the run. {} for DUH-EG and
    the baselines (train.py's EPOCHS and BATCH_SIZE). reproduce.py predicts a cell's config with it."""
    settings = baselines.method_settings(cfg['METHOD'], cfg.get('METHOD_ARGS') or '')
    if not settings:
        return {}
    return dict({k: cfg[k] if k in given else settings[k] for k in ('EPOCHS', 'BATCH_SIZE')}, METHOD_SETTINGS=settings)


def check_method(cfg):
    """A competitor's EPOCHS, BATCH_SIZE and settings resolved (method_config) into this run's settings, its module
    and `cfg`, then checked before any work: its batch size and every code length."""
    global EPOCHS, BATCH_SIZE
    resolved = method_config(cfg, given_settings())
    if not resolved:
        return
    EPOCHS, BATCH_SIZE = resolved['EPOCHS'], resolved['BATCH_SIZE']
    baselines.use_settings(METHOD, resolved['METHOD_SETTINGS'])
    cfg.update(resolved)
    own = COMPETITORS[METHOD]
    if METHOD == 'mecoq' and BATCH_SIZE > own.BATCH_SIZE:  # a batch's soft codes must fit the memory's enqueue size
        raise SystemExit(f"error: --batch_size={BATCH_SIZE}: MeCoQ's code memory takes batches of at most its "
                         f"BATCH_SIZE, {own.BATCH_SIZE} (methods/mecoq.py); give --batch_size={own.BATCH_SIZE} or less")
    for bits in BITS:
        try:
            own.build_head(8, bits, DATASET, 2)
        except ValueError as e:
            raise SystemExit(f"error: --bits={bits}: {e}") from None
    typed = ', '.join(f'--{k.lower()} given' for k in sorted(given_settings() & {'EPOCHS', 'BATCH_SIZE'}))
    print(f"{METHOD}: {EPOCHS} epochs, batches of {BATCH_SIZE} ({typed or 'as its authors ran it'}), "
          f"methods/{METHOD}.py's settings {METHOD_ARGS or 'as in the file'}")


def targets(feats, labels, train, clip_train, device):
    """What the loss reads beside the features: e (Eq. 5-6) for DUH-EG, a baseline's similarity s,
    DVSQ's word vectors v."""
    e = s = v = None
    if METHOD == 'duheg' and EXTERNAL != 'none':
        e = external_cache(clip_train, train, device)  # Eq. 5-6
        n_pos = positives(torch.as_tensor(e[:BATCH_SIZE]), T2).sum(1).float().mean().item()
        print(f"mean in-batch positives at T2={T2}: {n_pos:.1f} of {min(BATCH_SIZE, len(e))}")
    s = baselines.similarity(METHOD, feats[train], labels[train])
    if METHOD == 'dvsq':
        path = CLASS_NAMES or os.path.join(cache.dataset_dir(CACHE_DIR, DATASET), 'classes.txt')
        v = baselines.class_vectors(path, labels.shape[1], CLIP_MODEL, CLIP_PRETRAINED, device)
        print(f"DVSQ word vectors: {CLIP_MODEL} text features of {len(v)} class names")
    if METHOD in QUANTIZED and len(train) < PQ_WORDS:
        print(f"note: {len(train)} training items for {PQ_WORDS}-word codebooks: some words stay unused")
    return e, s, v


def fit_and_encode(bits, feats, aug, e, s, v, labels, split, device, tau2):
    """One code length: the method trained on the train set (fitted: LSH, ITQ), then the query and retrieval sets
    encoded. Returns ((hv, he, opt), h_q, h_r, pq), pq the retrieval set's product-quantized codes
    (baselines.quantized_codes; {} for binary codes). A competitor's hv is its own head."""
    query, retrieval, train = split
    if METHOD in UNTRAINED:  # a projection fitted on the training features
        h_q, h_r = baselines.untrained_codes(METHOD, feats[train], (feats[query], feats[retrieval]), bits, SEED)
        return (None, None, None), h_q, h_r, {}
    if METHOD in COMPETITORS:
        hv, he, opt, codebooks = train_competitor(bits, feats[train], aug, device, labels.shape[1])
    else:
        hv, he, opt, codebooks = train_heads(bits, feats[train], aug, e, device, tau2, T2, s,
                                             labels[train] if METHOD == 'dvsq' else None, v)
    h_q, h_r = encode(hv, feats[query], device), encode(hv, feats[retrieval], device)
    return (hv, he, opt), h_q, h_r, baselines.quantized_codes(METHOD, hv, codebooks, h_r, feats[retrieval])


def score(h_q, h_r, pq, y_q, y_r, topk):
    """(MAP@topk of the codes: Hamming ranking, or AQD of the product-quantized codes pq; the continuous outputs'
    MAP)."""
    mAP_cont = eval_hash.map_continuous(h_q, h_r, y_q, y_r, topk)
    if not pq:
        return eval_hash.mean_average_precision(eval_hash.to_codes(h_q), eval_hash.to_codes(h_r), y_q, y_r, topk), \
            mAP_cont
    return eval_hash.map_aqd(h_q, pq['retrieval_codes'], pq['codebooks'], y_q, y_r, topk, pq['aqd']), mAP_cont


def save_run(out, result, nets, h_q, h_r, labels, query, retrieval, pq):
    """<out>/heads.pt, codes.npz and result.json of one code length, each written whole."""
    hv, he, opt, in_dim, e_dim = nets
    ckpt = dict(hv=hv and hv.state_dict(), he=he and he.state_dict(), bits=result['bits'], in_dim=in_dim,
                e_dim=e_dim, optimizer=opt and opt.state_dict(), epoch=EPOCHS, config=result['config'],
                codebooks=torch.as_tensor(pq['codebooks']) if pq else None, out_dim=h_q.shape[1],
                n_classes=labels.shape[1])
    atomic_write(os.path.join(out, 'heads.pt'), lambda f: torch.save(ckpt, f))
    atomic_write(os.path.join(out, 'codes.npz'), lambda f: np.savez(
        f, query_h=h_q, retrieval_h=h_r, query_labels=labels[query], retrieval_labels=labels[retrieval],
        query_index=query, retrieval_index=retrieval, topk=result['topk'], **pq))
    cache.save_json(os.path.join(out, 'result.json'), result)


def deterministic(mode):
    """torch.use_deterministic_algorithms(mode) without the import of torch._inductor it makes for compiled code
    (2.3 s of every run on torch 2.14, measured): nothing here is compiled. Falls back to torch's own call."""
    flag = getattr(torch._C, '_set_deterministic_algorithms', None)
    if flag is None or 'torch._inductor.config' in sys.modules:
        torch.use_deterministic_algorithms(mode)
    else:
        flag(mode)


def main():
    global RUN_DIR
    cfg = configure(globals())
    check_settings()
    cfg.update({k: globals()[k] for k in ('BACKBONE_PRETRAINED', *RELEASED_DEFAULTS)})
    check_method(cfg)
    tau2, topk = tau2_for(DATASET, TAU2), TOPK or dataset.DATASETS[DATASET]['topk']
    paths = input_paths(cfg)
    missing = missing_inputs(paths)
    if missing:
        raise SystemExit(f"error: {missing}")
    inputs = cache.fingerprints(**paths)  # what the results are made from, recorded with them
    device = resolve_device(DEVICE)
    if THREADS:
        torch.set_num_threads(THREADS)
    deterministic(device == 'cpu')

    feats, aug, clip_train, labels, query, retrieval, train = load_features()
    classes = os.path.join(cache.dataset_dir(CACHE_DIR, DATASET), 'classes.txt')
    warning = dataset.one_label_warning(labels, external.read_word_lines(classes) if os.path.isfile(classes) else None)
    if warning:
        print(warning)
    print(f"{DATASET}: {len(query)} query, {len(retrieval)} retrieval, {len(train)} train images; features "
          f"{feats.shape[1]}-d; method {METHOD}"
          f"{' (supervised: reads the training labels)' if METHOD in SUPERVISED else ''}")
    e, s, v = targets(feats, labels, train, clip_train, device)
    sha, key = runs.run_key(cfg, inputs)
    RUN_DIR = RUN_DIR or os.path.join('runs', runs.run_name(cfg, sha))  # a folder per run key
    runs.claim_run_dir(RUN_DIR, sha, key, FORCE)  # refuses a folder of another run, unless --force
    made = dict(commit=provenance.git_commit(), machine=provenance.machine(device))  # where each line comes from
    for bits in BITS:
        t0 = time.time()
        nets, h_q, h_r, pq = fit_and_encode(bits, feats, aug, e, s, v, labels, (query, retrieval, train), device, tau2)
        t_eval = time.time()
        mAP, mAP_cont = score(h_q, h_r, pq, labels[query], labels[retrieval], topk)
        out = os.path.join(RUN_DIR, f'{bits}bits')
        result = dict(dataset=DATASET, method=METHOD, supervised=METHOD in SUPERVISED, bits=bits, topk=topk,
                      ranking=f"aqd-{pq['aqd']}" if pq else 'hamming', map=round(float(mAP), 6),
                      map_continuous=round(float(mAP_cont), 6), seconds=round(time.time() - t0, 2),
                      eval_seconds=round(time.time() - t_eval, 2), date=time.strftime('%Y-%m-%dT%H:%M:%S%z'), **made,
                      run_dir=out, run_key=sha, config=dict(cfg, BITS=bits, TAU2=tau2, RUN_DIR=RUN_DIR), inputs=inputs)
        save_run(out, result, (*nets, feats.shape[1], e.shape[1] if e is not None else None),
                 h_q, h_r, labels, query, retrieval, pq)
        result['heads_sha256'] = cache.sha256_file(os.path.join(out, 'heads.pt'))  # the trained weights, checksummed
        runs.write_result(RESULTS, result)
        print(f"result dataset={DATASET} method={METHOD} bits={bits} {eval_hash.map_text(mAP, topk, len(h_r))} "
              f"{'(AQD ranking of product-quantized codes) ' if pq else ''}map_continuous@{topk}={mAP_cont:.4f} "
              f"({'continuous features' if pq else 'released-code ranking, not binary'}) "
              f"seconds={result['seconds']} run={out}")


if __name__ == '__main__':
    try:
        main()
    except (DataError, CacheError, ValueError, models.WeightsUnavailable, OSError) as e:
        raise SystemExit(cache.user_error(e, dict(results=RESULTS, run_dir=RUN_DIR, cache_dir=CACHE_DIR)))
