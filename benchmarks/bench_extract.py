"""Views/s of step 1's whole extraction pipeline against the bare model forward, same model, same
batch size, same run (Section 4.1.2: frozen backbone features of every image).

Pipeline: dataset_extract.encode_views itself (one DataLoader per pass, each image decoded once in
a worker, its views made, BATCH_SIZE views per forward, chunks saved and merged), with each of
the two view paths: 'tensor' (views made batched on the device, the default) and 'pil'
(torchvision's PIL pipeline per view in the workers, the reference). Bare: the same forward on
ready tensors of the plain view, already on the device.

    python benchmarks/bench_extract.py                       # ViT-B/16 (random weights), about 4 min on 2 CPU cores
    python benchmarks/bench_extract.py --device=cuda --n_images=1000 --views=16 --full_views=120   # a GPU
    python benchmarks/bench_extract.py --backbone=tiny-test --n_images=64   # the data path alone
    python benchmarks/bench_extract.py --image_dir=/data/photos   # your own photos (<dir>/<class>/<img>)

Random weights cost what trained ones do. The images are generated JPEGs of a photo's size (500 x
375, every third one portrait) in a temporary folder, removed at the end. Each round runs every
pass once, in an order that flips every round, so all share the machine's load; the best round of
each pass is reported (load only ever slows a pass down) with the mean beside it. FULL_VIEWS > 0
also times the whole default, FULL_VIEWS views of each of FULL_IMAGES images, once. The plain PIL
path must give the bare forward's features, and the tensor path's features the PIL path's to a
cosine of MIN_COS: else exit 1. The last line is one parseable result, with
aug_ratio (tensor path, augmented views / bare) and aug_vs_pil (tensor path / PIL path, augmented).
"""
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset_extract  # noqa: E402
import views  # noqa: E402
from configurator import configure  # noqa: E402
from dataset import load_images  # noqa: E402
from models import load_backbone, resolve_device  # noqa: E402
from views import augment_transform  # noqa: E402

# -----------------------------------------------------------------------------
# images
IMAGE_DIR = ''            # '' -> generate N_IMAGES JPEGs in a temporary folder; or your own <dir>/<class>/<img>
N_IMAGES = 16             # images per pass (ViT-B/16 runs at about 4 images/s on a 2-core CPU)
IMAGE_W = 500             # generated photo size (MS-COCO / Flickr photos are about 500 x 375 to 640 x 480)
IMAGE_H = 375             # generated photo height
JPEG_QUALITY = 90         # generated JPEG quality
# model
BACKBONE = 'ViT-B-16'     # ViT-B-16 | ViT-B-32 | vgg16 | tiny-test
PRETRAINED = 'random'     # weights: 'random' costs what trained ones do
DEVICE = 'auto'           # auto | cpu | cuda
PRECISION = None          # fp32 | bf16 | fp16; None: dataset_extract.py's default (fp16 on a GPU, fp32 on the CPU)
BATCH_SIZE = 8            # views per forward, pipeline and bare (dataset_extract.py: 128; small to fit the CPU)
# pipeline
VIEWS = 8                 # augmented views of each image in the augmented passes
FULL_VIEWS = 0            # > 0: also time the whole default once, this many views (dataset_extract.py: 120) ...
FULL_IMAGES = 1000        # ... of each of this many images (cycled over the images)
NUM_WORKERS = dataset_extract.NUM_WORKERS  # DataLoader workers (dataset_extract.py's default); -1: one per core
CHUNK_BATCHES = dataset_extract.CHUNK_BATCHES  # forwards per saved chunk
# measurement
ROUNDS = 2                # interleaved rounds (each: bare and every pipeline pass once)
THREADS = 0               # torch threads of the main process; 0 leaves torch's default
TOLERANCE = 1e-4          # largest allowed |PIL plain path - bare| feature difference
MIN_COS = 0.999           # smallest allowed cosine of a tensor-path feature to its PIL-path feature
DATA_PATH_IMAGES = 16     # images (cycled) one worker's decode + view making is timed on
SEED = 0                  # generated images and augmented views


def write_photos(folder, n, w, h, quality, seed, classes=4):
    """n photo-like JPEGs (smooth colour fields, shapes, grain, slight blur; every third one
    portrait) as folder/<class>/<img>.jpg in `classes` classes. Returns the mean file size in bytes."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        W, H = (h, w) if i % 3 == 2 else (w, h)
        yy, xx = np.mgrid[0:H, 0:W] / max(W, H)
        img = np.full((H, W, 3), 110.0) + rng.uniform(-40, 40, 3)
        for c in range(3):
            for _ in range(5):
                fx, fy, ph = rng.uniform(0.3, 6), rng.uniform(0.3, 6), rng.uniform(0, 2 * np.pi)
                img[..., c] += rng.uniform(8, 35) * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = rng.integers(0, W), rng.integers(0, H)
            box = [x0, y0, x0 + rng.integers(10, W // 2), y0 + rng.integers(10, H // 2)]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        px = np.asarray(im.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
        px += rng.normal(0, 9, px.shape).astype(np.float32)  # sensor grain: realistic JPEG sizes
        path = os.path.join(folder, f'c{i % classes:02d}', f'{i:05d}.jpg')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(path, quality=quality)
        sizes.append(os.path.getsize(path))
    return float(np.mean(sizes))


class TimedEncode:
    """The backbone's encode, its time summed (synchronised on a GPU, so it is the forward's own), and
    when it was first called (the pass's startup: workers started, first batch decoded and made)."""

    def __init__(self, encode, device):
        self.encode, self.cuda, self.seconds, self.first = encode, device.startswith('cuda'), 0.0, None

    def __call__(self, x):
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.first = self.first or t
        f = self.encode(x)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t
        return f


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


@torch.no_grad()
def bare_forward(encode, x, device):
    """The forward alone on ready tensors x (on the device), BATCH_SIZE at a time, with the pipeline's autocast."""
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[dataset_extract.PRECISION]
    out = []
    for a in range(0, len(x), BATCH_SIZE):
        with torch.autocast(device.split(':')[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            out.append(encode(x[a:a + BATCH_SIZE]).float())
    return torch.cat(out).cpu().numpy()


def pipeline(images, indices, transform, views, path, encode, device, out_dir, tag):
    """dataset_extract.encode_views on images[indices] with the given view path: (features, seconds, forward
    seconds, startup seconds)."""
    dataset_extract.VIEW_PATH = path
    out = os.path.join(out_dir, f'{tag}.npy')
    timed = TimedEncode(encode, device)
    sync(device)
    t0 = time.perf_counter()
    dataset_extract.encode_views(tag, images, indices, transform, views, timed, out, dict(bench=tag), 0, 1, device,
                                 seed=None if views == 1 else SEED)
    wall = time.perf_counter() - t0
    feats = np.load(out).astype(np.float32)
    for suffix in ('', '.json'):
        os.remove(out + suffix)
    return feats, wall, timed.seconds, timed.first - t0


def cosine_min(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main():
    global NUM_WORKERS
    configure(globals())
    if min(BATCH_SIZE, N_IMAGES, ROUNDS, VIEWS) < 1 or NUM_WORKERS < -1 or FULL_VIEWS < 0 or FULL_IMAGES < 1:
        raise SystemExit('error: --batch_size, --n_images, --rounds, --views, --full_images >= 1, --num_workers >= -1, '
                         '--full_views >= 0')
    NUM_WORKERS = dataset_extract.num_workers(NUM_WORKERS)
    if THREADS:
        torch.set_num_threads(THREADS)
    device = resolve_device(DEVICE)
    dataset_extract.PRECISION = PRECISION
    dataset_extract.resolve_settings(device)  # PRECISION None -> the device's default
    dataset_extract.BATCH_SIZE, dataset_extract.CHUNK_BATCHES = BATCH_SIZE, CHUNK_BATCHES
    dataset_extract.NUM_WORKERS, dataset_extract.FORCE = NUM_WORKERS, False
    dataset_extract.tqdm = lambda *a, **kw: __import__('tqdm').tqdm(*a, **dict(kw, disable=True))  # this script's lines
    tmp = tempfile.mkdtemp(prefix='bench_extract_')
    try:
        if IMAGE_DIR:
            images, what = load_images('folder', IMAGE_DIR), f'photos of {IMAGE_DIR}'
        else:
            t = time.perf_counter()
            size = write_photos(os.path.join(tmp, 'images'), N_IMAGES, IMAGE_W, IMAGE_H, JPEG_QUALITY, SEED)
            images = load_images('folder', os.path.join(tmp, 'images'))
            what = (f'generated JPEGs {IMAGE_W}x{IMAGE_H} (every third portrait), quality {JPEG_QUALITY}, '
                    f'mean {size / 1024:.0f} KiB, written in {time.perf_counter() - t:.1f} s')
        idx = np.arange(min(N_IMAGES, len(images)))
        n = len(idx)
        encode, preprocess, dim = load_backbone(BACKBONE, PRETRAINED, device)
        augment = augment_transform(preprocess)
        precision = dataset_extract.PRECISION
        print(f'data: {n} images, {what}')
        print(f'model: {BACKBONE} ({PRETRAINED} weights), {dim}-d, device {device}, {precision}, batch {BATCH_SIZE} '
              f'views; {NUM_WORKERS} workers; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPU cores, '
              f'load {os.getloadavg()[0]:.1f}')

        # one worker's share, one thread: decode, then the views (PIL path; tensor path on the CPU, where the
        # workers make them) or only the draws (tensor path on a GPU, which makes the views)
        threads, m = torch.get_num_threads(), max(1, DATA_PATH_IMAGES)
        torch.set_num_threads(1)
        rate = {}
        for path in views.VIEW_PATHS:
            for kind, tr, v in (('plain', preprocess, 1), ('aug', augment, VIEWS)):
                data = views.DecodedImages(images, np.resize(idx, m), tr, v, None if v == 1 else SEED, path,
                                             make_here=not device.startswith('cuda'))
                t = time.perf_counter()
                for k in range(m):
                    data[k]
                rate[f'{path}_{kind}'] = m * v / (time.perf_counter() - t)
        torch.set_num_threads(threads)
        print('one worker (1 thread), views/s it hands over: ' + ', '.join(f'{k} {v:.0f}' for k, v in rate.items()))

        pil_plain = views.DecodedImages(images, idx, preprocess, 1, None, 'pil')
        steps = views.view_steps(preprocess)
        ready = torch.cat([views.make_views(*views.collate_decoded([pil_plain[k]])[:2], steps, device)
                           for k in range(n)])
        bare_forward(encode, ready[:BATCH_SIZE], device)  # warm-up (allocator, kernel choice), untimed

        passes = [('bare', None, 1, None)] + [(f'{path}_{kind}', tr, v, path) for path in views.VIEW_PATHS
                                              for kind, tr, v in (('plain', preprocess, 1), ('aug', augment, VIEWS))]
        secs = {p[0]: [] for p in passes}
        fwd = {p[0]: [] for p in passes}
        startup = {p[0]: [] for p in passes}
        feats = {}
        for r in range(ROUNDS):
            for name, tr, nv, path in (passes if r % 2 == 0 else passes[::-1]):
                if name == 'bare':
                    sync(device)
                    t0 = time.perf_counter()
                    f = bare_forward(encode, ready, device)
                    s = time.perf_counter() - t0
                    secs[name].append(s)
                    fwd[name].append(s)
                    startup[name].append(0.0)
                else:
                    f, s, fs, st = pipeline(images, idx, tr, nv, path, encode, device, tmp, f'{name}_r{r}')
                    secs[name].append(s)
                    fwd[name].append(fs)
                    startup[name].append(st)
                feats.setdefault(name, f)
            rates = ', '.join(f'{k} {n * p[2] / secs[k][-1]:.1f}' for k, p in zip(secs, passes))
            print(f'round {r + 1}/{ROUNDS}: {rates} views/s; load {os.getloadavg()[0]:.1f}')

        vps = {name: n * nv / min(secs[name]) for name, _, nv, _ in passes}  # best round
        mean_vps = {name: n * nv * ROUNDS / sum(secs[name]) for name, _, nv, _ in passes}
        steady = {name: n * nv / min(s - st for s, st in zip(secs[name], startup[name]))
                  for name, _, nv, _ in passes}  # best round without its startup
        print(f'{"pass":<13} {"views/s":>9} {"ratio":>6} {"steady":>6} {"mean":>9} {"startup s":>9} '
              f'{"forward share":>13}')
        for name, _, nv, _ in passes:
            share = sum(fwd[name]) / sum(secs[name])
            print(f'{name:<13} {vps[name]:9.1f} {vps[name] / vps["bare"]:6.3f} {steady[name] / vps["bare"]:6.3f} '
                  f'{mean_vps[name]:9.1f} {np.mean(startup[name]):9.2f} {share:13.3f}')
        print('(views/s of the best round; ratio = views/s / bare views/s; steady = the same without the pass\'s '
              'startup (workers started, first batch made: paid once per pass, nothing in a long run); mean = over '
              'all rounds; forward share = the time inside the forward / the pass time)')

        full = ''
        if FULL_VIEWS:
            fidx = np.resize(idx, FULL_IMAGES)
            _, s, fs, _ = pipeline(images, fidx, augment, FULL_VIEWS, 'tensor', encode, device, tmp, 'full')
            fv = FULL_IMAGES * FULL_VIEWS / s
            print(f'whole default: {FULL_VIEWS} views of {FULL_IMAGES} images in {s:.1f} s ({fv:.1f} views/s, '
                  f'{fv / vps["bare"]:.3f} of bare; forward share {fs / s:.3f})')
            full = (f' full_views={FULL_VIEWS} full_images={FULL_IMAGES} full_s={s:.2f} '
                    f'full_ratio={fv / vps["bare"]:.3f}')

        # agreement: the PIL plain view is the bare forward's input; the tensor path is within MIN_COS of it
        diff = float(np.abs(feats['pil_plain'] - feats['bare']).max())
        cos_plain = cosine_min(feats['tensor_plain'], feats['pil_plain'])
        cos_aug = cosine_min(feats['tensor_aug'], feats['pil_aug'])
        print(f'agreement: |pil plain - bare| max {diff:.2e}; cosine tensor vs pil, min over features: plain '
              f'{cos_plain:.6f}, augmented {cos_aug:.6f}')
        ok = diff <= TOLERANCE and min(cos_plain, cos_aug) >= MIN_COS
        print(f'bench_extract backbone={BACKBONE} pretrained={PRETRAINED} device={device} precision={precision} '
              f'images={n} views={VIEWS} batch={BATCH_SIZE} workers={NUM_WORKERS} rounds={ROUNDS} '
              f'threads={torch.get_num_threads()} bare_vps={vps["bare"]:.2f} '
              + ' '.join(f'{k}_vps={vps[k]:.2f}' for k in vps if k != 'bare')
              + f' plain_ratio={vps["tensor_plain"] / vps["bare"]:.3f} aug_ratio={vps["tensor_aug"] / vps["bare"]:.3f} '
              f'plain_ratio_steady={steady["tensor_plain"] / vps["bare"]:.3f} '
              f'aug_ratio_steady={steady["tensor_aug"] / vps["bare"]:.3f} '
              f'plain_vs_pil={vps["tensor_plain"] / vps["pil_plain"]:.3f} '
              f'aug_vs_pil={vps["tensor_aug"] / vps["pil_aug"]:.3f}{full} max_abs_diff={diff:.2e} '
              f'cos_plain={cos_plain:.6f} cos_aug={cos_aug:.6f} load={os.getloadavg()[0]:.1f} ok={ok}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
