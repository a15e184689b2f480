"""Step 2: the external knowledge of Section 3.2 (Algorithm 1, lines 1-13; Eq. 2-4).

Every noun of a vocabulary (all WordNet noun lemmas by default) is embedded by CLIP's text
tower as the normalised mean of seven prompt features (Eq. 2); exact-duplicate features are
dropped; spherical K-means groups the nouns into N_k clusters; the nouns far from their
centre (Eq. 3) and, per cluster, the normal noun most probably in it (Eq. 4) form t_com,
from which train.py builds each image's external feature e_i (Eq. 5-6).

    python nouns_embed.py                     # WordNet, CLIP ViT-B/16, N_k = 800, T1 = 0.9
    python nouns_embed.py --vocab=imagenet    # ImageNet class names (Table 5)
    python nouns_embed.py --vocab=wordnet:2000  # a fixed sample of 2,000 WordNet nouns: quick runs only
    python nouns_embed.py --t1=0.8            # reuses the cached features and K-means (Figure 5a)
    python nouns_embed.py --released          # the authors' released code (README: Paper or released code)
"""
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cache import (CacheError, cache_status, cached, kmeans_dir, load_array, read_sidecar, save_array, save_json,
                   save_text, selection_dir, user_error, vocab_dir, vocab_sample, vocab_tag)
from configurator import check_choice, check_ranges, choice_error, configure, released_defaults
from dataset import DataError, read_lines
from external import read_word_lines
from models import WeightsUnavailable, clip_build, encode_text_cut, hardware, load_clip, pretrained_tag, resolve_device

# -----------------------------------------------------------------------------
# vocabulary
VOCAB = 'wordnet'                  # 'wordnet' (all noun lemmas), 'imagenet' (1k class names) or a word-list file;
                                   # '<vocab>:<n>' (wordnet:2000): a fixed sample of n of its words (seed 0, in the
                                   # vocabulary's order), caches of its own: quick runs, never the paper's vocabulary
WORDNET_DIR = '/usr/share/wordnet'  # WordNet 3.0 dict folder, used when nltk's own wordnet data is absent
PROMPTS = ('itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.',
           'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.')  # Eq. 2: CLIP's 7 ImageNet templates
# text encoder (Eq. 2)
CLIP_MODEL = 'ViT-B-16'            # open_clip name: ViT-B-16, ViT-B-32 (Table 6), tiny-test (a tiny CLIP for quick
                                   # runs and tests: the README's offline quick start, with random weights)
CLIP_PRETRAINED = 'openai'         # open_clip tag, a local checkpoint file, or 'random': random weights, no download
                                   # (quick runs, tests: nouns that mean nothing about the images)
BATCH_SIZE = None                  # prompts per text-encoder batch; None: 1024 on a GPU, 128 on the CPU (the
                                   # fastest on each)
CHUNK_PROMPTS = 100000             # Eq. 2's running sums are saved after every chunk of this many prompts (the unit
                                   # of resuming after a kill)
PRECISION = None                   # 'fp32', 'fp16' (GPU) or 'bf16' autocast; None: fp16 on a GPU (as OpenAI's clip.load
                                   # runs CLIP on CUDA), fp32 on the CPU
# clustering (Eq. 3-4)
N_K = 800                          # N_k, number of K-means clusters
T1 = 0.9                           # Eq. 3 threshold, read as T1_READING says
T1_READING = None                  # Eq. 3: 'distance' keeps dis(t_w, c_k) = 2 - 2cos > T1 (the paper's text),
                                   # 'similarity'
                                   # keeps cos > T1 (the authors' code); None: distance, or similarity with --released
KMEANS_ITERS = None                # most Lloyd iterations per restart; None: 40, or the authors' 300 with --released
KMEANS_RESTARTS = None             # restarts, the best objective is kept; None: 1, or the authors' 10 with --released
KMEANS_TOL = None                  # a restart stops when an iteration raises the objective by less than this fraction;
                                   # None: 1e-5, or 0 (every iteration runs) with --released
KMEANS_SEED = 0                    # seed of the seeding (restart r uses KMEANS_SEED + r)
KMEANS_INIT = None                 # 'k-means++' (greedy, on a sample of 20 N_k points) or 'random' points; None:
                                   # k-means++, or random with --released
# the authors' released code (XLearning-SCU/2025-ICML-DUHEG)
RELEASED = False                   # all of the authors' choices: case-sensitive WordNet lemma names with underscores
                                   # kept,
                                   # Eq. 2 as the mean of raw prompt features, 2-NN duplicate deletion, fp16 CLIP (GPU),
                                   # the K-means schedule and Eq. 3 reading above, Eq. 4 over all nouns, t_com = t_rep
# system
CACHE_DIR = 'cache'                # nouns/<vocab>_<model>_<weights>/ is written here
DEVICE = 'auto'                    # 'auto', 'cpu', 'cuda', 'cuda:1', ...
THREADS = 0                        # torch CPU threads; 0 leaves torch's default (1 is faster on a busy CPU)
FORCE = False                      # rebuild the cached features, K-means and selection
# -----------------------------------------------------------------------------
_RANGES = dict(BATCH_SIZE='[1, inf)', CHUNK_PROMPTS='[1, inf)', N_K='[1, inf)', KMEANS_ITERS='[1, inf)',
               KMEANS_RESTARTS='[1, inf)', KMEANS_TOL='[0, inf)', KMEANS_SEED='[0, inf)',
               THREADS='[0, inf)')  # checked before any work
T1_RANGES = {'distance': (0, 4), 'similarity': (-1, 1)}  # T1 by its reading of Eq. 3: 2 - 2cos, or cos
RELEASED_DEFAULTS = dict(  # each None setting above: (its default, the authors' released code's), by RELEASED
    KMEANS_ITERS=(40, 300), KMEANS_RESTARTS=(1, 10), KMEANS_TOL=(1e-5, 0.0),  # faiss Kmeans(niter=300, nredo=10)
    KMEANS_INIT=('k-means++', 'random'), T1_READING=('distance', 'similarity'))
_CACHE_VERSION = 1                 # bump when the meaning of a cached file changes
_KPP_SAMPLE = 20                   # k-means++ seeds from a random sample of this many points per cluster


# -----------------------------------------------------------------------------
# vocabulary
_LEXNAMES = (['adj.all', 'adj.pert', 'adv.all', 'noun.Tops']  # WordNet 3.0's lexicographer files, in order
             + ['noun.' + s for s in 'act animal artifact attribute body cognition communication event feeling food '
                'group location motive object person phenomenon plant possession process quantity relation shape '
                'state substance time'.split()]
             + ['verb.' + s for s in 'body change cognition communication competition consumption contact creation '
                'emotion motion perception possession social stative weather'.split()] + ['adj.ppl'])


def _wordnet_reader(cache_dir, wordnet_dir):
    """(nltk's WordNet reader, where from): nltk's own data if installed, else a copy of the dict
    folder `wordnet_dir` under cache_dir/nltk_data (nltk reads only below its data roots, and
    wants a `lexnames` file that Debian's wordnet-base lacks). The copy is made once, in a
    temporary folder renamed into place, so a killed copy is never used."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    root = os.path.abspath(os.path.join(cache_dir, 'nltk_data'))
    dest = os.path.join(root, 'corpora', 'wordnet')
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
        return wordnet, wordnet_dir if str(wordnet.root).startswith(root) else 'nltk data'
    except (LookupError, OSError):
        pass
    if not os.path.isdir(dest):
        if not os.path.isfile(os.path.join(wordnet_dir, 'data.noun')):
            raise SystemExit(f"error: no WordNet: nltk has no wordnet data and {wordnet_dir}/data.noun does not exist. "
                             f"Install it: apt-get install wordnet-base (or point --wordnet_dir at a WordNet 3.0 "
                             f"dict folder), or python -m nltk.downloader wordnet")
        tmp = f'{dest}.tmp-{os.getpid()}'
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in os.listdir(wordnet_dir):
            if name.startswith(('data.', 'index.')) or name.endswith('.exc') or name in ('lexnames', 'cntlist.rev'):
                shutil.copyfile(os.path.join(wordnet_dir, name), os.path.join(tmp, name))
        if not os.path.exists(os.path.join(tmp, 'lexnames')):
            pos = dict(noun=1, verb=2, adj=3, adv=4)
            save_text(os.path.join(tmp, 'lexnames'),
                      [f"{i:02d}\t{n}\t{pos[n.split('.')[0]]}" for i, n in enumerate(_LEXNAMES)])
        if not os.path.exists(os.path.join(tmp, 'index.sense')):
            save_text(os.path.join(tmp, 'index.sense'), [])  # only nltk's multilingual mapping reads it
        try:
            os.rename(tmp, dest)
        except OSError:  # another run put its copy there first
            shutil.rmtree(tmp, ignore_errors=True)
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The multilingual functions are not available')
        return WordNetCorpusReader(nltk.data.find('corpora/wordnet'), None), wordnet_dir


def read_words(vocab, cache_dir=CACHE_DIR, wordnet_dir=WORDNET_DIR, released=False):
    """(words, tag, source): the vocabulary's words, de-duplicated, in a fixed order.
    wordnet: every noun lemma name, lower-cased, sorted (117,798 in WordNet 3.0); released: the
    lemma names as the synsets spell them, case kept (119,034, the words of the authors'
    WordNet_Nouns.csv), sorted; imagenet: open_clip's 1k class names; otherwise a text file with
    one word per line (blank lines skipped, first occurrence kept; a .csv file's first line is its
    header, as pandas reads the authors' WordNet_Nouns.csv). '<vocab>:<n>': sample_words of it."""
    if vocab_sample(vocab)[1] is not None:
        return sample_words(vocab, cache_dir, wordnet_dir, released)
    if vocab == 'wordnet':
        reader, where = _wordnet_reader(cache_dir, wordnet_dir)
        if released:
            words = sorted({lemma.name() for s in reader.all_synsets('n') for lemma in s.lemmas()})
        else:
            words = sorted({w.lower() for w in reader.all_lemma_names('n')})
        return words, 'wordnet', f'WordNet {reader.get_version()} ({where})' + (', case kept' if released else '')
    if vocab == 'imagenet':
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        return list(dict.fromkeys(IMAGENET_CLASSNAMES)), 'imagenet', 'open_clip IMAGENET_CLASSNAMES'
    if not os.path.isfile(vocab):
        raise SystemExit(f"error: --vocab={vocab!r} is neither 'wordnet', 'imagenet' nor an existing word-list file")
    try:  # UTF-8, a byte-order mark left out; another encoding names the line and the fix
        lines = read_lines(vocab)[1 if vocab.lower().endswith('.csv') else 0:]
    except (OSError, DataError) as e:
        raise SystemExit(f"error: cannot read the word-list file {vocab}: {e}")
    words = list(dict.fromkeys(w for w in (' '.join(line.split()) for line in lines) if w))
    if not words:
        raise SystemExit(f"error: the word-list file {vocab} holds no words (one word per line expected)")
    return words, vocab_tag(vocab), os.path.abspath(vocab)


def sample_words(vocab, cache_dir=CACHE_DIR, wordnet_dir=WORDNET_DIR, released=False):
    """read_words of a sample '<vocab>:<n>': n words of the vocabulary drawn without replacement with
    seed 0 (always the same n), kept in the vocabulary's order; tagged '<tag>-sample<n>' (vocab_tag)."""
    base, n = vocab_sample(vocab)
    words, _, source = read_words(base, cache_dir, wordnet_dir, released)
    if not 1 <= n <= len(words):
        raise SystemExit(f"error: --vocab={vocab}: a sample of {n} words of {source}, which holds {len(words)}; "
                         f"choose 1 to {len(words)}, or --vocab={base} for all of them")
    keep = np.sort(np.random.default_rng(0).choice(len(words), n, replace=False))
    return [words[i] for i in keep], vocab_tag(vocab), f'{source}, a sample of {n} of its {len(words)} words (seed 0)'


# -----------------------------------------------------------------------------
# Eq. 2: t_w = normalised mean of the normalised features of the noun's prompts
_SAFE_WORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 '_.,/()+:-]*[A-Za-z0-9])?")


def _prompt_tokens(words, prompts, tokenizer):
    """Token ids (with start/end tokens) of every prompt p.format(w), word-major: prompt p of word i is
    entry i * len(prompts) + p. With open_clip's CLIP tokenizer, a plain ASCII word (letters or
    digits at both ends) after a space and before a space or punctuation gives the same tokens
    alone as inside its prompt, so each template's tokens are reused (WordNet: 5x faster than
    tokenizing its 824k prompts, and identical); other words and templates go the full way."""
    import open_clip.tokenizer as octok
    n_ctx, sot, eot = tokenizer.context_length, tokenizer.sot_token_id, tokenizer.eot_token_id
    fast = isinstance(tokenizer, octok.SimpleTokenizer) and tokenizer.reduction_fn is None \
        and getattr(tokenizer, 'clean_fn', None) is getattr(octok, '_clean_lower', object())
    parts = []
    for p in prompts:
        pre, _, post = p.partition('{}')
        ok = p.isascii() and (pre == '' or pre[-1] == ' ') and (post == '' or post[0] in ' .,;:!?')
        parts.append((tokenizer.encode(pre), tokenizer.encode(post)) if ok else None)
    out = []
    for w in words:
        texts = [p.format(w) for p in prompts]
        if fast and _SAFE_WORD.fullmatch(w) and '&' not in w:
            wt = tokenizer.encode(w)
            toks = [[sot] + part[0] + wt + part[1] + [eot] if part else [sot] + tokenizer.encode(t) + [eot]
                    for part, t in zip(parts, texts)]
        else:
            toks = [[sot] + tokenizer.encode(t) + [eot] for t in texts]
        for t in toks:
            if len(t) > n_ctx:  # the tokenizer's truncation
                t[n_ctx - 1:] = [eot]
        out.extend(toks)
    return out


def prompt_texts(words, prompts=PROMPTS, keep_underscores=False):
    """The prompts of Eq. 2, word-major; WordNet's underscores become spaces (paper) unless kept."""
    return [p.format(w if keep_underscores else w.replace('_', ' ')) for w in words for p in prompts]


def _autocast(device, precision):
    """The autocast context of a precision setting: fp32 (none), fp16 (a GPU) or bf16."""
    if precision == 'fp32':
        return nullcontext()
    check_choice('precision', precision, ('fp32', 'fp16', 'bf16'))
    if torch.device(device).type == 'cpu' and precision == 'fp16':
        raise SystemExit("error: --precision=fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    return torch.autocast(torch.device(device).type, dtype=torch.float16 if precision == 'fp16' else torch.bfloat16)


def _saved_sums(progress):
    """(running sums of Eq. 2, the prompts they hold) that a stopped run saved with the same settings
    (progress: (path, settings, prompts per chunk)), else (None, 0)."""
    if progress is None or cache_status(progress[0], progress[1]) != 'ok':
        return None, 0
    t_w = np.array(load_array(progress[0], progress[1], 'nouns_embed.py'))
    done = read_sidecar(progress[0])['settings']['prompts_done']
    print(f"resuming Eq. 2 after {done} prompts (saved by a stopped run in {progress[0]})")
    return t_w, done


@torch.no_grad()
def embed_words(words, model, tokenizer, batch_size=128, device='cpu', prompts=PROMPTS,
                precision='fp32', keep_underscores=False, raw_mean=False, progress=None):
    """Eq. 2: t_w (len(words) x D float32, unit rows), the L2-normalised mean of the
    L2-normalised CLIP features of the word's prompts (as in CLIP's prompt-engineering
    notebook); raw_mean: the mean of the raw prompt features, then normalised (the authors'
    code). Prompts are encoded once per distinct token sequence, in length-sorted batches
    cut after their longest end-of-text token (models.encode_text_cut), then put back in order.
    progress (path, settings, prompts per chunk): the running sums are saved after each chunk,
    and a run stopped part-way goes on from them, to the same bytes as a run never stopped."""
    dev, autocast = torch.device(device), _autocast(device, precision)
    n_p = len(prompts)
    toks = _prompt_tokens([w if keep_underscores else w.replace('_', ' ') for w in words], prompts, tokenizer)
    uniq = {}
    uid = np.fromiter((uniq.setdefault(tuple(t), len(uniq)) for t in toks), dtype=np.int64, count=len(toks))
    lengths = np.fromiter(map(len, uniq), dtype=np.int64, count=len(uniq))
    flat = np.fromiter(chain.from_iterable(uniq), dtype=np.int64, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    del uniq, toks
    order = np.argsort(lengths, kind='stable')              # processing order of the distinct prompts
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    occ = np.argsort(rank[uid], kind='stable')              # every (word, prompt) entry, in processing order
    occ_rank, occ_word = rank[uid[occ]], occ // n_p
    t_w, first = _saved_sums(progress)
    starts = range(first, len(order), batch_size)
    lo = np.searchsorted(occ_rank, first, side='left')
    for s in tqdm(starts, desc=f'Eq. 2: {len(words)} words, {len(lengths)} prompts', unit='batch', mininterval=2):
        idx = order[s:s + batch_size]
        pos = np.arange(lengths[idx].max())
        real = pos < lengths[idx, None]                      # cut after the batch's longest prompt
        batch = torch.from_numpy(np.where(real, flat[np.where(real, offsets[idx, None] + pos, 0)], 0))
        with autocast:
            f = encode_text_cut(model, batch.to(dev))
        f = (f.float() if raw_mean else F.normalize(f.float(), dim=-1)).cpu().numpy()
        t_w = np.zeros((len(words), f.shape[1]), dtype=np.float32) if t_w is None else t_w
        hi = np.searchsorted(occ_rank, s + len(idx), side='left')
        np.add.at(t_w, occ_word[lo:hi], f[occ_rank[lo:hi] - s])  # sequential, so equal prompts give equal sums
        lo = hi
        if progress and (s + len(idx)) // progress[2] > s // progress[2] and s + len(idx) < len(order):
            save_array(progress[0], t_w, dict(progress[1], prompts_done=int(s + len(idx))), 'nouns_embed.py')
    return t_w / np.linalg.norm(t_w, axis=1, keepdims=True).clip(min=1e-12)


def drop_duplicates(t):
    """Indices of the first occurrence of each distinct row (exact equality of the float32
    bytes, found by hashing the rows), in order."""
    t = np.ascontiguousarray(t, dtype=np.float32)
    first = {}
    for i, row in enumerate(t):
        first.setdefault(row.tobytes(), i)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


def delete_2nn(t, chunk=4096):
    """The authors' duplicate deletion: each noun's two nearest neighbours by L2 distance (as
    faiss's IndexFlatL2 computes it, |x|^2 + |y|^2 - 2<x, y> in float32, ties to the lower
    index); wherever the first is not the noun itself, that neighbour is deleted; repeated
    until every noun finds itself first. Returns the kept indices, in order. Of exact
    duplicates the last survives (each copy finds the first one first)."""
    x = torch.as_tensor(np.ascontiguousarray(t, dtype=np.float32))
    keep = torch.arange(len(x))
    while True:
        xs = x[keep]
        sq = (xs * xs).sum(1)
        first = torch.empty(len(xs), dtype=torch.long)
        for a in range(0, len(xs), chunk):
            d = sq[a:a + chunk, None] + sq[None, :] - 2 * xs[a:a + chunk] @ xs.T
            first[a:a + chunk] = d.argmin(1)  # torch.argmin returns the first (lowest) index on a tie
        drop = first[first != torch.arange(len(xs))].unique()
        if not len(drop):
            return keep.numpy()
        mask = torch.ones(len(xs), dtype=torch.bool)
        mask[drop] = False
        keep = keep[mask]


# -----------------------------------------------------------------------------
# spherical K-means (Algorithm 1, line 4): unit-norm centres, assignment by cosine
def _assign(x, c, chunk=16384):
    """(nearest centre by cosine, that cosine) for each row of x; ties go to the lower index."""
    a = torch.empty(len(x), dtype=torch.long)
    s = torch.empty(len(x), dtype=torch.float32)
    for i in range(0, len(x), chunk):
        s[i:i + chunk], a[i:i + chunk] = (x[i:i + chunk] @ c.T).max(dim=1)
    return a, s


def _seed_centres(x, k, init, g):
    """k initial centres: greedy k-means++ (as scikit-learn's: of 2 + ln k candidates drawn with
    D^2 sampling, D^2 = 2 - 2cos, keep the one that lowers the total D^2 most) on a random sample
    of _KPP_SAMPLE * k points, or k distinct random points."""
    if init == 'random':
        return x[torch.randperm(len(x), generator=g)[:k]].clone()
    if init != 'k-means++':
        raise ValueError(choice_error('kmeans_init', init, ('k-means++', 'random')))
    xs = x[torch.randperm(len(x), generator=g)[:_KPP_SAMPLE * k]] if len(x) > _KPP_SAMPLE * k else x
    trials = 2 + int(np.log(k))
    idx = [int(torch.randint(len(xs), (1,), generator=g))]
    d2 = (2 - 2 * (xs @ xs[idx[0]])).clamp_(min=0)
    for _ in tqdm(range(k - 1), desc=f'k-means++ seeding on {len(xs)} points', mininterval=2, leave=False):
        if d2.sum() <= 0:  # fewer distinct points than k: any point
            idx.append(int(torch.randint(len(xs), (1,), generator=g)))
            continue
        cand = torch.multinomial(d2, trials, replacement=True, generator=g)
        new = torch.minimum(d2[:, None], (2 - 2 * (xs @ xs[cand].T)).clamp_(min=0))
        best = int(new.sum(0).argmin())
        idx.append(int(cand[best]))
        d2 = new[:, best].contiguous()
    return xs[idx].clone()


def spherical_kmeans(x, k, iters, restarts, seed, tol=1e-5, init='k-means++', verbose=True):
    """Spherical K-means on the unit rows of x: (centres k x D float32 unit rows, assign N int64),
    the best of `restarts` runs by the objective sum_w cos(t_w, c_assign(w)). Each run seeds with
    `init`, then alternates centre update and assignment for at most `iters` iterations, stopping
    when the objective rises by less than tol x objective (tol = 0: all `iters`, as faiss runs);
    `assign` is the nearest centre of the final centres. An empty cluster is re-seeded with the point
    farthest from its own centre."""
    x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    n, k = len(x), int(k)
    if not 1 <= k <= n:
        raise ValueError(f"K-means needs 1 <= N_K <= number of points, got N_K={k} for {n} points")
    best = None
    for r in range(restarts):
        g = torch.Generator().manual_seed(seed + r)
        c = _seed_centres(x, k, init, g)
        a, s = _assign(x, c)
        obj = float(s.double().sum())
        bar = tqdm(range(iters), desc=f'K-means {n} x {x.shape[1]}, k={k}, restart {r + 1}/{restarts}',
                   disable=not verbose, mininterval=2)
        for it in bar:
            c = torch.zeros_like(c).index_add_(0, a, x)  # c_k: normalised sum of its points
            empty = (torch.bincount(a, minlength=k) == 0).nonzero().ravel()
            if len(empty):
                c[empty] = x[torch.argsort(s, stable=True)[:len(empty)]]
            c = F.normalize(c, dim=1)
            a, s = _assign(x, c)
            new = float(s.double().sum())
            done = tol > 0 and new - obj <= tol * abs(new)
            obj = new
            bar.set_postfix(mean_cos=f'{obj / n:.5f}', refresh=False)
            if done:
                break
        bar.close()
        if verbose:
            print(f"K-means restart {r + 1}/{restarts}: {it + 1 if iters else 0} iterations, mean cos {obj / n:.6f}")
        if best is None or obj > best[0]:
            best = (obj, c, a)
    return best[1].numpy(), best[2].numpy()


# -----------------------------------------------------------------------------
# Eq. 3-4: the representative nouns t_rep and the centre nouns t_cen
def eq3_representative(t, centres, assign, t1, reading='distance'):
    """Eq. 3: the mask of representative nouns. 'distance' (the paper's text): dis(t_w, c_k) =
    2 - 2cos > t1, the nouns FAR from their centre; 'similarity' (the authors' code, where dis is
    the inner product faiss's spherical index returns): cos > t1, the nouns CLOSE to it."""
    if reading not in T1_RANGES:
        raise ValueError(f"T1_READING={reading!r}: choose one of {', '.join(T1_RANGES)}")
    t = torch.as_tensor(np.ascontiguousarray(t, dtype=np.float32))
    c = torch.as_tensor(np.ascontiguousarray(centres, dtype=np.float32))
    cos = (t * c[torch.as_tensor(np.asarray(assign, dtype=np.int64))]).sum(1)
    return (2 - 2 * cos > t1) if reading == 'distance' else (cos > t1)


def select_from_clusters(t, centres, assign, t1, released=False, reading='distance', chunk=16384):
    """(idx_rep, idx_cen) for unit rows t, unit centres c_k and each row's cluster `assign`.
    Eq. 3: t_rep by eq3_representative under `reading`, the rest are t_nor.
    Eq. 4: p_{w,k} = softmax_k cos(t_w, c_k) over all centres; for each cluster k, of the normal
    nouns whose most probable cluster is k, the one with the highest p_{w,k} joins t_cen.
    released: the authors' code, where the Eq. 4 step runs over all nouns, with each centre the
    normalised mean of its members. Both sorted."""
    t = torch.as_tensor(np.ascontiguousarray(t, dtype=np.float32))
    c = torch.as_tensor(np.ascontiguousarray(centres, dtype=np.float32))
    a = torch.as_tensor(np.asarray(assign, dtype=np.int64))
    rep = eq3_representative(t, c, a, t1, reading)                   # Eq. 3
    if released:
        sums = torch.zeros_like(c).index_add_(0, a, t)
        counts = torch.bincount(a, minlength=len(c))
        c = F.normalize(sums[counts > 0] / counts[counts > 0, None], dim=1)  # an empty cluster has no mean
    cand = torch.arange(len(t)) if released else (~rep).nonzero().ravel()
    pk = torch.empty(len(cand), dtype=torch.float64)
    kk = torch.empty(len(cand), dtype=torch.long)
    for i in range(0, len(cand), chunk):                            # Eq. 4
        pk[i:i + chunk], kk[i:i + chunk] = torch.softmax((t[cand[i:i + chunk]] @ c.T).double(), dim=1).max(dim=1)
    top = torch.full((len(c),), -1.0, dtype=torch.float64).scatter_reduce(0, kk, pk, 'amax')
    hit = (pk == top[kk]).numpy()                                   # the highest p_{w,k} of cluster k = argmax_k p
    _, first = np.unique(kk.numpy()[hit], return_index=True)        # one per cluster: the lowest index on a tie
    idx_cen = np.sort(cand.numpy()[hit][first])
    return rep.nonzero().ravel().numpy(), idx_cen


def select_vocabulary(t, n_k, t1, iters, restarts, seed, tol=1e-5, released=False, init='k-means++',
                      verbose=True, reading='distance'):
    """Algorithm 1, lines 4-13 on any unit-row feature matrix t: spherical K-means with n_k
    clusters, then Eq. 3-4. Returns (idx_rep, idx_cen); t_com = union (t_rep alone if released).
    train.py also runs it on image features (the IMGCLS ablation of Table 3)."""
    centres, assign = spherical_kmeans(t, n_k, iters, restarts, seed, tol, init, verbose)
    idx_rep, idx_cen = select_from_clusters(t, centres, assign, t1, released, reading)
    _check_selection(idx_rep if released else np.union1d(idx_rep, idx_cen), n_k, t1, released)
    return idx_rep, idx_cen


def _check_selection(idx_com, n_k, t1, released):
    if len(idx_com) == 0:
        raise ValueError(f"no noun selected with N_K={n_k}, T1={t1}" + (
            " (released: t_com = t_rep only, and no noun passes Eq. 3 at this T1; change --t1)" if released
            else "; lower --t1 or raise --n_k"))


# -----------------------------------------------------------------------------
def _sha256_lines(lines):
    return hashlib.sha256(''.join(w + '\n' for w in lines).encode()).hexdigest()


def check_t1(t1, reading, key='--t1'):
    """T1 within the range of its reading of Eq. 3: a distance 2 - 2cos in [0, 4], a cosine in [-1, 1]."""
    lo, hi = T1_RANGES[reading]
    for v in (t1 if isinstance(t1, (tuple, list)) else (t1,)):
        if not lo <= v <= hi:
            raise SystemExit(f"error: {key}={v} is outside [{lo}, {hi}], the range of Eq. 3's {reading} reading "
                             f"({'2 - 2cos' if reading == 'distance' else 'cos'} of a noun and its centre)")


# -----------------------------------------------------------------------------
# Algorithm 1 in three cached steps
def embed_step(words, source, vtag, device, batch, precision):
    """Lines 1-3 (Eq. 2) and the duplicates: (t, kept words, sidecar), cached in vocab_dir."""
    settings = dict(producer='nouns_embed.py', cache_version=_CACHE_VERSION, clip_model=CLIP_MODEL,
                    clip_pretrained=pretrained_tag(CLIP_PRETRAINED), clip_build=clip_build(CLIP_MODEL, CLIP_PRETRAINED),
                    vocab=vtag, released=RELEASED, words_read=len(words), words_sha256=_sha256_lines(words),
                    prompts=list(PROMPTS), underscores='keep' if RELEASED else 'space', precision=precision,
                    eq2_mean='raw' if RELEASED else 'normalised', dedup='2-NN deletion' if RELEASED else 'exact')
    vdir = vocab_dir(CACHE_DIR, VOCAB, CLIP_MODEL, CLIP_PRETRAINED, RELEASED)

    progress = (os.path.join(vdir, '.progress', 'eq2_sums.npy'), dict(settings, batch_size=batch), CHUNK_PROMPTS)
    if FORCE:
        shutil.rmtree(os.path.dirname(progress[0]), ignore_errors=True)

    def build():
        model, _, tokenizer = load_clip(CLIP_MODEL, CLIP_PRETRAINED, device)
        t0 = time.time()
        t_all = embed_words(words, model, tokenizer, batch, device, PROMPTS, precision, RELEASED, RELEASED, progress)
        keep = delete_2nn(t_all) if RELEASED else drop_duplicates(t_all)
        dropped = np.setdiff1d(np.arange(len(words)), keep)
        if len(dropped) and RELEASED:
            print(f"2-NN deletion dropped {len(dropped)} nouns, e.g. {', '.join(repr(words[i]) for i in dropped[:5])}")
        elif len(dropped):
            first = {t_all[i].tobytes(): i for i in keep}
            print(f"dropped {len(dropped)} nouns whose t_w equals an earlier noun's, e.g. "
                  + ', '.join(f"{words[i]!r} = {words[first[t_all[i].tobytes()]]!r}" for i in dropped[:5]))
        save_text(os.path.join(vdir, 'noun_words.txt'), [words[i] for i in keep])
        return t_all[keep], dict(seconds=time.time() - t0, hardware=hardware(device), vocab_source=source,
                                 duplicates=len(dropped))
    t, meta = cached(os.path.join(vdir, 'noun_feats.npy'), settings, build, 'nouns_embed.py', FORCE, ['noun_words.txt'])
    shutil.rmtree(os.path.dirname(progress[0]), ignore_errors=True)  # what it saved is in noun_feats.npy now
    return t, read_word_lines(os.path.join(vdir, 'noun_words.txt')), meta



def cluster_step(t, feats_meta, iters, restarts, tol, init, device):
    """Line 4: spherical K-means into N_K clusters, cached apart from T1: (centres, assign, sidecar)."""
    settings = dict(feats_meta['settings'], n_k=N_K, kmeans_iters=iters, kmeans_restarts=restarts,
                    kmeans_seed=KMEANS_SEED, kmeans_tol=tol, kmeans_init=init, noun_feats_sha256=feats_meta['sha256'])
    for k in ('seconds', 'hardware', 'vocab_source', 'duplicates', 'noun_words.txt_sha256'):
        settings.pop(k, None)  # what the features' step measured, not what made them
    kdir = kmeans_dir(CACHE_DIR, VOCAB, CLIP_MODEL, CLIP_PRETRAINED, N_K, iters, restarts, KMEANS_SEED, init, tol,
                      RELEASED)

    c_path, a_path = os.path.join(kdir, 'centres.npy'), os.path.join(kdir, 'assign.npy')
    run = {}

    def build():
        t0 = time.time()
        run['centres'], run['assign'] = spherical_kmeans(t, N_K, iters, restarts, KMEANS_SEED, tol, init)
        return run['centres'], dict(seconds=time.time() - t0, hardware=hardware(device))
    # the assignment is written after the centres, whose checksum its sidecar holds: without it, both are rebuilt
    centres, meta = cached(c_path, settings, build, 'nouns_embed.py', FORCE or not os.path.exists(a_path + '.json'))
    assign, _ = cached(a_path, dict(settings, centres_sha256=meta['sha256']), lambda: run['assign'], 'nouns_embed.py',
                       force=bool(run), quiet=True)
    return centres, assign, meta


def select_step(t, kept, centres, assign, km_meta, feats_meta, reading, cfg, device):
    """Lines 5-13: Eq. 3-4, t_com = t_rep ∪ t_cen (t_rep alone with --released), cached per T1:
    the counts of selection.json."""
    both = {r: int(eq3_representative(t, centres, assign, T1, r).sum()) for r in T1_RANGES}
    print(f"Eq. 3 at T1={T1}: the distance reading (paper's text, 2 - 2cos > T1) keeps {both['distance']} nouns, the "
          f"similarity reading (authors' code, cos > T1) keeps {both['similarity']}; this run uses {reading}")
    sdir = selection_dir(CACHE_DIR, VOCAB, CLIP_MODEL, CLIP_PRETRAINED, N_K, T1, RELEASED, reading)
    settings = {k: v for k, v in km_meta['settings'].items() if k not in ('seconds', 'hardware')}
    settings.update(t1=T1, t1_reading=reading, centres_sha256=km_meta['sha256'])

    def build():
        t0 = time.time()
        idx_rep, idx_cen = select_from_clusters(t, centres, assign, T1, RELEASED, reading)
        idx_com = idx_rep if RELEASED else np.union1d(idx_rep, idx_cen)  # released code: t_cen is dropped
        try:
            _check_selection(idx_com, N_K, T1, RELEASED)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        counts = dict(read=feats_meta['settings']['words_read'], unique=len(t), t_rep=len(idx_rep),
                      t_cen=len(idx_cen), t_com=len(idx_com), reading=reading, t_rep_by_reading=both)
        counts['duplicates'] = counts['read'] - len(t)
        seconds = dict(embedding=feats_meta['settings']['seconds'], clustering=km_meta['settings']['seconds'],
                       selection=time.time() - t0)
        seconds['total'] = sum(seconds.values())  # the pre-processing time of Table 4
        where = [m['settings'].get('hardware', 'not recorded') for m in (feats_meta, km_meta)] + [hardware(device)]
        where = where[0] if len(set(where)) == 1 else \
            '; '.join(f'{step} on {w}' for step, w in zip(('embedding', 'clustering', 'selection'), where))
        save_text(os.path.join(sdir, 'selected_words.txt'),
                  [f"{kept[i]}\t{'rep' if r else 'cen'}" for i, r in zip(idx_com, np.isin(idx_com, idx_rep))])
        save_json(os.path.join(sdir, 'selection.json'), dict(
            counts, seconds=seconds, hardware=where, vocab_source=feats_meta['settings']['vocab_source'],
            kmeans=dict(iters=cfg['KMEANS_ITERS'], restarts=cfg['KMEANS_RESTARTS'],
                        mean_cos=float((t * centres[assign]).sum(1).mean())), config=cfg))
        return t[idx_com]
    cached(os.path.join(sdir, 'selected_feats.npy'), settings, build, 'nouns_embed.py', FORCE,
           ['selected_words.txt', 'selection.json'], load=False)
    with open(os.path.join(sdir, 'selection.json')) as f:
        return dict(json.load(f), dir=sdir, t_rep_by_reading=both)


def resolve_settings(device):
    """The None settings resolved (RELEASED_DEFAULTS; PRECISION and BATCH_SIZE by the device), then checked."""
    globals().update(released_defaults(globals(), RELEASED_DEFAULTS))
    precision = PRECISION or ('fp16' if device.startswith('cuda') else 'fp32')
    check_choice('precision', precision, ('fp32', 'fp16', 'bf16'))
    if precision == 'fp16' and not device.startswith('cuda'):  # refused before any cache is touched
        raise SystemExit("error: --precision=fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    if RELEASED and PRECISION is None and precision == 'fp32':
        print("note: the authors' code runs CLIP in fp16 on a GPU; on this CPU it runs in fp32")
    check_choice('kmeans_init', KMEANS_INIT, ('k-means++', 'random'))
    check_choice('t1_reading', T1_READING, T1_RANGES)
    check_t1(T1, T1_READING)
    if any(p.count('{}') != 1 for p in PROMPTS):
        raise SystemExit(f"error: every prompt needs exactly one '{{}}' for the noun, got {PROMPTS}")
    return batch_size_for(device), precision


def batch_size_for(device):
    """The BATCH_SIZE setting resolved: as given, else what suits the device (1024 prompts on a GPU, 128 on
    a CPU)."""
    return BATCH_SIZE or (1024 if device.startswith('cuda') else 128)


def main():
    cfg = configure(globals())
    check_ranges(globals(), _RANGES)
    t_start = time.time()
    device = resolve_device(DEVICE)
    batch, precision = resolve_settings(device)
    cfg.update({k: globals()[k] for k in RELEASED_DEFAULTS}, PRECISION=precision, BATCH_SIZE=batch)
    if THREADS:
        torch.set_num_threads(THREADS)

    words, vtag, source = read_words(VOCAB, CACHE_DIR, WORDNET_DIR, RELEASED)  # Algorithm 1's input: the nouns
    print(f"nouns read: {len(words)} from {source}")
    t, kept, feats_meta = embed_step(words, source, vtag, device, batch, precision)  # lines 1-3 (Eq. 2)
    print(f"kept after de-duplication: {len(t)} ({len(words) - len(t)} "
          f"{'deleted by 2-NN' if RELEASED else 'exact duplicates'} dropped)")
    if not 1 <= N_K <= len(t):
        raise SystemExit(f"error: N_K={N_K} clusters for {len(t)} nouns; choose 1 <= --n_k <= {len(t)}")
    centres, assign, km_meta = cluster_step(t, feats_meta, KMEANS_ITERS, KMEANS_RESTARTS, KMEANS_TOL, KMEANS_INIT,
                                            device)                                           # line 4
    counts = select_step(t, kept, centres, assign, km_meta, feats_meta, T1_READING, cfg, device)  # lines 5-13

    both = counts['t_rep_by_reading']
    print(f"t_rep (Eq. 3, {'2 - 2cos' if T1_READING == 'distance' else 'cos'} > T1={T1}): {counts['t_rep']}")
    print(f"t_cen (Eq. 4, one per cluster{', over all nouns' if RELEASED else ''}): {counts['t_cen']}")
    print(f"t_com = {'t_rep (released)' if RELEASED else 't_rep ∪ t_cen'}: {counts['t_com']} -> {counts['dir']}")
    print(f"nouns vocab={vtag} read={len(words)} unique={len(t)} t_rep={counts['t_rep']} t_cen={counts['t_cen']} "
          f"t_com={counts['t_com']} reading={T1_READING} t_rep_distance={both['distance']} "
          f"t_rep_similarity={both['similarity']} seconds={time.time() - t_start:.1f}")


if __name__ == '__main__':
    try:
        main()
    except (CacheError, WeightsUnavailable, OSError, ValueError) as e:
        raise SystemExit(user_error(e, dict(cache_dir=CACHE_DIR)))
