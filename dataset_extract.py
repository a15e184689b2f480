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
from concurrent.futures import ThreadPoolExecutor

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
VIEW_PATH = 'tensor'       # tensor: each image decoded once, its views made batched (VIEWS_ON); pil: torchvision's PIL
                           # pipeline per view in the workers (the reference; the same views but for the blur's level)
VIEWS_ON = 'auto'          # tensor path: device (batched on DEVICE), workers (in the loader's workers, Pillow's own
                           # resize), auto: the device on a GPU, the workers on a CPU; both make the very same views
BATCH_SIZE = 128           # views per forward pass
NUM_WORKERS = -1           # data-loading processes; -1: one per usable CPU core
CHUNK_BATCHES = 8          # about this many forwards per saved chunk (the unit of resuming and of sharding ranks)
VIEWS_PER_CALL = 1024      # views made per call on the device (the working memory: about 1 MB a 224 x 224 view)
LOAD_MB = 64               # decoded pixels in one loader batch, at most (one larger image comes alone); in flight:
                           # NUM_WORKERS x 2 batches, plus their pinned copies
RESAMPLE_MB = 256          # the largest tensor of one resampling group on the device; a group holds about 5 of them
BAD_IMAGES = 'stop'        # stop | skip: an unreadable image stops the run, or is listed in bad_images.txt and dropped
                           # later
FORCE = False              # rebuild caches even when they exist
_RANGES = dict(SPLIT_SEED='[0, inf)', QUERY='[1, inf)', TRAIN='[1, inf)', AUG_VIEWS='[0, inf)', AUG_SEED='[0, inf)',
               BATCH_SIZE='[1, inf)', NUM_WORKERS='[-1, inf)', CHUNK_BATCHES='[1, inf)', VIEWS_PER_CALL='[1, inf)',
               LOAD_MB='[1, inf)', RESAMPLE_MB='[1, inf)')  # checked before any work
_VERSION = 4               # bump when the features this script writes change meaning (2: augmented views in fp16;
                           # 3: one random stream per (seed, image, view), views made on the device; 4: Pillow's
                           # exact resize on the device, the blur summed exactly: a view changes by a level)
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


def views_on(device):
    """Where the tensor path makes the views: VIEWS_ON, auto resolved by the device."""
    return VIEWS_ON if VIEWS_ON != 'auto' else 'device' if device.startswith('cuda') else 'workers'


def chunk_images(n_views):
    """Images per chunk: about CHUNK_BATCHES forwards, rounded up so that a chunk's views fill whole
    forwards of BATCH_SIZE (120 views, 128 a forward: 16 images, 15 forwards), where that is near."""
    target = max(1, BATCH_SIZE * CHUNK_BATCHES // n_views)
    unit = BATCH_SIZE // math.gcd(BATCH_SIZE, n_views)
    return math.ceil(target / unit) * unit if unit * n_views <= 2 * BATCH_SIZE * CHUNK_BATCHES else target


class ChunkBatches(torch.utils.data.IterableDataset):
    """The loader's batches of a pass: worker w of W takes the chunks spans[w::W] (c, first, end) in turn,
    and yields each chunk's images in order as (c, batch) (collate_decoded), a batch never two chunks'.
    A batch holds at most max(1, VIEWS_PER_CALL // n_views) images and LOAD_MB of decoded pixels (an
    image larger than that alone), so the memory in flight is NUM_WORKERS x 2 such batches."""

    def __init__(self, data, spans):
        self.data, self.spans = data, spans
        self.images = max(1, VIEWS_PER_CALL // data.n_views)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for c, a, e in self.spans[w::n]:
            items, size = [], 0
            for k in range(a, e):
                item = self.data[k]
                if items and (len(items) == self.images or size + item[0].nbytes > LOAD_MB << 20):
                    yield c, views.collate_decoded(items)
                    items, size = [], 0
                items.append(item)
                size += item[0].nbytes
            yield c, views.collate_decoded(items)


def _as_is(batch):
    return batch


def loader_for(data, spans, device):
    """One DataLoader for a whole pass (ChunkBatches): its workers decode each image once (pinned memory
    for a GPU), two batches ahead each."""
    return torch.utils.data.DataLoader(ChunkBatches(data, spans), batch_size=None, num_workers=NUM_WORKERS,
                                       pin_memory=device.startswith('cuda'), collate_fn=_as_is,
                                       prefetch_factor=2 if NUM_WORKERS else None)


def encode_views(name, images, indices, transform, n_views, encode, out_path, settings, rank, world, device,
                 seed=None):
    """Features of n_views views of each image of images[indices] (seed None: the one plain view) in
    `out_path`, unless a trusted cache of `settings` is there: N x F float32 for the plain view,
    N x V x F float16 for views (extract_views)."""
    cached(out_path, settings, lambda: extract_views(name, images, indices, transform, n_views, encode, out_path,
                                                     settings, rank, world, device, seed),
           'dataset_extract.py', FORCE, load=False)


def forward(chunk, encode, steps, device, last):
    """The forwards of a chunk's views made so far (chunk['pending']): every whole BATCH_SIZE of them, and
    the rest when `last`; their features appended to chunk['feats']. Returns the views forwarded. The
    slices depend on the chunk alone, so its features do not depend on what else is in flight."""
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[PRECISION]
    pending, done = chunk['pending'], 0
    while pending and (last or sum(len(p) for p in pending) >= BATCH_SIZE):
        v = torch.cat(pending) if len(pending) > 1 else pending[0]
        pending[:] = [v[BATCH_SIZE:]] if len(v) > BATCH_SIZE else []
        x = views.normalize(v[:BATCH_SIZE], steps)
        with torch.autocast(device.split(':')[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            chunk['feats'].append(encode(x).float())
        done += len(x)
    return done


def save_chunk(saver, path, chunk, n_views, plain, settings):
    """Hand a finished chunk's features to the saving thread: copied to the host without waiting (an event
    marks the copy's end), written there (save_array: atomic, with its sidecar) while the GPU goes on."""
    f = torch.cat(chunk['feats'])
    host = f.to('cpu', non_blocking=True)
    done = torch.cuda.Event() if f.is_cuda else None
    if done is not None:
        done.record()

    def write():
        if done is not None:
            done.synchronize()
        a = host.numpy().reshape(-1, n_views, host.shape[-1])
        save_array(path, a[:, 0] if plain else a.astype(np.float16), dict(settings, bad=chunk['bad']),
                   'dataset_extract.py')
    return saver.submit(write)


@torch.no_grad()
def extract_views(name, images, indices, transform, n_views, encode, out_path, settings, rank, world, device, seed):
    """One pass: each image decoded once, its views made on `device` or in the workers (views_on) or by
    PIL ('pil'), BATCH_SIZE views per forward. Saved chunk by chunk (the unit of resuming, each rank its
    share) by a thread beside the GPU, then merged in order by rank 0 into `out_path` and its sidecar.
    Between two forwards the host never waits for the device (nothing is read back before a chunk's
    features are copied out asynchronously)."""
    per_chunk = chunk_images(n_views)
    chunk_dir = os.path.join(os.path.dirname(out_path), '.chunks', os.path.basename(out_path)[:-4])
    chunk_settings = dict(settings, batch_size=BATCH_SIZE, chunk=per_chunk)
    if FORCE and rank == 0 and os.path.isdir(chunk_dir):
        shutil.rmtree(chunk_dir)
    barrier(world)
    n_chunks = math.ceil(len(indices) / per_chunk)
    span = [(c * per_chunk, min((c + 1) * per_chunk, len(indices))) for c in range(n_chunks)]
    paths = [os.path.join(chunk_dir, f'{c:05d}.npy') for c in range(n_chunks)]
    todo = [(c, *span[c]) for c in range(rank, n_chunks, world)  # this rank's chunks not saved by an earlier run
            if not reusable(paths[c], chunk_settings, False, 'dataset_extract.py')]
    data = views.DecodedImages(images, indices, transform, n_views, seed, VIEW_PATH, BAD_IMAGES,
                               make_here=views_on(device) == 'workers')
    views.prepare(data.steps, device, tables=VIEW_PATH == 'tensor' and not data.make_here)
    budget = RESAMPLE_MB << 18  # elements of 4 bytes
    with ThreadPoolExecutor(1) as saver, tqdm(total=sum(e - a for _, a, e in todo) * n_views, desc=name, unit='view',
                                              unit_scale=True, disable=(rank > 0 and world > 1) or not todo) as bar:
        chunks, saves = {}, []
        for c, (x, draws, k, ok) in (loader_for(data, todo, device) if todo else []):
            ch = chunks.setdefault(c, dict(pending=[], feats=[], bad=[], seen=0))
            ch['pending'].append(views.make_pixels(x, draws, data.steps, device, budget))
            ch['bad'] += [int(indices[j]) for j, o in zip(k.tolist(), ok.tolist()) if not o]
            ch['seen'] += len(k)
            last = ch['seen'] == span[c][1] - span[c][0]
            bar.update(forward(ch, encode, data.steps, device, last))
            if last:
                saves.append(save_chunk(saver, paths[c], chunks.pop(c), n_views, seed is None, chunk_settings))
            for f in [f for f in saves if f.done()]:  # a failed save stops the pass
                saves.remove(f)
                f.result()
        for f in saves:
            f.result()
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
    check_choice('views_on', VIEWS_ON, ('auto',) + views.VIEWS_ON)
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
