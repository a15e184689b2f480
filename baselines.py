"""The other methods as train.py runs them, on DUH-EG's protocol (the same frozen features, split, views and MAP):
which inputs each reads, and its step. One file per method family lives under methods/ (DeepHash-pytorch's layout);
this file is the one harness and table train.py calls.

Baselines, trained by train.train_heads' loop (Adam on a HashHead, Eq. 10-11's rate, train.py's EPOCHS and
BATCH_SIZE; batch_loss in place of L_BCL): SSDH, DHN, DCH (methods/pairwise.py), CIBHash (methods/cibhash.py), the
product quantizers DQN, DVSQ, DTQ (methods/pq.py; codebooks refitted after every epoch, refit_codebooks), and the
training-free floors LSH and ITQ (methods/lsh_itq.py).

Competitors of the paper's Table 1, each a port of its authors' code (methods/hhch.py, mecoq.py, cghash.py; their
docstrings list the commit read and every departure), trained by train.train_competitor on their authors' loop:
their own head, optimiser, learning-rate schedule, EPOCHS and BATCH_SIZE, through the same few plain functions of
each module (build_head, starts_phase, optimizer, step_lr, epoch_start, batch_loss; MeCoQ also encode_codes,
codebooks and AQD). Their settings (a module's UPPER_CASE constants) can be changed per run with train.py
--method_args and key the run (method_settings).
"""
import shlex

import numpy as np

from configurator import configure
from methods import cghash, hhch, mecoq
from methods.cibhash import cibhash_loss
from methods.lsh_itq import itq_codes, lsh_codes
from methods.pairwise import dch_loss, dhn_loss, label_similarity, ssdh_loss, ssdh_similarity
from methods.pq import (AQD, DQN_LAMBDA, DTQ_LAMBDA, DVSQ_LAMBDA, PQ_DIM, PQ_FIT_ITERS, PQ_UPDATE_ITERS, PQ_WORDS,
                        dqn_loss, dtq_loss, dvsq_loss, dvsq_quant_loss, pq_decode, pq_encode, pq_fit, pq_loss,
                        pq_shape)

# -----------------------------------------------------------------------------
# the methods: which inputs each reads, and its loss on a mini-batch
METHODS = {'duheg': 'this paper', 'ssdh': 'SSDH, unsupervised', 'cibhash': 'CIBHash, unsupervised',
           'dhn': 'DHN, supervised', 'dch': 'DCH, supervised', 'dqn': 'DQN, supervised, quantization',
           'dvsq': 'DVSQ, supervised, quantization', 'dtq': 'DTQ, supervised, quantization',
           'lsh': 'random projection, no training', 'itq': 'PCA-ITQ, no training',
           'hhch': 'HHCH (TIP 2024), unsupervised, its authors\' loop',
           'mecoq': 'MeCoQ (AAAI 2022), unsupervised, quantization, its authors\' loop',
           'cghash': 'CGHash (ACM MM 2023), unsupervised, its authors\' loop'}
SUPERVISED = frozenset({'dhn', 'dch', 'dqn', 'dvsq', 'dtq'})  # baselines that read the training labels
UNTRAINED = frozenset({'lsh', 'itq'})   # baselines fitted in closed form: no heads, no epochs
QUANTIZED = frozenset({'dqn', 'dvsq', 'dtq', 'mecoq'})  # product-quantized codes, ranked by AQD (eval_hash.map_aqd)
TWO_VIEWS = frozenset({'cibhash', 'hhch', 'mecoq', 'cghash'})  # methods trained on augmented views, as DUH-EG
COMPETITORS = {'hhch': hhch, 'mecoq': mecoq, 'cghash': cghash}  # Table 1's ports, each on its authors' loop
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
    """The harness's product quantizer after an epoch (fitted on the CPU from every training item's z, refined
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


# -----------------------------------------------------------------------------
# the competitors: their settings, heads and codes (train.train_competitor trains them)
def method_settings(method, args=''):
    """A competitor's settings as its run records them (they key the run): its module's plain UPPER_CASE constants
    (the configurator's reading of methods/<method>.py, as of a script) with `args`, train.py's --method_args
    ('--clusters=20,10 --per_row_loss=false'), applied, and its tables (per-dataset rows) as they are. {} for
    DUH-EG and the baselines. A bad key or value stops with one line; --method_args=--help lists the settings."""
    own = COMPETITORS.get(method)
    if own is None:
        if args.strip():
            raise SystemExit(f"error: --method_args={args!r}: --method={method} has no settings of its own (only "
                             f"{', '.join(COMPETITORS)} have); leave --method_args empty")
        return {}
    try:
        settings = configure(dict(vars(own)), shlex.split(args))
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        why = str(e.code).removeprefix('error: ').replace('(--help', '(--method_args=--help')
        raise SystemExit(f"error in --method_args={args!r} (methods/{method}.py): {why}") from None
    tables = {k: {str(key): v for key, v in t.items()} for k, t in vars(own).items()
              if k.isupper() and not k.startswith('_') and isinstance(t, dict)}
    return dict(settings, **tables)


def use_settings(method, settings):
    """Set a competitor's module constants to a run's METHOD_SETTINGS (its tables are recorded, never set); returns
    the values they replace, to put back."""
    g, new = vars(COMPETITORS[method]), {k: v for k, v in settings.items() if not isinstance(v, dict)}
    old = {k: g[k] for k in new if k in g}
    g.update(new)
    return old


def load_head(ckpt, bits):
    """The trained head a train.py checkpoint (heads.pt) holds, in eval mode: Hv, a models.HashHead, or a
    competitor's own head, built by its module under the run's recorded settings."""
    from models import HashHead
    cfg = ckpt['config']
    own = COMPETITORS.get(cfg.get('METHOD'))
    if own is None:
        head = HashHead(ckpt['in_dim'], bits)
    else:
        old = use_settings(cfg['METHOD'], cfg.get('METHOD_SETTINGS') or {})
        try:  # the head is built under the run's settings; the module keeps its own
            head = own.build_head(ckpt['in_dim'], bits, cfg['DATASET'], ckpt.get('n_classes'))
        finally:
            use_settings(cfg['METHOD'], old)
    head.load_state_dict(ckpt['hv'])
    return head.eval()


def quantized_codes(method, head, codebooks, h_r, x_r):
    """The retrieval set of a quantization method as eval_hash.map_aqd ranks it, {retrieval_codes, codebooks, aqd}:
    the harness's product quantizer of the embeddings h_r (`codebooks`, refit_codebooks), or a competitor's own
    (MeCoQ: its words, and the hard assignment of the features x_r); {} for binary codes."""
    own = COMPETITORS.get(method)
    if own is not None and method in QUANTIZED:
        return dict(retrieval_codes=own.encode_codes(head, x_r), codebooks=own.codebooks(head).numpy(), aqd=own.AQD)
    if codebooks is None:
        return {}
    words = pq_encode(h_r, codebooks).numpy().astype(np.uint8 if PQ_WORDS <= 256 else np.uint16)
    return dict(retrieval_codes=words, codebooks=codebooks.numpy(), aqd=AQD)
