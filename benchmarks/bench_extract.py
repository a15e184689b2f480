"""Views/s of step 1's whole extraction pipeline against the bare model forward, same model, same
batch size, same run (Section 4.1.2: frozen backbone features of every image); or (--peak) the
pipeline's peak memory.

Pipeline: dataset_extract.encode_views itself (one DataLoader per pass, each image decoded once in
a worker, its views made, BATCH_SIZE views per forward, chunks saved by a thread and merged), with
each of the two view paths: 'tensor' (views made batched where VIEWS_ON says: the device on a GPU,
the workers on a CPU) and 'pil' (torchvision's PIL pipeline per view in the workers, the reference;
--pil=false leaves it out). Bare: the same forward on ready tensors of the plain view, already on
the device.

    python benchmarks/bench_extract.py                       # ViT-B/16 (random weights), about 4 min on 2 CPU cores
    python benchmarks/bench_extract.py --device=cuda --n_images=1000 --views=16 --full_views=120   # a GPU
    python benchmarks/bench_extract.py --backbone=tiny-test --n_images=64   # the data path alone
    python benchmarks/bench_extract.py --image_dir=/data/photos   # your own photos (<dir>/<class>/<img>)
    python benchmarks/bench_extract.py --peak --views_on=device --backbone=tiny-test --view_size=224 \
        --n_images=1000 --full_views=120 --full_images=32   # peak memory of the device's code path

Random weights cost what trained ones do. The images are generated JPEGs of a photo's size (500 x
375, every third one portrait) in a temporary folder, removed at the end. Each round runs every
pass once, in an order that flips every round, so all share the machine's load; the best round of
each pass is reported (load only ever slows a pass down) with the mean beside it. FULL_VIEWS > 0
also times the whole default, FULL_VIEWS views of each of FULL_IMAGES images, once. The plain views
must give the bare forward's features (the PIL path's and the tensor path's alike: the same
pixels), and the tensor path's augmented features the PIL path's to a cosine of MIN_COS: else
exit 1. The last line is one parseable result, with aug_ratio (tensor path, augmented views /
bare), plain_ratio, aug_vs_pil (tensor path / PIL path, augmented) and peak_gpu_gb.
"""
import os
import resource
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
AUG_IMAGES = 0            # images of the augmented passes (the first ones); 0: all N_IMAGES
BARE_REPEAT = 1           # the bare forward runs over the ready plain views this many times (a longer, steadier pass)
FULL_VIEWS = 0            # > 0: also time the whole default once, this many views (dataset_extract.py: 120) ...
FULL_IMAGES = 1000        # ... of each of this many images (cycled over the images)
NUM_WORKERS = dataset_extract.NUM_WORKERS  # DataLoader workers (dataset_extract.py's default); -1: one per core
CHUNK_BATCHES = dataset_extract.CHUNK_BATCHES  # forwards per saved chunk
VIEWS_ON = dataset_extract.VIEWS_ON  # where the tensor path makes the views: auto | device | workers
PIL = True                # also run the PIL path's passes (the reference; slow on a GPU machine's CPU)
PEAK = False              # measure the peak memory of the plain pass over N_IMAGES and the FULL_VIEWS pass instead
VIEW_SIZE = 0             # > 0: views of this size (open_clip's plain view, our augmented views), pooled to the model's
                          # own size before its forward: the view path's cost at 224 with tiny-test's forward
# measurement
ROUNDS = 2                # interleaved rounds (each: bare and every pipeline pass once)
THREADS = 0               # torch threads of the main process; 0 leaves torch's default
TOLERANCE = 1e-4          # largest allowed |plain view's features - bare|
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
    """The backbone's encode, its time summed, and when it was first called (the pass's startup: workers
    started, first batch decoded and made). On a GPU the time is read from CUDA events at the end of the
    pass (`seconds`), so timing adds no synchronisation to the pipeline it measures."""

    def __init__(self, encode, device):
        self.encode, self.cuda, self.spent, self.first, self.events = encode, device.startswith('cuda'), 0.0, None, []

    def __call__(self, x):
        t = time.perf_counter()
        self.first = self.first or t
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f = self.encode(x)
            end.record()
            self.events.append((start, end))
            return f
        f = self.encode(x)
        self.spent += time.perf_counter() - t
        return f

    @property
    def seconds(self):
        sync('cuda' if self.cuda else 'cpu')
        return self.spent + sum(a.elapsed_time(b) for a, b in self.events) / 1000


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


def setup():
    """Settings checked and handed to dataset_extract; the device."""
    global NUM_WORKERS
    configure(globals())
    if min(BATCH_SIZE, N_IMAGES, ROUNDS, VIEWS, FULL_IMAGES, BARE_REPEAT) < 1 or NUM_WORKERS < -1 or \
            min(FULL_VIEWS, AUG_IMAGES) < 0:
        raise SystemExit('error: --batch_size, --n_images, --rounds, --views, --full_images, --bare_repeat >= 1, '
                         '--num_workers >= -1, --full_views, --aug_images >= 0')
    NUM_WORKERS = dataset_extract.num_workers(NUM_WORKERS)
    if THREADS:
        torch.set_num_threads(THREADS)
    device = resolve_device(DEVICE)
    dataset_extract.PRECISION, dataset_extract.VIEWS_ON = PRECISION, VIEWS_ON
    dataset_extract.resolve_settings(device)  # PRECISION None -> the device's default
    dataset_extract.BATCH_SIZE, dataset_extract.CHUNK_BATCHES = BATCH_SIZE, CHUNK_BATCHES
    dataset_extract.NUM_WORKERS, dataset_extract.FORCE = NUM_WORKERS, False
    dataset_extract.tqdm = lambda *a, **kw: __import__('tqdm').tqdm(*a, **dict(kw, disable=True))  # this script's lines
    return device


def the_images(tmp):
    """(images, what they are): IMAGE_DIR's, or N_IMAGES generated photos."""
    if IMAGE_DIR:
        return load_images('folder', IMAGE_DIR), f'photos of {IMAGE_DIR}'
    t = time.perf_counter()
    size = write_photos(os.path.join(tmp, 'images'), N_IMAGES, IMAGE_W, IMAGE_H, JPEG_QUALITY, SEED)
    return load_images('folder', os.path.join(tmp, 'images')), (
        f'generated JPEGs {IMAGE_W}x{IMAGE_H} (every third portrait), quality {JPEG_QUALITY}, '
        f'mean {size / 1024:.0f} KiB, written in {time.perf_counter() - t:.1f} s')


def worker_rates(images, idx, preprocess, augment, device):
    """One worker's share, one thread: decode, then the views (PIL path; tensor path where the workers
    make them) or only the draws (tensor path on the device): views/s it hands over."""
    threads, m = torch.get_num_threads(), max(1, DATA_PATH_IMAGES)
    torch.set_num_threads(1)
    rate = {}
    for path in views.VIEW_PATHS if PIL else ('tensor',):
        for kind, tr, v in (('plain', preprocess, 1), ('aug', augment, VIEWS)):
            data = views.DecodedImages(images, np.resize(idx, m), tr, v, None if v == 1 else SEED, path,
                                       make_here=dataset_extract.views_on(device) == 'workers')
            t = time.perf_counter()
            for k in range(m):
                data[k]
            rate[f'{path}_{kind}'] = m * v / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    return rate


def timed_rounds(images, idx, passes, encode, ready, device, tmp):
    """ROUNDS interleaved rounds of every pass: {name: [seconds]}, forward seconds, startup seconds, features."""
    n = len(idx)
    secs, fwd, startup, feats = ({p[0]: [] for p in passes} for _ in range(4))
    for r in range(ROUNDS):
        for name, tr, nv, path in (passes if r % 2 == 0 else passes[::-1]):
            if name == 'bare':
                sync(device)
                t0 = time.perf_counter()
                f = [bare_forward(encode, ready, device) for _ in range(BARE_REPEAT)][0]
                s = fs = time.perf_counter() - t0
                st = 0.0
            else:
                sub = idx if nv == 1 else idx[:AUG_IMAGES or None]
                f, s, fs, st = pipeline(images, sub, tr, nv, path, encode, device, tmp, f'{name}_r{r}')
            secs[name].append(s)
            fwd[name].append(fs)
            startup[name].append(st)
            feats[name] = feats[name] or [f]
        rates = ', '.join(f'{k} {count(n, p) / secs[k][-1]:.1f}' for k, p in zip(secs, passes))
        print(f'round {r + 1}/{ROUNDS}: {rates} views/s; load {os.getloadavg()[0]:.1f}')
    return secs, fwd, startup, {k: v[0] for k, v in feats.items()}


def count(n, p):
    """The views a pass (name, transform, views, path) makes of n images."""
    return n * BARE_REPEAT if p[0] == 'bare' else n if p[2] == 1 else min(n, AUG_IMAGES or n) * p[2]


def table(n, passes, secs, fwd, startup):
    """The rates table; returns (best-round views/s, steady views/s) by pass."""
    vps = {p[0]: count(n, p) / min(secs[p[0]]) for p in passes}  # best round
    mean_vps = {p[0]: count(n, p) * ROUNDS / sum(secs[p[0]]) for p in passes}
    steady = {p[0]: count(n, p) / min(s - st for s, st in zip(secs[p[0]], startup[p[0]])) for p in passes}
    print(f'{"pass":<13} {"views/s":>9} {"ratio":>6} {"steady":>6} {"mean":>9} {"startup s":>9} {"forward share":>13}')
    for name, _, nv, _ in passes:
        share = sum(fwd[name]) / sum(secs[name])
        print(f'{name:<13} {vps[name]:9.1f} {vps[name] / vps["bare"]:6.3f} {steady[name] / vps["bare"]:6.3f} '
              f'{mean_vps[name]:9.1f} {np.mean(startup[name]):9.2f} {share:13.3f}')
    print('(views/s of the best round; ratio = views/s / bare views/s; steady = the same without the pass\'s '
          'startup (workers started, first batch made: paid once per pass, nothing in a long run); mean = over '
          'all rounds; forward share = the time inside the forward / the pass time)')
    return vps, steady


def at_size(encode, preprocess, size):
    """(encode, preprocess) making views of `size` and pooling them to the model's own before its forward."""
    from open_clip.transform import image_transform
    from models import preprocess_params
    own, mean, std, _ = preprocess_params(preprocess)
    return (lambda x: encode(torch.nn.functional.adaptive_avg_pool2d(x, own)),
            image_transform(size, is_train=False, mean=mean, std=std))


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith('cuda') else float('nan')


def rss_mb(who):
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: kilobytes


def peak(images, idx, preprocess, augment, encode, device, tmp):
    """--peak: the plain pass over the images, then FULL_VIEWS views of each of FULL_IMAGES images; the
    peak resident memory of this process (over what it held before) and of a loader worker."""
    base = rss_mb(resource.RUSAGE_SELF)
    t = time.perf_counter()
    pipeline(images, idx, preprocess, 1, 'tensor', encode, device, tmp, 'peak_plain')
    plain_s, plain_mb = time.perf_counter() - t, rss_mb(resource.RUSAGE_SELF)
    t = time.perf_counter()
    if FULL_VIEWS:
        pipeline(images, np.resize(idx, FULL_IMAGES), augment, FULL_VIEWS, 'tensor', encode, device, tmp, 'peak_aug')
    print(f'bench_extract_peak images={len(idx)} size={IMAGE_W}x{IMAGE_H} view_size={VIEW_SIZE} '
          f'views_on={dataset_extract.views_on(device)} '
          f'device={device} workers={NUM_WORKERS} full_views={FULL_VIEWS} full_images={FULL_IMAGES} '
          f'views_per_call={dataset_extract.VIEWS_PER_CALL} load_mb={dataset_extract.LOAD_MB} '
          f'resample_mb={dataset_extract.RESAMPLE_MB} base_mb={base:.0f} plain_peak_mb={plain_mb:.0f} '
          f'peak_mb={rss_mb(resource.RUSAGE_SELF):.0f} worker_peak_mb={rss_mb(resource.RUSAGE_CHILDREN):.0f} '
          f'plain_s={plain_s:.1f} full_s={time.perf_counter() - t:.1f} peak_gpu_gb={peak_gb(device):.2f}')


def whole_default(images, idx, augment, encode, device, tmp, bare_vps):
    """The default's whole extraction, FULL_VIEWS views of FULL_IMAGES images: its fields of the result line."""
    fidx = np.resize(idx, FULL_IMAGES)
    _, s, fs, _ = pipeline(images, fidx, augment, FULL_VIEWS, 'tensor', encode, device, tmp, 'full')
    fv = FULL_IMAGES * FULL_VIEWS / s
    print(f'whole default: {FULL_VIEWS} views of {FULL_IMAGES} images in {s:.1f} s ({fv:.1f} views/s, '
          f'{fv / bare_vps:.3f} of bare; forward share {fs / s:.3f})')
    return f' full_views={FULL_VIEWS} full_images={FULL_IMAGES} full_s={s:.2f} full_ratio={fv / bare_vps:.3f}'


def main():
    device = setup()
    tmp = tempfile.mkdtemp(prefix='bench_extract_')
    try:
        images, what = the_images(tmp)
        idx = np.arange(min(N_IMAGES, len(images)))
        n = len(idx)
        encode, preprocess, dim = load_backbone(BACKBONE, PRETRAINED, device)
        if VIEW_SIZE:
            encode, preprocess = at_size(encode, preprocess, VIEW_SIZE)
        augment = augment_transform(preprocess)
        print(f'data: {n} images, {what}')
        print(f'model: {BACKBONE} ({PRETRAINED} weights), {dim}-d, device {device}, {dataset_extract.PRECISION}, '
              f'batch {BATCH_SIZE} views; {NUM_WORKERS} workers; views on {dataset_extract.views_on(device)}; torch '
              f'threads {torch.get_num_threads()}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}')
        if PEAK:
            return peak(images, idx, preprocess, augment, encode, device, tmp)
        rate = worker_rates(images, idx, preprocess, augment, device)
        print('one worker (1 thread), views/s it hands over: ' + ', '.join(f'{k} {v:.0f}' for k, v in rate.items()))

        pil_plain = views.DecodedImages(images, idx, preprocess, 1, None, 'pil')
        steps = views.view_steps(preprocess)
        ready = torch.cat([views.make_views(*views.collate_decoded([pil_plain[k]])[:2], steps, device)
                           for k in range(n)])
        bare_forward(encode, ready[:BATCH_SIZE], device)  # warm-up (allocator, kernel choice), untimed

        passes = [('bare', None, 1, None)] + [(f'{path}_{kind}', tr, v, path)
                                              for path in (views.VIEW_PATHS if PIL else ('tensor',))
                                              for kind, tr, v in (('plain', preprocess, 1), ('aug', augment, VIEWS))]
        secs, fwd, startup, feats = timed_rounds(images, idx, passes, encode, ready, device, tmp)
        vps, steady = table(n, passes, secs, fwd, startup)

        full = whole_default(images, idx, augment, encode, device, tmp, vps['bare']) if FULL_VIEWS else ''

        # agreement: the plain views (either path) are the bare forward's input; augmented, the paths agree
        diff = max(float(np.abs(feats[k] - feats['bare']).max()) for k in feats if k.endswith('_plain'))
        cos_aug = cosine_min(feats['tensor_aug'], feats['pil_aug']) if PIL else float('nan')
        print(f'agreement: |plain view - bare| max {diff:.2e}; cosine tensor vs pil, min over augmented features: '
              f'{cos_aug:.6f}')
        ok = diff <= TOLERANCE and (not PIL or cos_aug >= MIN_COS)
        vs_pil = (f' plain_vs_pil={vps["tensor_plain"] / vps["pil_plain"]:.3f} '
                  f'aug_vs_pil={vps["tensor_aug"] / vps["pil_aug"]:.3f}') if PIL else ''
        print(f'bench_extract backbone={BACKBONE} pretrained={PRETRAINED} device={device} '
              f'precision={dataset_extract.PRECISION} images={n} views={VIEWS} batch={BATCH_SIZE} '
              f'workers={NUM_WORKERS} '
              f'views_on={dataset_extract.views_on(device)} rounds={ROUNDS} threads={torch.get_num_threads()} '
              f'bare_vps={vps["bare"]:.2f} ' + ' '.join(f'{k}_vps={vps[k]:.2f}' for k in vps if k != 'bare')
              + f' plain_ratio={vps["tensor_plain"] / vps["bare"]:.3f} aug_ratio={vps["tensor_aug"] / vps["bare"]:.3f} '
              f'plain_ratio_steady={steady["tensor_plain"] / vps["bare"]:.3f} '
              f'aug_ratio_steady={steady["tensor_aug"] / vps["bare"]:.3f}{vs_pil}{full} max_abs_diff={diff:.2e} '
              f'cos_aug={cos_aug:.6f} peak_gpu_gb={peak_gb(device):.2f} load={os.getloadavg()[0]:.1f} ok={ok}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
