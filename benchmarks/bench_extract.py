"""Images/s of step 1's whole extraction pipeline against the bare model forward, same model,
same batch size, same run (Section 4.1.2: frozen backbone features of every image).

Pipeline: JPEG files on disk -> PIL decode -> the backbone's preprocess (plain view) or
dataset.augment_transform (augmented view) -> DataLoader with NUM_WORKERS workers -> forward,
i.e. dataset_extract.encode_all itself (its ViewDataset, DataLoader, autocast, chunk saving and
merge). Bare: the same forward on ready tensors of the plain view, already on the device.

    python benchmarks/bench_extract.py                      # ViT-B/16 (random weights): 1.5-3.5 min on 2 CPU cores
    python benchmarks/bench_extract.py --backbone=vgg16     # VGG-16 (Table 1, CNN rows)
    python benchmarks/bench_extract.py --backbone=tiny-test --n_images=512 --batch_size=64   # the data path alone
    python benchmarks/bench_extract.py --image_dir=/data/photos   # your own photos (<dir>/<class>/<img>)

Random weights cost what trained ones do. The images are generated JPEGs of a photo's size
(500 x 375, every third one portrait) in a temporary folder, removed at the end. Each round runs
bare, pipeline (plain, aug) with NUM_WORKERS workers and with 0 workers, in an order that flips
every round, so all of them share the machine's load; ratios are pipeline / bare images/s.
The goal is a best-round ratio >= GOAL: the least disturbed round of each pass, without its
startup (worker start and first batch: paid once per encode_all call, a large part of these
short passes and nothing in a real run). The ratio over all rounds is printed beside it, and a
third estimate from CPU costs, which a shared machine disturbs least. The plain view must give
the bare forward's features, and the augmented view the same features with and without workers
(seeded per image): else exit 1. The last line is one parseable result.
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
from dataset import ViewDataset, augment_transform, configure, load_images  # noqa: E402
from models import load_backbone, resolve_device  # noqa: E402

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
PRECISION = 'fp32'        # fp32 | bf16 | fp16 (dataset_extract.py's autocast)
BATCH_SIZE = 8            # images per forward, pipeline and bare (dataset_extract.py: 128; small to fit the CPU)
# pipeline
NUM_WORKERS = dataset_extract.NUM_WORKERS  # DataLoader workers (dataset_extract.py's default); -1: one per core
ZERO_WORKERS = True       # also time the pipeline with NUM_WORKERS=0, to show what the workers buy
CHUNK_BATCHES = dataset_extract.CHUNK_BATCHES  # batches per saved chunk
# measurement
ROUNDS = 4                # interleaved rounds (each: bare and every pipeline pass once)
THREADS = 0               # torch threads of the main process; 0 leaves torch's default
GOAL = 0.90               # pipeline images/s / bare images/s to reach
TOLERANCE = 1e-4          # largest allowed |feature difference| of the agreement checks
DATA_PATH_IMAGES = 64     # images (cycled) the data path alone is timed on
SEED = 0                  # generated images and augmented views


def write_photos(folder, n, w, h, quality, seed):
    """n photo-like JPEGs (smooth colour fields, shapes, grain, slight blur; every third one
    portrait) as folder/<class>/<img>.jpg in 4 classes. Returns the mean file size in bytes."""
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
        path = os.path.join(folder, f'c{i % 4}', f'{i:05d}.jpg')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(path, quality=quality)
        sizes.append(os.path.getsize(path))
    return float(np.mean(sizes))


class TimedEncode:
    """The backbone's encode, recording (start, end) of every call: the pipeline's time splits
    into startup (to the first forward), forward, waiting between forwards, and the tail (save, merge)."""

    def __init__(self, encode, device):
        self.encode, self.cuda, self.calls = encode, device.startswith('cuda'), []

    def __call__(self, x):
        t = time.perf_counter()
        f = self.encode(x)
        if self.cuda:
            torch.cuda.synchronize()
        self.calls.append((t, time.perf_counter()))
        return f


def cpu_seconds():
    """CPU time of this process and its reaped children (the DataLoader workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@torch.no_grad()
def bare_forward(encode, x, device):
    """The forward alone on ready tensors x (on the device), batch by batch, with encode_all's
    autocast and copy back to numpy."""
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[PRECISION]
    out = []
    for a in range(0, len(x), BATCH_SIZE):
        with torch.autocast(device.split(':')[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            f = encode(x[a:a + BATCH_SIZE])
        out.append(f.float().cpu().numpy())
    return np.concatenate(out)


def pipeline(images, indices, transform, seed, workers, encode, device, out_dir, tag):
    """dataset_extract.encode_all on images[indices]: (features, timing dict)."""
    dataset_extract.NUM_WORKERS = workers
    out = os.path.join(out_dir, f'{tag}.npy')
    timed = TimedEncode(encode, device)
    c0, t0 = cpu_seconds(), time.perf_counter()
    feats = dataset_extract.encode_all(tag, images, indices, transform, timed, out, dict(bench=tag), 0, 1, device,
                                       seed=seed, view=0)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    for suffix in ('', '.json'):
        os.remove(out + suffix)
    fwd = sum(e - s for s, e in timed.calls)
    startup = timed.calls[0][0] - t0
    tail = t0 + wall - timed.calls[-1][1]
    return feats, dict(wall=wall, cpu=cpu, forward=fwd, startup=startup, tail=tail,
                       wait=wall - fwd - startup - tail)


def main():
    global NUM_WORKERS
    configure(globals())
    if BATCH_SIZE < 1 or N_IMAGES < 1 or ROUNDS < 1 or NUM_WORKERS < -1 or PRECISION not in ('fp32', 'bf16', 'fp16'):
        raise SystemExit('error: --batch_size, --n_images, --rounds >= 1, --num_workers >= -1, --precision fp32|bf16|fp16')
    NUM_WORKERS = dataset_extract.num_workers(NUM_WORKERS)
    if THREADS:
        torch.set_num_threads(THREADS)
    device = resolve_device(DEVICE)
    dataset_extract.BATCH_SIZE, dataset_extract.CHUNK_BATCHES = BATCH_SIZE, CHUNK_BATCHES
    dataset_extract.PRECISION, dataset_extract.FORCE = PRECISION, False
    dataset_extract.tqdm = lambda it, **kw: it  # keep the output to this script's lines
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
        print(f'data: {n} images, {what}')
        print(f'model: {BACKBONE} ({PRETRAINED} weights), {dim}-d, device {device}, {PRECISION}, batch {BATCH_SIZE}; '
              f'torch threads {torch.get_num_threads()}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}')

        # the data path alone, in this process with one torch thread as a DataLoader worker has
        # (no model): what one worker can deliver
        threads, m = torch.get_num_threads(), max(n, DATA_PATH_IMAGES)
        torch.set_num_threads(1)
        rate = {}
        for view, data in (('plain', ViewDataset(images, np.resize(idx, m), preprocess)),
                           ('aug', ViewDataset(images, np.resize(idx, m), augment, SEED, 0))):
            t = time.perf_counter()
            for k in range(m):
                data[k]
            rate[view] = m / (time.perf_counter() - t)
        torch.set_num_threads(threads)
        ready = torch.stack([ViewDataset(images, idx, preprocess)[k][0] for k in range(n)]).to(device)
        print(f'data path alone (decode + transform, 1 process, 1 torch thread as in a worker, {m} images): '
              f'plain {rate["plain"]:.0f} images/s, augmented {rate["aug"]:.0f} images/s')
        bare_forward(encode, ready[:BATCH_SIZE], device)  # warm-up (allocator, kernel choice), untimed

        # ROUNDS interleaved rounds; the order flips every round so drifts in load cancel
        passes = [('bare', None, None, None)]
        passes += [(f'{v}_w{NUM_WORKERS}', tr, sd, NUM_WORKERS) for v, tr, sd in
                   (('plain', preprocess, None), ('aug', augment, SEED))]
        if ZERO_WORKERS and NUM_WORKERS:
            passes += [(f'{v}_w0', tr, sd, 0) for v, tr, sd in (('plain', preprocess, None), ('aug', augment, SEED))]
        stats = {p[0]: [] for p in passes}
        feats = {}
        for r in range(ROUNDS):
            for name, transform, seed, workers in (passes if r % 2 == 0 else passes[::-1]):
                if name == 'bare':
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    f = bare_forward(encode, ready, device)
                    st = dict(wall=time.perf_counter() - t0, cpu=cpu_seconds() - c0)
                    st.update(forward=st['wall'], startup=0.0, tail=0.0, wait=0.0)
                else:
                    f, st = pipeline(images, idx, transform, seed, workers, encode, device,
                                     os.path.join(tmp, 'features'), f'{name}_r{r}')
                stats[name].append(st)
                feats.setdefault(name, f)
            ips = {k: n / v[-1]['wall'] for k, v in stats.items()}
            print(f'round {r + 1}/{ROUNDS}: ' + ', '.join(f'{k} {v:.2f}' for k, v in ips.items())
                  + f' images/s; load {os.getloadavg()[0]:.1f}')

        # results: images/s over all rounds, ratio to bare, and where the pipeline's time went
        def total(name, key):
            return sum(s[key] for s in stats[name])
        bare_ips = n * ROUNDS / total('bare', 'wall')
        res = {}
        best_bare = min(s['wall'] for s in stats['bare'])
        print(f'{"pass":<10} {"images/s":>9} {"ratio":>6} {"best":>6} {"per round":>24} {"startup":>8} '
              f'{"forward":>8} {"wait":>6} {"tail":>6} {"fwd images/s":>12} {"cpu ms/img":>10}')
        for name in stats:
            ips = n * ROUNDS / total(name, 'wall')
            best = best_bare / min(s['wall'] - s['startup'] for s in stats[name])
            per_round = [b['wall'] / s['wall'] for s, b in zip(stats[name], stats['bare'])]
            res[name] = (ips, ips / bare_ips, best)
            print(f'{name:<10} {ips:9.2f} {ips / bare_ips:6.3f} {best:6.3f} '
                  f'{" ".join(f"{x:.3f}" for x in per_round):>24} '
                  f'{total(name, "startup"):8.2f} {total(name, "forward"):8.2f} {total(name, "wait"):6.2f} '
                  f'{total(name, "tail"):6.2f} {n * ROUNDS / total(name, "forward"):12.2f} '
                  f'{total(name, "cpu") / (n * ROUNDS) * 1e3:10.0f}')
        print(f'(seconds summed over {ROUNDS} rounds of {n} images; ratio = images/s / bare images/s over all rounds, '
              f'best = best round of the pass without its startup / best round of bare (load only ever slows a '
              f'pass down, so the best rounds are the least disturbed), '
              f'per round = the ratio within each round; startup = call to first forward (workers, first batch); '
              f'wait = between forwards; tail = after the last forward (saving, merge); cpu = this process and '
              f'its workers)')

        # the same from CPU costs, steadier on a shared machine: on idle cores that the workers
        # share with the forward, a view's ratio is about 1 / (1 + its data CPU / forward CPU)
        fwd_cpu = max(total('bare', 'cpu'), 0.01) / (n * ROUNDS)  # os.times counts 10 ms ticks: a tiny run may see 0
        share = {v: 1 / rate[v] / fwd_cpu for v in rate}
        if device == 'cpu':
            print(f'CPU cost per image: forward {fwd_cpu * 1e3:.0f} ms (bare), data path plain '
                  f'{1e3 / rate["plain"]:.1f} ms ({share["plain"]:.1%} of it), augmented {1e3 / rate["aug"]:.1f} ms '
                  f'({share["aug"]:.1%}): on idle cores expect ratios near {1 / (1 + share["plain"]):.3f} (plain) and '
                  f'{1 / (1 + share["aug"]):.3f} (augmented)')
        print(f'data ceiling: one worker feeds {rate["plain"]:.0f} plain / {rate["aug"]:.0f} augmented images/s, '
              f'{max(NUM_WORKERS, 1)} worker(s) about {max(NUM_WORKERS, 1) * rate["plain"]:.0f} / '
              f'{max(NUM_WORKERS, 1) * rate["aug"]:.0f} images/s if this CPU is free for them (what a fast GPU gets)')

        # agreement: the plain view is the bare forward's input; aug views are seeded per image
        diff = float(np.abs(feats[f'plain_w{NUM_WORKERS}'] - feats['bare']).max())
        diff_aug, both = 0.0, NUM_WORKERS > 0 and 'aug_w0' in feats
        if both:
            diff_aug = float(np.abs(feats[f'aug_w{NUM_WORKERS}'] - feats['aug_w0']).max())
        print(f'agreement: |plain pipeline - bare| max {diff:.2e}; ' + (
            f'|aug {NUM_WORKERS} workers - aug 0 workers| max {diff_aug:.2e}' if both else
            'aug views with and without workers not compared (needs workers and --zero_workers)'))
        ok = max(diff, diff_aug) <= TOLERANCE
        goal_met = res[f'plain_w{NUM_WORKERS}'][2] >= GOAL and res[f'aug_w{NUM_WORKERS}'][2] >= GOAL  # best ratios
        w = NUM_WORKERS
        runs = ''.join(f' {k}_ips={res[k][0]:.3f} {k}_ratio={res[k][1]:.3f} {k}_ratio_best={res[k][2]:.3f}'
                       for k in res if k != 'bare')
        print(f'bench_extract backbone={BACKBONE} pretrained={PRETRAINED} device={device} precision={PRECISION} '
              f'images={n} batch={BATCH_SIZE} workers={w} rounds={ROUNDS} threads={torch.get_num_threads()} '
              f'bare_ips={bare_ips:.3f}{runs} data_plain_ips={rate["plain"]:.1f} data_aug_ips={rate["aug"]:.1f} '
              f'plain_cpu_share={share["plain"]:.4f} aug_cpu_share={share["aug"]:.4f} load={os.getloadavg()[0]:.1f} '
              f'max_abs_diff={max(diff, diff_aug):.2e} goal={GOAL} goal_met={goal_met} ok={ok}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
