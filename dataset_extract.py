"""Step 1 (Section 4.1.2): frozen-backbone features of every image.

Writes, under CACHE_DIR/<dataset>/:
  labels.npy, names.txt, classes.txt      every image's labels and file name
  <split>/query.npy, retrieval.npy, train.npy   the split (indices), drawn once with SPLIT_SEED
  <backbone>-<weights>/images.npy          the plain (un-augmented) view of every image, N x F
  <backbone>-<weights>/train_aug_<split>.npy   AUG_VIEWS augmented views of each train image, Nt x V x F (fp16)
(`-released` is appended to the feature folder under the authors' view recipe, VIEW_RECIPE=released.)
With BACKBONE=vgg16 the CLIP_MODEL features (images.npy) are extracted too: the external
feature needs CLIP's space. Work is saved in chunks, so a killed run resumes where it stopped.
Several GPUs or machines: torchrun --nproc_per_node=N dataset_extract.py ... (same files).
"""
import glob
import hashlib
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cache
import dataset
import models
import nouns_embed
import train
import views
from cache import (CacheError, cached, dataset_dir, feature_dir, load_array, read_sidecar, reusable, save_array,
                   save_json, save_text, split_paths, split_tag)
from configurator import check_choice, check_ranges, configure, released_defaults
from dataset import DataError, load_images, make_split, read_split_dir, split_rule
from models import hardware, load_backbone, pretrained_tag, resolve_device
from views import augment_settings, augment_transform

# data
DATASET = 'cifar10'        # cifar10 | nuswide | flickr25k | mscoco | folder (your own DATA_PATH/<class>/<img>) | demo
                           # (400 generated images of 10 classes, no files: the offline quick start)
DATA_PATH = ''             # '' -> data/<dataset>
DOWNLOAD = True            # CIFAR-10 only: download it when missing
SPLIT_SEED = 0             # seed of the query/retrieval/train split (Section 4.1.1)
SPLIT_DIR = ''             # your own split: a folder with query.txt, retrieval.txt, train.txt list files
QUERY = None               # override the query size (per class for cifar10/nuswide/folder), None: the paper's
TRAIN = None               # override the train size likewise
# backbone
BACKBONE = nouns_embed.CLIP_MODEL  # ViT-B-16 | ViT-B-32 (Table 6) | vgg16 (Table 1, CNN rows) | tiny-test (a tiny
                           # CLIP for quick runs and tests: the README's offline quick start, with random weights)
BACKBONE_PRETRAINED = ''   # '' -> 'openai' for CLIP, 'imagenet' for vgg16; or a checkpoint file; 'random': random
                           # weights, no download (quick runs, tests: features that mean nothing about the images)
CLIP_MODEL = nouns_embed.CLIP_MODEL  # the CLIP whose image space the external feature lives in (used with vgg16):
                           # ViT-B-16 | ViT-B-32 | tiny-test
CLIP_PRETRAINED = nouns_embed.CLIP_PRETRAINED  # its weights: tag, checkpoint file, or 'random' (no download)
AUG_VIEWS = None           # augmented views per train image; None: 120 = 2 x T_max, a fresh pair (2t, 2t+1) in each of
                           # train.py's 60 epochs (Algorithm 2, line 10), or the one fixed pair (2) with --released
AUG_SEED = 0               # seed of the augmented views
VIEW_RECIPE = None         # 'simclr' (the backbone's own plain view and normalisation, AUG_* views of dataset.py) or
                           # 'released' (the authors' per-dataset views, ImageNet normalisation); None: simclr, or
                           # released with --released
RELEASED = False           # the authors' released code: their view recipe, one fixed pair of views, fp16 CLIP (GPU)
# system
CACHE_DIR = nouns_embed.CACHE_DIR  # where the three steps hand each other files
DEVICE = 'auto'            # auto | cpu | cuda | cuda:1 ...
PRECISION = None           # fp32 | bf16 | fp16 (autocast; fp16 on a GPU only); None: fp16 on a GPU (as OpenAI's
                           # clip.load runs CLIP on CUDA), fp32 on the CPU
VIEW_PATH = 'tensor'       # tensor: each image decoded once, its views made batched on DEVICE; pil: torchvision's PIL
                           # pipeline per view in the workers (the reference; same random draws, within 1-16/255)
BATCH_SIZE = 128           # images per forward pass
NUM_WORKERS = -1           # data-loading processes; -1: one per usable CPU core
CHUNK_BATCHES = 8          # batches per saved chunk (the unit of resuming and of sharding across ranks)
BAD_IMAGES = 'stop'        # stop | skip: an unreadable image stops the run, or is listed in bad_images.txt and dropped
                           # later
FORCE = False              # rebuild caches even when they exist
_RANGES = dict(SPLIT_SEED='[0, inf)', QUERY='[1, inf)', TRAIN='[1, inf)', AUG_VIEWS='[0, inf)', AUG_SEED='[0, inf)',
               BATCH_SIZE='[1, inf)', NUM_WORKERS='[-1, inf)', CHUNK_BATCHES='[1, inf)')  # checked before any work
_VERSION = 3               # bump when the features this script writes change meaning (2: augmented views in fp16;
                           # 3: one random stream per (seed, image, view), views made on the device)
RELEASED_DEFAULTS = dict(  # each None setting above: (its default, the authors' released code's), by RELEASED
    AUG_VIEWS=(train.views_for(train.EPOCHS), 2), VIEW_RECIPE=train.RELEASED_DEFAULTS['VIEW_RECIPE'])


def hash_names(names):
    return hashlib.sha256(cache.name_bytes('\n'.join(names))).hexdigest()[:16]


def setup_distributed():
    """(rank, world, device) under torchrun, else (0, 1, DEVICE)."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return 0, 1, resolve_device(DEVICE)
    local = int(os.environ.get('LOCAL_RANK', 0))
    device = resolve_device(DEVICE)
    if device.startswith('cuda'):
        torch.cuda.set_device(local)
        device = f'cuda:{local}'
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return dist.get_rank(), world, device


def barrier(world):
    if world > 1:
        dist.barrier()


def num_workers(n):
    """DataLoader workers for the NUM_WORKERS setting `n`: n, or one per usable CPU core when -1."""
    return len(os.sched_getaffinity(0)) if n < 0 else n


def loader_for(data, batches, device):
    """One DataLoader for a whole pass: its workers decode each image once (pinned memory for a GPU)."""
    cuda = device.startswith('cuda')
    return torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=NUM_WORKERS, pin_memory=cuda,
                                       collate_fn=views.collate_decoded, prefetch_factor=4 if NUM_WORKERS else None)


def encode_views(name, images, indices, transform, n_views, encode, out_path, settings, rank, world, device,
                 seed=None):
    """Features of n_views views of each image of images[indices] (seed None: the one plain view) in
    `out_path`, unless a trusted cache of `settings` is there: N x F float32 for the plain view,
    N x V x F float16 for views (extract_views)."""
    cached(out_path, settings, lambda: extract_views(name, images, indices, transform, n_views, encode, out_path,
                                                     settings, rank, world, device, seed),
           'dataset_extract.py', FORCE, load=False)


@torch.no_grad()
def extract_views(name, images, indices, transform, n_views, encode, out_path, settings, rank, world, device, seed):
    """One pass: each image decoded once, its views made on `device` (VIEW_PATH 'tensor') or by PIL in
    the workers ('pil'), BATCH_SIZE views per forward. Saved chunk by chunk (the unit of resuming,
    each rank its share), then merged in order by rank 0 into `out_path` and its sidecar."""
    per_chunk = max(1, BATCH_SIZE * CHUNK_BATCHES // n_views)  # images per chunk: about CHUNK_BATCHES forwards
    per_load = max(1, BATCH_SIZE // n_views)                   # images per loader batch
    chunk_dir = os.path.join(os.path.dirname(out_path), '.chunks', os.path.basename(out_path)[:-4])
    chunk_settings = dict(settings, batch_size=BATCH_SIZE, chunk=per_chunk)
    if FORCE and rank == 0 and os.path.isdir(chunk_dir):
        shutil.rmtree(chunk_dir)
    barrier(world)
    n_chunks = math.ceil(len(indices) / per_chunk)
    span = [(c * per_chunk, min((c + 1) * per_chunk, len(indices))) for c in range(n_chunks)]
    paths = [os.path.join(chunk_dir, f'{c:05d}.npy') for c in range(n_chunks)]
    todo = [c for c in range(rank, n_chunks, world)  # this rank's chunks not saved by an earlier run
            if not reusable(paths[c], chunk_settings, False, 'dataset_extract.py')]
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[PRECISION]
    # on a GPU the GPU makes the views; on the CPU the loader's workers make them beside the forward
    data = views.DecodedImages(images, indices, transform, n_views, seed, VIEW_PATH, BAD_IMAGES,
                                 make_here=not device.startswith('cuda'))
    batches = [list(range(a, min(a + per_load, span[c][1]))) for c in todo for a in range(*span[c], per_load)]
    with tqdm(total=sum(span[c][1] - span[c][0] for c in todo) * n_views, desc=name, unit='view', unit_scale=True,
              disable=(rank > 0 and world > 1) or not todo) as bar:
        pending, feats, bad, c_i, seen = [], [], [], 0, 0
        for x, draws, k, ok in (loader_for(data, batches, device) if todo else []):
            pending.append(views.make_views(x, draws, data.steps, device))
            bad += [int(indices[j]) for j, o in zip(k.tolist(), ok.tolist()) if not o]
            seen += len(k)
            c = todo[c_i]
            done = seen == span[c][1] - span[c][0]
            while pending and (done or sum(len(p) for p in pending) >= BATCH_SIZE):  # forwards of BATCH_SIZE views
                v = torch.cat(pending)
                pending = [v[BATCH_SIZE:]] if len(v) > BATCH_SIZE else []
                with torch.autocast(device.split(':')[0], dtype=dtype or torch.float32, enabled=dtype is not None):
                    feats.append(encode(v[:BATCH_SIZE]).float())
                bar.update(min(len(v), BATCH_SIZE))
            if done:  # a chunk's features in image order, views of an image together
                f = torch.cat(feats).cpu().numpy().reshape(seen, n_views, -1)
                f = f[:, 0] if seed is None else f.astype(np.float16)
                save_array(paths[c], f, dict(chunk_settings, bad=bad), 'dataset_extract.py')
                feats, bad, c_i, seen = [], [], c_i + 1, 0
    barrier(world)
    if rank == 0:
        metas = [read_sidecar(p) for p in paths]
        bad = sorted(sum((m['settings'].get('bad', []) for m in metas), []))
        shape, dt = (len(indices), *metas[0]['shape'][1:]), metas[0]['dtype']
        parts = ((np.s_[a:e], load_array(p, chunk_settings, 'dataset_extract.py')) for (a, e), p in zip(span, paths))
        cache.save_array_by_parts(out_path, shape, dt, dict(settings, bad=bad), 'dataset_extract.py', parts)
        shutil.rmtree(chunk_dir, ignore_errors=True)
    barrier(world)


def resolve_settings(device):
    """The None settings resolved (RELEASED_DEFAULTS; PRECISION by the device), then checked."""
    global PRECISION
    globals().update(released_defaults(globals(), RELEASED_DEFAULTS))
    if PRECISION is None:
        PRECISION = 'fp16' if device.startswith('cuda') else 'fp32'
        if RELEASED and PRECISION == 'fp32':
            print("note: the authors' code runs CLIP in fp16 on a GPU; on this CPU it runs in fp32")
    if not isinstance(AUG_VIEWS, int):  # its range was checked with the others (_RANGES)
        raise SystemExit(f"error: --aug_views={AUG_VIEWS!r} is not a whole number of views")
    check_choice('precision', PRECISION, ('fp32', 'bf16', 'fp16'))
    check_choice('bad_images', BAD_IMAGES, ('stop', 'skip'))
    if PRECISION == 'fp16' and not device.startswith('cuda'):
        raise SystemExit("error: --precision=fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    check_choice('view_path', VIEW_PATH, views.VIEW_PATHS)
    check_choice('view_recipe', VIEW_RECIPE, views.VIEW_RECIPES)


def split_step(images, rank, world):
    """The labels and the split (Section 4.1.1), cached: (data settings, split settings, query,
    retrieval, train). Every product records the settings (the images' fingerprint among them)."""
    ddir, tag = dataset_dir(CACHE_DIR, DATASET), split_tag(SPLIT_SEED, SPLIT_DIR)
    rule = split_rule(DATASET, QUERY, TRAIN)
    paths = split_paths(CACHE_DIR, DATASET, tag)
    data_settings = dict(dataset=DATASET, n_images=len(images), names_sha=hash_names(images.names),
                         images_sha=images.fingerprint())
    split_settings = dict(data_settings, split=tag, rule=rule,
                          split_dir=os.path.abspath(SPLIT_DIR) if SPLIT_DIR else '',
                          split_files=dataset.split_fingerprints(SPLIT_DIR) if SPLIT_DIR else {})

    def labels():
        save_text(os.path.join(ddir, 'names.txt'), images.names)
        save_text(os.path.join(ddir, 'classes.txt'), images.classes)
        return images.labels

    def split():  # query and retrieval first: train.npy, written last, vouches for the three
        query, retrieval, train = read_split_dir(SPLIT_DIR, images) if SPLIT_DIR else \
            make_split(images.labels, rule, SPLIT_SEED)
        for name, idx in (('query', query), ('retrieval', retrieval)):
            save_array(paths[name], idx, split_settings, 'dataset_extract.py')
        return train
    if rank == 0:
        cached(paths['labels'], data_settings, labels, 'dataset_extract.py', FORCE, load=False)
        source = dict(data_path=os.path.abspath(DATA_PATH), split_dir=os.path.abspath(SPLIT_DIR) if SPLIT_DIR else '',
                      images_sha=data_settings['images_sha'])  # where the pictures of eval_hash/search come from
        if not os.path.exists(cache.source_path(CACHE_DIR, DATASET)) or \
                cache.read_json(cache.source_path(CACHE_DIR, DATASET)) != source:  # nothing to write, nothing written
            save_json(cache.source_path(CACHE_DIR, DATASET), source)
        cached(paths['train'], split_settings, split, 'dataset_extract.py', FORCE, load=False)
    barrier(world)
    return (data_settings, split_settings,
            *(load_array(paths[p], split_settings, 'dataset_extract.py') for p in ('query', 'retrieval', 'train')))


def features_step(images, data_settings, split_settings, train, rank, world, device):
    """The backbone's plain view of every image and its augmented views of the train images, and
    CLIP's plain view when the backbone is not a CLIP (the external feature lives in CLIP's space).
    Returns the backbone's feature dimension."""
    jobs = [(BACKBONE, BACKBONE_PRETRAINED, AUG_VIEWS, models.BACKBONE_FLAGS)]
    if BACKBONE not in models.CLIP_MODELS:
        jobs.append((CLIP_MODEL, CLIP_PRETRAINED, 0, models.CLIP_FLAGS))
    dims = {}
    for backbone, pretrained, n_views, flags in jobs:  # flags: the settings an error names
        fdir = feature_dir(CACHE_DIR, DATASET, backbone, pretrained, VIEW_RECIPE)
        plain = os.path.join(fdir, 'images.npy')
        encode, preprocess, dims[backbone] = load_backbone(backbone, pretrained, device, flags)
        if VIEW_RECIPE == 'released':
            preprocess, augment = views.released_views(DATASET, models.preprocess_params(preprocess)[0])
        else:
            augment = augment_transform(preprocess)
        settings = dict(data_settings, **cache.backbone_settings(backbone, pretrained), transform=repr(preprocess),
                        precision=PRECISION, view_path=VIEW_PATH, version=_VERSION)
        encode_views(f'{backbone} images', images, np.arange(len(images)), preprocess, 1, encode,
                     plain, settings, rank, world, device)
        if rank == 0 and plain in cache.BUILT:  # new features: no views of the old
            drop_stale_views(fdir)
        barrier(world)
        if n_views:  # all views of a train image from one decode (views 2t, 2t+1 are train.py's epoch t)
            aug = augment_settings() if VIEW_RECIPE == 'simclr' else repr(augment)
            aug_settings = dict(settings, split=split_settings, aug=aug, aug_views=n_views, aug_seed=AUG_SEED)
            encode_views(f'{backbone} train views', images, train, augment, n_views, encode,
                         cache.views_path(fdir, split_settings['split']), aug_settings, rank, world, device,
                         seed=AUG_SEED)
        barrier(world)
        bad = read_sidecar(plain)['settings'].get('bad', [])
        if bad and rank == 0:
            if plain in cache.BUILT:
                save_text(os.path.join(fdir, 'bad_images.txt'), [images.names[i] for i in bad])
            print(f"skipped {len(bad)} unreadable images, listed in {fdir}/bad_images.txt")
    return dims[BACKBONE]


def drop_stale_views(fdir):
    """Remove the augmented views in `fdir` (any split) made by another extraction than the features
    just built beside them (another precision, backbone build, images, ...): a rebuild of the features
    leaves no product of the old ones beside the new."""
    want = cache.extraction_of(os.path.join(fdir, 'images.npy'))
    for path in sorted(glob.glob(cache.views_path(fdir, '*'))):
        status = cache.cache_status(path, want, os.path.join(fdir, 'images.npy'))
        if status not in ('ok', 'missing'):
            for p in (path + '.json', path):
                if os.path.exists(p):
                    os.remove(p)
            print(f"removed the augmented views {status}: a product of other features is not kept beside them")


def main():
    global BACKBONE_PRETRAINED, DATA_PATH, NUM_WORKERS
    cfg = configure(globals())
    check_choice('dataset', DATASET, dataset.DATASETS)
    check_ranges(globals(), _RANGES)
    BACKBONE_PRETRAINED = BACKBONE_PRETRAINED or models.default_weights(BACKBONE)
    DATA_PATH = DATA_PATH or os.path.join('data', DATASET)
    t0 = time.time()
    rank, world, device = setup_distributed()
    resolve_settings(device)
    NUM_WORKERS = num_workers(NUM_WORKERS)
    cfg.update(AUG_VIEWS=AUG_VIEWS, VIEW_RECIPE=VIEW_RECIPE, PRECISION=PRECISION,
               BACKBONE_PRETRAINED=BACKBONE_PRETRAINED)

    ddir = dataset_dir(CACHE_DIR, DATASET)
    if rank == 0:  # one extraction into a dataset's cache at a time; rank 0 alone downloads CIFAR-10, the others wait
        cache.hold(ddir, f"another dataset_extract.py is extracting into {ddir}: wait for it to finish, then run this "
                         f"again (it reuses what that one made), or give another --cache_dir")
        images = load_images(DATASET, DATA_PATH, DOWNLOAD, SPLIT_DIR, CACHE_DIR)  # every image and its labels
        warning = dataset.one_label_warning(images.labels, images.classes)
        if warning:
            print(warning)
    barrier(world)
    if rank > 0:
        images = load_images(DATASET, DATA_PATH, False, SPLIT_DIR, CACHE_DIR)
    data_settings, split_settings, query, retrieval, train = split_step(images, rank, world)  # Section 4.1.1
    dim = features_step(images, data_settings, split_settings, train, rank, world, device)    # Section 4.1.2
    if rank == 0 and cache.BUILT:  # a run that built nothing writes nothing (a read-only cache)
        save_json(os.path.join(ddir, f'extract_{BACKBONE}-{pretrained_tag(BACKBONE_PRETRAINED)}_config.json'),
                  dict(cfg, seconds=round(time.time() - t0, 1), hardware=hardware(device), world=world))
    if rank == 0:
        print(f"extract dataset={DATASET} backbone={BACKBONE} images={len(images)} query={len(query)} "
              f"retrieval={len(retrieval)} train={len(train)} views={AUG_VIEWS} dim={dim} "
              f"world={world} seconds={time.time() - t0:.1f}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (DataError, CacheError, models.WeightsUnavailable, OSError, ValueError) as e:  # ValueError: --backbone
        raise SystemExit(cache.user_error(e, dict(cache_dir=CACHE_DIR)))
