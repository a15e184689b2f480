"""The external feature of an image (Section 3.3, Eq. 5-6): its weights over the nouns of a vocabulary
and their weighted mean, and the vocabulary a run built it from, read from its config. train.py
builds e_i with it, eval_hash.py draws Figure 7's top nouns with it, search.py turns words into codes
with it.
"""
import os
import warnings

import torch
import torch.nn.functional as F

from cache import (feature_dir, image_names, load_array, load_features, selection_dir, split_paths, split_tag,
                   vocab_dir, vocab_tag)
from models import clip_build, pretrained_tag


def _read_only(a):
    """A float32 tensor of the array `a`, memory-mapped and read-only ones (a cache's) without torch's
    warning that writing to it is undefined: it is only read here."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        return torch.as_tensor(a, dtype=torch.float32)


def noun_weights(i, t, tau1, device='cpu', half=False):
    """Eq. 6: s_{i,w} = softmax_w(cos(i_i, t_w) / tau1), the weight of noun w in image i's external
    feature (Figure 7 draws the largest); i and t need not be normalised. Returns (s, t normalised)."""
    dtype = torch.float16 if half else torch.float32
    i = F.normalize(_read_only(i), dim=1).to(device, dtype)
    t = F.normalize(_read_only(t), dim=1).to(device, dtype)
    return torch.softmax(i @ t.T / tau1, dim=1), t


def external_features(i, t, tau1, chunk=2048, device='cpu', half=False):
    """Eq. 5: e_i = normalise(sum_w s_{i,w} t_w) for every image, the weights s of Eq. 6 (half: in
    fp16, as the authors' code on a GPU)."""
    out = []
    for a in range(0, len(i), chunk):
        s, t_n = noun_weights(i[a:a + chunk], t, tau1, device, half)
        out.append(s @ t_n)
    return F.normalize(torch.cat(out).float(), dim=1).cpu()


# -----------------------------------------------------------------------------
# the vocabulary of a run (Table 3: efc the selected nouns t_com, ek and imgcls every noun, imgk the
# training images), where nouns_embed.py and dataset_extract.py left it (cache.py's layout)
def vocabulary_path(cfg):
    """The nouns file a run with config `cfg` (train.py's settings, resolved) reads, or None (imgk, none)."""
    nouns = (cfg['CACHE_DIR'], cfg['VOCAB'], cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'])
    if cfg['EXTERNAL'] == 'efc':
        return os.path.join(selection_dir(*nouns, cfg['N_K'], cfg['T1'], cfg['RELEASED'], cfg['T1_READING']),
                            'selected_feats.npy')
    if cfg['EXTERNAL'] in ('ek', 'imgcls'):
        return os.path.join(vocab_dir(*nouns, cfg['RELEASED']), 'noun_feats.npy')
    return None


def vocabulary_settings(cfg):
    """What every reader expects the sidecar of a run's vocabulary (nouns_embed.py's noun_feats.npy, or
    for efc selected_feats.npy) to hold: the CLIP that embedded it, the word list, the selection."""
    want = dict(clip_build=clip_build(cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED']), clip_model=cfg['CLIP_MODEL'],
                clip_pretrained=pretrained_tag(cfg['CLIP_PRETRAINED']), vocab=vocab_tag(cfg['VOCAB']),
                released=bool(cfg['RELEASED']))
    if cfg['EXTERNAL'] == 'efc':
        want.update(n_k=cfg['N_K'], t1=cfg['T1'], t1_reading=cfg['T1_READING'])
    return want


def clip_images_path(cfg):
    """The CLIP features of every image of the run's dataset (dataset_extract.py), Eq. 5's i_i."""
    return os.path.join(feature_dir(cfg['CACHE_DIR'], cfg['DATASET'], cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'],
                                    cfg.get('VIEW_RECIPE') or 'simclr'), 'images.npy')


def read_word_lines(path):
    """The lines of a word list nouns_embed.py wrote (UTF-8, one a line)."""
    with open(path, encoding='utf-8') as f:
        return f.read().split('\n')[:-1]


def run_vocabulary(cfg, words=False, mmap=False):
    """(t, words or None): the vocabulary the external feature of a run with config `cfg` is built from
    (Eq. 5), trusted by the one rule of every cache (its sidecar holds vocabulary_settings, its checksum
    holds, and with `words` the word list's). imgk: the training images' CLIP features, named by their files."""
    if cfg['EXTERNAL'] == 'imgk':
        feats = load_features(cfg['CACHE_DIR'], cfg['DATASET'], cfg['CLIP_MODEL'], cfg['CLIP_PRETRAINED'],
                              cfg.get('VIEW_RECIPE') or 'simclr', mmap=mmap)
        train = load_array(split_paths(cfg['CACHE_DIR'], cfg['DATASET'], split_tag(cfg['SPLIT_SEED'],
                                                                                   cfg.get('SPLIT_DIR')))['train'])
        names = image_names(cfg['CACHE_DIR'], cfg['DATASET'], len(feats)) if words else None
        return feats[train], names and [names[i] for i in train]
    path = vocabulary_path(cfg)
    if path is None:
        raise ValueError(f"--external={cfg['EXTERNAL']} builds no external feature from a vocabulary")
    words_file = 'selected_words.txt' if cfg['EXTERNAL'] == 'efc' else 'noun_words.txt'
    flags = f"--vocab={cfg['VOCAB']} --clip_model={cfg['CLIP_MODEL']} --clip_pretrained={cfg['CLIP_PRETRAINED']}"
    flags += f" --n_k={cfg['N_K']} --t1={cfg['T1']}" if cfg['EXTERNAL'] == 'efc' else ''
    t = load_array(path, vocabulary_settings(cfg),
                   producer=f"nouns_embed.py {flags}{' --released' if cfg['RELEASED'] else ''}", mmap=mmap,
                   companions=[words_file] if words else ())
    if not words:
        return t, None
    return t, [line.split('\t')[0] for line in read_word_lines(os.path.join(os.path.dirname(path), words_file))]
