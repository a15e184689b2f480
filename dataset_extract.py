"""Step 1 (Section 4.1.2, SPEC pipeline 1): frozen-backbone features of every image.

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
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dataset
from dataset import (CacheError, DataError, ViewDataset, augment_settings, augment_transform,
                     configure, dataset_dir, feature_dir, load_array, load_images, make_split,
                     read_split_dir, reusable, save_array, save_json, save_text, split_rule, split_tag)
import models
from models import hardware, load_backbone, pretrained_tag, resolve_device

# data
DATASET = 'cifar10'        # cifar10 | nuswide | flickr25k | mscoco | folder (your own DATA_PATH/<class>/<img>)
DATA_PATH = ''             # '' -> data/<dataset>
DOWNLOAD = True            # CIFAR-10 only: download it when missing
SPLIT_SEED = 0             # seed of the query/retrieval/train split (Section 4.1.1)
SPLIT_DIR = ''             # your own split: a folder with query.txt, retrieval.txt, train.txt list files
QUERY = None               # override the query size (per class for cifar10/nuswide/folder), None: the paper's
TRAIN = None               # override the train size likewise
# backbone
BACKBONE = 'ViT-B-16'      # ViT-B-16 | ViT-B-32 (Table 6) | vgg16 (Table 1, CNN rows)
BACKBONE_PRETRAINED = ''   # '' -> 'openai' for CLIP, 'imagenet' for vgg16; or a checkpoint file; 'random' (tests)
CLIP_MODEL = 'ViT-B-16'    # the CLIP whose image space the external feature lives in (used with vgg16)
CLIP_PRETRAINED = 'openai' # its weights: tag, checkpoint file, or 'random'
AUG_VIEWS = None           # augmented views per train image; None: 120 = 2 x T_max, a fresh pair (2t, 2t+1) in each of
                           # train.py's 60 epochs (Algorithm 2, line 10), or the one fixed pair (2) with --released
AUG_SEED = 0               # seed of the augmented views
VIEW_RECIPE = None         # 'simclr' (the backbone's own plain view and normalisation, AUG_* views of dataset.py) or
                           # 'released' (the authors' per-dataset views, ImageNet normalisation); None: simclr, or
                           # released with --released
RELEASED = False           # the authors' released code: their view recipe, one fixed pair of views, fp16 CLIP (GPU)
# system
CACHE_DIR = 'cache'        # where the three steps hand each other files
DEVICE = 'auto'            # auto | cpu | cuda | cuda:1 ...
PRECISION = None           # fp32 | bf16 | fp16 (autocast; fp16 on a GPU only); None: fp32, or fp16 with --released on a GPU
BATCH_SIZE = 128           # images per forward pass
NUM_WORKERS = -1           # data-loading processes; -1: one per usable CPU core
CHUNK_BATCHES = 8          # batches per saved chunk (the unit of resuming and of sharding across ranks)
BAD_IMAGES = 'stop'        # stop | skip: an unreadable image stops the run, or is listed in bad_images.txt and dropped later
FORCE = False              # rebuild caches even when they exist
_RANGES = dict(SPLIT_SEED='[0, inf)', QUERY='[1, inf)', TRAIN='[1, inf)', AUG_VIEWS='[0, inf)', AUG_SEED='[0, inf)',
               BATCH_SIZE='[1, inf)', NUM_WORKERS='[-1, inf)', CHUNK_BATCHES='[1, inf)')  # checked before any work
_VERSION = 2               # bump when the features this script writes change meaning (2: augmented views in fp16)
_T_MAX = 60                # train.py's EPOCHS: AUG_VIEWS None extracts a fresh pair of views for each of them


def hash_names(names):
    return hashlib.sha256('\n'.join(names).encode()).hexdigest()[:16]


def read_meta(path):
    with open(path + '.json') as f:
        return json.load(f)


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


def check_reuse(path, settings):
    """True if `path` is a trusted cache of `settings` (and FORCE is off); stale: CacheError."""
    if reusable(path, settings, FORCE, 'dataset_extract.py'):
        print(f"reusing {path}")
        return True
    return False


@torch.no_grad()
def encode_all(name, images, indices, transform, encode, out_path, settings, rank, world, device, seed=None, view=0,
               keep=True):
    """Features of `images[indices]` under `transform`, saved chunk by chunk (resumable, each
    rank its share), then merged in order into `out_path`. Returns the merged array on rank 0
    (None when not `keep`)."""
    if check_reuse(out_path, settings):
        return load_array(out_path, settings, 'dataset_extract.py') if rank == 0 and keep else None
    chunk = BATCH_SIZE * CHUNK_BATCHES
    chunk_dir = os.path.join(os.path.dirname(out_path), '.chunks', os.path.basename(out_path)[:-4])
    chunk_settings = dict(settings, batch_size=BATCH_SIZE, chunk=chunk)
    if FORCE and rank == 0 and os.path.isdir(chunk_dir):
        shutil.rmtree(chunk_dir)
    barrier(world)
    n_chunks = math.ceil(len(indices) / chunk)
    paths = [os.path.join(chunk_dir, f'{c:05d}.npy') for c in range(n_chunks)]
    todo = [c for c in range(rank, n_chunks, world)  # this rank's chunks not saved by an earlier run
            if not reusable(paths[c], chunk_settings, False, 'dataset_extract.py')]
    if todo:
        pos = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, len(indices))) for c in todo])
        data = ViewDataset(images, np.asarray(indices)[pos], transform, seed, view, BAD_IMAGES)
        cuda = device.startswith('cuda')
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH_SIZE, shuffle=False, num_workers=NUM_WORKERS,
                                             pin_memory=cuda, persistent_workers=False)
        dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[PRECISION]
        buf, bad, c_i = [], [], 0
        for x, k, ok in tqdm(loader, desc=f'{name} [rank {rank}]' if world > 1 else name, unit='batch',
                             disable=rank > 0 and world > 1):
            with torch.autocast(device.split(':')[0], dtype=dtype or torch.float32, enabled=dtype is not None):
                f = encode(x.to(device, non_blocking=cuda))
            buf.append(f.float().cpu().numpy())
            bad += [int(data.indices[j]) for j, o in zip(k.tolist(), ok.tolist()) if not o]
            c = todo[c_i]
            if sum(len(b) for b in buf) == min((c + 1) * chunk, len(indices)) - c * chunk:
                save_array(paths[c], np.concatenate(buf), dict(chunk_settings, bad=bad), 'dataset_extract.py')
                buf, bad, c_i = [], [], c_i + 1
    barrier(world)
    feats = None
    if rank == 0:
        parts = [load_array(p, chunk_settings, 'dataset_extract.py') for p in paths]
        bad = sorted(sum((read_meta(p)['settings'].get('bad', []) for p in paths), []))
        feats = np.concatenate(parts)
        save_array(out_path, feats, dict(settings, bad=bad), 'dataset_extract.py')
        shutil.rmtree(chunk_dir, ignore_errors=True)
    barrier(world)
    return feats if keep else None


def resolve_settings(device):
    """The None settings resolved by RELEASED (AUG_VIEWS, VIEW_RECIPE, PRECISION), then checked."""
    global AUG_VIEWS, VIEW_RECIPE, PRECISION
    AUG_VIEWS = (2 if RELEASED else 2 * _T_MAX) if AUG_VIEWS is None else AUG_VIEWS
    VIEW_RECIPE = VIEW_RECIPE or ('released' if RELEASED else 'simclr')
    if PRECISION is None:
        PRECISION = 'fp16' if RELEASED and device.startswith('cuda') else 'fp32'
        if RELEASED and PRECISION == 'fp32':
            print("note: the authors' code runs CLIP in fp16 on a GPU; on this CPU it runs in fp32")
    if not isinstance(AUG_VIEWS, int):  # its range was checked with the others (_RANGES)
        raise SystemExit(f"error: --aug_views={AUG_VIEWS!r} is not a whole number of views")
    if PRECISION not in ('fp32', 'bf16', 'fp16') or BAD_IMAGES not in ('stop', 'skip'):
        raise SystemExit("error: --precision is fp32|bf16|fp16 and --bad_images is stop|skip")
    if PRECISION == 'fp16' and not device.startswith('cuda'):
        raise SystemExit("error: --precision=fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    if VIEW_RECIPE not in dataset.VIEW_RECIPES:
        raise SystemExit(f"error: --view_recipe={VIEW_RECIPE!r}: choose one of {', '.join(dataset.VIEW_RECIPES)}")


def main():
    global BACKBONE_PRETRAINED, DATA_PATH, NUM_WORKERS
    cfg = configure(globals())
    if DATASET not in dataset.DATASETS:
        raise SystemExit(f"error: unknown --dataset={DATASET!r}; choose one of {', '.join(dataset.DATASETS)}")
    dataset.check_ranges(globals(), _RANGES)
    BACKBONE_PRETRAINED = BACKBONE_PRETRAINED or models.default_weights(BACKBONE)
    DATA_PATH = DATA_PATH or os.path.join('data', DATASET)
    t0 = time.time()
    rank, world, device = setup_distributed()
    resolve_settings(device)
    NUM_WORKERS = num_workers(NUM_WORKERS)
    cfg.update(AUG_VIEWS=AUG_VIEWS, VIEW_RECIPE=VIEW_RECIPE, PRECISION=PRECISION, BACKBONE_PRETRAINED=BACKBONE_PRETRAINED)

    # the images, their labels, and the split (Section 4.1.1)
    images = load_images(DATASET, DATA_PATH, DOWNLOAD and rank == 0, SPLIT_DIR)
    if world > 1 and DATASET == 'cifar10' and rank > 0:
        images = load_images(DATASET, DATA_PATH, False, SPLIT_DIR)
    ddir = dataset_dir(CACHE_DIR, DATASET)
    tag = split_tag(SPLIT_SEED, SPLIT_DIR)
    rule = split_rule(DATASET, QUERY, TRAIN)
    # what every product is made from (one fingerprint each): the images and labels, the split files
    data_settings = dict(dataset=DATASET, n_images=len(images), names_sha=hash_names(images.names),
                         images_sha=images.fingerprint())
    split_settings = dict(data_settings, split=tag, rule=rule, split_dir=os.path.abspath(SPLIT_DIR) if SPLIT_DIR else '',
                          split_files=dataset.split_fingerprints(SPLIT_DIR) if SPLIT_DIR else {})
    if rank == 0:
        if not check_reuse(os.path.join(ddir, 'labels.npy'), data_settings):
            save_text(os.path.join(ddir, 'names.txt'), images.names)
            save_text(os.path.join(ddir, 'classes.txt'), images.classes)
            save_array(os.path.join(ddir, 'labels.npy'), images.labels, data_settings, 'dataset_extract.py')
        if not check_reuse(os.path.join(ddir, tag, 'train.npy'), split_settings):
            split = read_split_dir(SPLIT_DIR, images) if SPLIT_DIR else make_split(images.labels, rule, SPLIT_SEED)
            for name, idx in zip(('query', 'retrieval', 'train'), split):
                save_array(os.path.join(ddir, tag, name + '.npy'), idx, split_settings, 'dataset_extract.py')
    barrier(world)
    query, retrieval, train = (load_array(os.path.join(ddir, tag, p + '.npy'), split_settings, 'dataset_extract.py')
                               for p in ('query', 'retrieval', 'train'))

    # features: the backbone (plain view of every image, augmented views of train images), and
    # CLIP's plain view when the backbone is not a CLIP (the external feature lives in CLIP's space)
    jobs = [(BACKBONE, BACKBONE_PRETRAINED, AUG_VIEWS)]
    if BACKBONE not in models.CLIP_MODELS:
        jobs.append((CLIP_MODEL, CLIP_PRETRAINED, 0))
    dims = {}
    for backbone, pretrained, views in jobs:
        fdir = feature_dir(CACHE_DIR, DATASET, backbone, pretrained, VIEW_RECIPE)
        encode, preprocess, dims[backbone] = load_backbone(backbone, pretrained, device)
        if VIEW_RECIPE == 'released':
            preprocess, augment = dataset.released_views(DATASET, models.preprocess_params(preprocess)[0])
        else:
            augment = augment_transform(preprocess)
        settings = dict(data_settings, backbone=backbone, pretrained=pretrained_tag(pretrained),
                        build=models.backbone_build(backbone, pretrained), transform=repr(preprocess),
                        precision=PRECISION, version=_VERSION)
        out = os.path.join(fdir, 'images.npy')
        if not check_reuse(out, settings):
            encode_all(f'{backbone} images', images, np.arange(len(images)), preprocess, encode, out,
                       settings, rank, world, device)
        if views:
            aug = augment_settings() if VIEW_RECIPE == 'simclr' else repr(augment)
            aug_settings = dict(settings, split=split_settings, aug=aug, aug_views=views, aug_seed=AUG_SEED)
            out = os.path.join(fdir, f'train_aug_{tag}.npy')
            if not check_reuse(out, aug_settings):
                view_paths = [os.path.join(fdir, f'.train_aug_{tag}_v{v}.npy') for v in range(views)]
                for v in range(views):  # one view at a time, each resumable
                    encode_all(f'{backbone} train view {v + 1}/{views}', images, train, augment, encode,
                               view_paths[v], dict(aug_settings, view=v), rank, world, device, seed=AUG_SEED, view=v,
                               keep=False)
                if rank == 0:  # Nt x V x F in fp16, filled view by view: memory holds one view, not V
                    dataset.save_array_by_parts(out, (len(train), views, dims[backbone]), np.float16, aug_settings,
                                                'dataset_extract.py',
                                                ((np.s_[:, v], load_array(p, dict(aug_settings, view=v),
                                                                          'dataset_extract.py'))
                                                 for v, p in enumerate(view_paths)))
                    for p in view_paths:
                        for suffix in ('', '.json'):
                            os.remove(p + suffix)
        barrier(world)
        if rank == 0:
            bad = read_meta(os.path.join(fdir, 'images.npy'))['settings'].get('bad', [])
            if bad:
                save_text(os.path.join(fdir, 'bad_images.txt'), [images.names[i] for i in bad])
                print(f"skipped {len(bad)} unreadable images, listed in {fdir}/bad_images.txt")
    if rank == 0:
        save_json(os.path.join(ddir, f'extract_{BACKBONE}-{pretrained_tag(BACKBONE_PRETRAINED)}_config.json'),
                  dict(cfg, seconds=round(time.time() - t0, 1), hardware=hardware(device), world=world))
        print(f"extract dataset={DATASET} backbone={BACKBONE} images={len(images)} query={len(query)} "
              f"retrieval={len(retrieval)} train={len(train)} views={AUG_VIEWS} dim={dims[BACKBONE]} "
              f"world={world} seconds={time.time() - t0:.1f}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except (DataError, CacheError, models.WeightsUnavailable, OSError) as e:
        raise SystemExit(dataset.user_error(e))
