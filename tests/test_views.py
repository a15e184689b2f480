"""The views made on the extraction device (views.make_pixels) against torchvision's PIL pipeline and
Pillow itself: the same random draws as torchvision's own samplers, Pillow's very pixels for every
operation (the blur within one level), one independent random stream per (seed, image, view), and the
same bits whatever the batch, group, order, memory budget, autocast or TF32 setting."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

import dataset
import views

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = [(375, 500), (500, 375), (32, 32), (240, 320), (90, 600)]  # photos both ways, CIFAR, odd shapes


def clip_preprocess(size=224):
    """open_clip's own plain view of an OpenAI CLIP (what models.load_clip returns), without the model."""
    from open_clip.transform import image_transform
    return image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)


def photos(sizes=SIZES, seed=0):
    """Photo-like RGB arrays: smooth colour fields with edges and grain (hue, contrast and blur all act)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[:h, :w]
        a = np.stack([128 + 90 * np.sin(xx / rng.uniform(5, 30) + c) * np.cos(yy / rng.uniform(5, 30) - c)
                      for c in range(3)], -1)
        a[(xx // 37 + yy // 29) % 3 == 0] *= 0.5
        out.append(np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8))
    return dataset.Images([f'{i}.png' for i in range(len(sizes))], np.eye(len(sizes)), arrays=out)


def pixels(images, transform, n_views, seed, path='tensor', make_here=False, order=None, **kw):
    """Every image's views as one batch (make_pixels): (N V) x 3 x h x w uint8 in image, then view, order."""
    order = range(len(images)) if order is None else order
    data = views.DecodedImages(images, range(len(images)), transform, n_views, seed, path, make_here=make_here)
    batch = views.collate_decoded([data[k] for k in order])
    return views.make_pixels(*batch[:2], views.view_steps(transform), kw.pop('device', 'cpu'), **kw)


def blurred(images, transform, n_views, seed):
    """Which views of pixels(...) the draws blur."""
    steps = views.view_steps(transform)
    return np.concatenate([views.draw_views(steps, *images.arrays[i].shape[:2], seed, i, n_views)['blur'] > 0
                           for i in range(len(images))])


RECIPES = {
    'ours (SimCLR views)': lambda: views.augment_transform(clip_preprocess()),
    'released, CIFAR-10': lambda: views.released_views('cifar10')[1],
    'released, other sets': lambda: views.released_views('mscoco')[1],
}
PLAIN = {
    'CLIP (open_clip)': clip_preprocess,
    'VGG-16 (torchvision weights preset)':
        lambda: __import__('torchvision').models.VGG16_Weights.IMAGENET1K_V1.transforms(),
    'released plain, CIFAR-10': lambda: views.released_views('cifar10')[0],
    'released plain, other sets': lambda: views.released_views('mscoco')[0],
}


@pytest.mark.parametrize('name', PLAIN)
def test_plain_views_are_pillows_pixels(name, one_thread):
    """The plain view on the device is the PIL pipeline's, bit for bit; and the PIL path is torchvision's
    pipeline itself."""
    transform = PLAIN[name]()
    images = photos([(32, 32)] * 2 if 'CIFAR' in name else SIZES)
    t, p = pixels(images, transform, 1, None), pixels(images, transform, 1, None, path='pil')
    assert torch.equal(t, p)
    ref = torch.stack([transform(images.load(i)) for i in range(len(images))])
    assert torch.equal(views.normalize(p, views.view_steps(transform)), ref)


@pytest.mark.parametrize('name', RECIPES)
def test_augmented_views_equal_pil(name, one_thread):
    """Whole views: the same draws, so the same crop, flip, jitter, grey and blur. Every view the draws do
    not blur is the PIL pipeline's bit for bit; a blurred one differs by one level on a few pixels (the
    blur's kernel is rounded to 2^-22ths and summed exactly). The old tolerance (16 levels, 0.2 on
    average, 99% within 1) holds with room to spare."""
    transform = RECIPES[name]()
    images = photos([(32, 32)] * 3 if 'CIFAR' in name else SIZES)
    t, p = pixels(images, transform, 8, 5), pixels(images, transform, 8, 5, path='pil')
    d = (t.int() - p.int()).abs()
    blur = blurred(images, transform, 8, 5)
    assert d[~blur].max() == 0 and d.max() <= 1 and (d > 0).float().mean() < 1e-3
    assert d.max() <= 16.1 and d.float().mean() < 0.2 and (d <= 1).float().mean() > 0.99
    with torch.random.fork_rng():  # the PIL path is torchvision's pipeline itself, on the view's stream
        torch.manual_seed(views.view_seed(5, 1, 3))
        assert torch.equal(views.normalize(p[1 * 8 + 3:1 * 8 + 4], views.view_steps(transform))[0],
                           transform(images.load(1)))


def pillow_resize(a, box, size, window, out, interp):
    """Pillow's crop, resize and centre crop of array a, as torchvision's PIL functions do them."""
    im = F.resized_crop(Image.fromarray(a), *box, list(size), interp)
    return np.asarray(im)[window[0]:window[0] + out[0], window[1]:window[1] + out[1]]


@pytest.mark.parametrize('interp', [T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR])
def test_crop_and_resize_are_pillows_pixels(interp, one_thread):
    """60 random boxes, sizes and windows, down (antialiased) and up, either pass first (Pillow 13 resizes
    vertically first when the height shrinks the most), several views an image and padded groups: the
    device's pixels are Pillow's, bit for bit. And past EXACT_TAPS taps (a 179x downscale) in float64."""
    rng = np.random.default_rng(int(interp == T.InterpolationMode.BILINEAR))
    arrays = photos([(375, 500), (61, 47), (300, 120)], seed=3).arrays + [rng.integers(0, 256, (8, 40000, 3), np.uint8)]
    views_of = {0: [], 1: [], 2: [], 3: []}
    for i in range(3):
        h, w = arrays[i].shape[:2]
        for _ in range(20):
            bh, bw = rng.integers(1, h + 1), rng.integers(1, w + 1)
            top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            rh, rw = rng.integers(4, 300, 2)
            views_of[i].append(([top, left, bh, bw], [rh, rw], [0, 0]))
    views_of[3] = [([0, 0, 8, 40000], [4, 224], [0, 0])] * 2
    assert max(views.ksize(np.array([40000.0]), np.array([224.0]), interp)) > views.EXACT_TAPS
    for i, vs in views_of.items():
        out = (min(v[1][0] for v in vs), min(v[1][1] for v in vs))
        vs = [(b, s, [(s[0] - out[0]) // 2, (s[1] - out[1]) // 2]) for b, s, _ in vs]
        steps = [('rrc', *out, (0.08, 1.0), (0.75, 4 / 3), interp), ('crop', *out), ('normalize', (0,) * 3, (1,) * 3)]
        draws = {k: torch.tensor(np.array([v[k] for v in [views.draw_view(steps, 1, 1)] * len(vs)]))[None]
                 for k in views.VIEW_KEYS}
        for k, j in (('box', 0), ('size', 1), ('window', 2)):
            draws[k] = torch.tensor([[v[j] for v in vs]], dtype=torch.float64)
        x = dict(pixels=torch.from_numpy(arrays[i]).permute(2, 0, 1).reshape(-1), shapes=[arrays[i].shape[:2]],
                 order=[0])
        got = views.make_pixels(x, draws, steps, 'cpu', budget=1 << 22).permute(0, 2, 3, 1).numpy()
        for v, (box, size, window) in enumerate(vs):
            assert np.array_equal(got[v], pillow_resize(arrays[i], box, size, window, out, interp)), (i, v, box, size)


def test_pillows_pass_order_is_probed():
    """The probe's image tells the two orders apart, and the rule names the order Pillow took."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8))
    hv = np.asarray(im.resize((39, 40), 3).resize((39, 10), 3))
    vh = np.asarray(im.resize((40, 10), 3).resize((39, 10), 3))
    both = np.asarray(im.resize((39, 10), 3))
    assert not np.array_equal(hv, vh)
    first = bool(views.pillow_vertical_first(np.array([40]), np.array([40]), np.array([10]), np.array([39]))[0])
    assert np.array_equal(both, vh if first else hv)


@pytest.mark.parametrize('op,fn,factors', [
    (0, F.adjust_brightness, [0.6, 0.93, 1.0, 1.37]),
    (1, F.adjust_contrast, [0.6, 1.21, 1.4]),
    (2, F.adjust_saturation, [0.6, 1.1, 1.4]),
    (3, F.adjust_hue, [-0.45, -0.1, -0.03, 0.07, 0.45]),
])
def test_colour_jitter_operations_are_pillows_pixels(op, fn, factors, one_thread):
    """Each of ColorJitter's operations with a per-view factor, against torchvision's PIL function with
    that factor, on random and smooth images: bit for bit (torchvision's own tensor-versus-PIL tests
    allow up to 16 levels for hue)."""
    rng = np.random.default_rng(op)
    a = rng.integers(0, 256, (6, 40, 52, 3), dtype=np.uint8)
    a[:3] = np.clip(np.cumsum(rng.normal(0, 12, (3, 40, 52, 3)), 2) + 128, 0, 255).astype(np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    f = torch.tensor([factors[i % len(factors)] for i in range(6)], dtype=torch.float64)
    t = views._jitter(x.clone(), op, f)
    ref = torch.stack([torch.from_numpy(np.array(fn(Image.fromarray(a[i]), float(f[i])))).permute(2, 0, 1)
                       for i in range(6)]).float()
    assert torch.equal(t, ref)


def test_grayscale_flip_and_blur_against_pil(one_thread):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (4, 48, 40, 3), dtype=np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    pil = [Image.fromarray(v) for v in a]
    back = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float()  # noqa: E731
    grey = torch.stack([back(F.rgb_to_grayscale(p, 3)) for p in pil])
    assert torch.equal(views._luma(x).expand(-1, 3, -1, -1), grey)
    sigma = [0.1, 0.7, 1.3, 2.0]
    for kernel in [(3, 3), (23, 23), (5, 9)]:
        k = torch.tensor(np.array([np.concatenate([views.blur_kernel(kernel[0], s), views.blur_kernel(kernel[1], s)])
                                   for s in sigma]))
        t = views._blur(x.clone(), k, kernel)
        ref = torch.stack([back(F.gaussian_blur(p, list(kernel), [s, s])) for p, s in zip(pil, sigma)])
        assert (t - ref).abs().max() <= 1.0 and (t != ref).float().mean() < 0.01
    # flip: a whole view through make_pixels with a forced flip equals PIL's mirror
    steps = [('flip', 1.0), ('normalize', (0, 0, 0), (1, 1, 1))]
    draws = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in views.draw_view(steps, 48, 40, seed=0).items()}
    assert draws['flip'].item() == 1
    x = dict(pixels=torch.from_numpy(a[0]).permute(2, 0, 1).reshape(-1), shapes=[(48, 40)], order=[0])
    assert torch.equal(views.make_pixels(x, draws, steps, 'cpu')[0].float(), back(F.hflip(pil[0])))


def _recording(monkeypatch):
    """torchvision's samplers, each call's result recorded."""
    calls = []
    for cls in (T.RandomResizedCrop, T.ColorJitter, T.GaussianBlur):
        original = cls.get_params

        def spy(*args, _original=original, _name=cls.__name__):
            out = _original(*args)
            calls.append((_name, out))
            return out
        monkeypatch.setattr(cls, 'get_params', staticmethod(spy))
    return calls


@pytest.mark.parametrize('name', RECIPES)
def test_draws_are_torchvisions_own(name, monkeypatch):
    """Over 200 (image, view) streams, draw_view (on a torch.Generator of the stream's own) returns
    exactly what torchvision's pipeline draws with the global generator seeded alike: crop boxes, jitter
    order and factors, blur sigma (and the coins, through the identical PIL views of the other tests);
    the global generator is left as it was."""
    transform = RECIPES[name]()
    steps = views.view_steps(transform)
    calls = _recording(monkeypatch)
    img = Image.new('RGB', (500, 375) if 'CIFAR' not in name else (32, 32))
    for v in range(200):
        seed = views.view_seed(0, v % 7, v)
        del calls[:]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            transform(img)
        state = torch.get_rng_state()
        d = views.draw_view(steps, img.height, img.width, seed)
        assert torch.equal(torch.get_rng_state(), state)
        box = [c[1] for c in calls if c[0] == 'RandomResizedCrop']
        assert not box or d['box'] == list(box[0])
        jit = [c[1] for c in calls if c[0] == 'ColorJitter']
        assert d['jitter'] == len(jit)
        if jit:
            want = [np.nan if f is None else f for f in jit[0][1:]]
            assert d['order'] == jit[0][0].tolist() and np.array_equal(d['factors'], want, equal_nan=True)
        blur = [c[1] for c in calls if c[0] == 'GaussianBlur']
        assert d['blur'] == len(blur) and (not blur or d['sigma'] == blur[0])


def test_crop_fallback_and_coins_on_a_generator():
    """RandomResizedCrop's fallback (no crop of the ratio fits a 2 x 300 image) and every coin, drawn on a
    generator, against torchvision's classes drawing from the global generator seeded alike."""
    for s in range(50):
        g_box = views._rrc_box(torch.Generator().manual_seed(s), 2, 300, (0.08, 1.0), (3 / 4, 4 / 3))
        with torch.random.fork_rng():
            torch.manual_seed(s)
            assert g_box == T.RandomResizedCrop.get_params(torch.empty(3, 2, 300), [0.08, 1.0], [3 / 4, 4 / 3])
    steps = views.view_steps(views.augment_transform(clip_preprocess(32)))
    coins = [s for s in steps if s[0] in ('flip', 'gray')]
    assert len(coins) == 2
    for s in range(50):
        d = views.draw_view([('flip', 0.5), ('gray', 0.5), ('normalize', (0,) * 3, (1,) * 3)], 8, 8, s)
        with torch.random.fork_rng():
            torch.manual_seed(s)
            assert [d['flip'], d['gray']] == [int(bool(torch.rand(1) < 0.5)), int(bool(torch.rand(1) < 0.5))]


def test_draws_follow_the_recipe_distribution():
    """3,000 draws of our recipe: each coin at its probability, crops inside the scale and ratio ranges."""
    steps = views.view_steps(views.augment_transform(clip_preprocess()))
    ds = [views.draw_view(steps, 375, 500, views.view_seed(1, i, 0)) for i in range(3000)]
    rate = {k: np.mean([d[k] for d in ds]) for k in ('flip', 'jitter', 'gray', 'blur')}
    want = dict(flip=views.AUG_FLIP_P, jitter=views.AUG_JITTER_P, gray=views.AUG_GRAY_P, blur=views.AUG_BLUR_P)
    for k in want:  # 4 standard deviations of a binomial rate
        assert abs(rate[k] - want[k]) < 4 * np.sqrt(want[k] * (1 - want[k]) / 3000), (k, rate[k])
    area = np.array([d['box'][2] * d['box'][3] / (375 * 500) for d in ds])
    ratio = np.array([d['box'][3] / d['box'][2] for d in ds])
    assert area.min() >= views.AUG_CROP_SCALE[0] - 0.01 and area.max() <= 1.0 and area.std() > 0.1
    assert ratio.min() >= 0.75 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    sig = np.array([d['sigma'] for d in ds if d['blur']])
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.05


def test_every_image_and_view_has_its_own_stream(one_thread):
    """22 identical images x 120 views: 2,640 streams, 2,640 different views (the old seeding,
    (seed * 1000003 + i) * 101 + view, gave image i's views 101-119 the draws of image i + 1's 0-18)."""
    old = {(0 * 1_000_003 + i) * 101 + v for i in range(22) for v in range(120)}
    assert len(old) < 22 * 120
    seeds = {views.view_seed(0, i, v) for i in range(22) for v in range(120)}
    assert len(seeds) == 22 * 120
    transform = views.augment_transform(clip_preprocess(32))
    same = photos([(120, 160)]).arrays[0]
    images = dataset.Images([str(i) for i in range(22)], np.eye(2)[[0] * 22], arrays=[same] * 22)
    data = views.DecodedImages(images, range(22), transform, 120, seed=0)
    batch = views.collate_decoded([data[k] for k in range(22)])
    draws = torch.cat([v.reshape(22 * 120, -1) for v in batch[1].values()], 1)
    assert len(torch.unique(draws, dim=0)) == 22 * 120
    made = views.make_views(*batch[:2], views.view_steps(transform), 'cpu')
    assert len(torch.unique(made.reshape(len(made), -1), dim=0)) == 22 * 120
    # a stream depends on (seed, image, view) alone: the same view from another batch, order or dataset
    again = views.DecodedImages(images, [17], transform, 120, seed=0)
    one = views.make_views(*views.collate_decoded([again[0]])[:2], views.view_steps(transform), 'cpu')
    assert torch.equal(one, made[17 * 120:18 * 120])


@pytest.mark.parametrize('name', RECIPES)
def test_views_made_in_a_worker_are_the_devices(name, one_thread):
    """VIEWS_ON='workers' (Pillow's own resize in the loader's workers, the same colour steps on the CPU)
    and VIEWS_ON='device' make the very same views."""
    transform = RECIPES[name]()
    images = photos([(32, 32)] * 2 if 'CIFAR' in name else SIZES[:3])
    here = pixels(images, transform, 4, 1, make_here=True)
    assert here.dtype == torch.uint8 and here.shape[:2] == (len(images) * 4, 3)
    assert torch.equal(here, pixels(images, transform, 4, 1))


@pytest.mark.parametrize('backbone', ['CLIP', 'VGG-16'])
def test_default_recipe_is_torchvisions_with_the_backbones_own_normalisation(backbone):
    """views.augment_transform against the recipe written out with torchvision's classes and the
    backbone's normalisation from its own source (open_clip's OpenAI constants; torchvision's ImageNet
    values): the same tensor on the same stream, 20 streams; and the tensor path normalises alike."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    if backbone == 'CLIP':
        preprocess, mean, std = clip_preprocess(), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        interp = T.InterpolationMode.BICUBIC
    else:
        preprocess = PLAIN['VGG-16 (torchvision weights preset)']()
        mean, std, interp = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), T.InterpolationMode.BILINEAR
    reference = T.Compose([
        T.RandomResizedCrop(224, scale=views.AUG_CROP_SCALE, interpolation=interp),
        T.RandomHorizontalFlip(views.AUG_FLIP_P),
        T.RandomApply([T.ColorJitter(*views.AUG_JITTER)], p=views.AUG_JITTER_P),
        T.RandomGrayscale(views.AUG_GRAY_P),
        T.RandomApply([T.GaussianBlur(23, views.AUG_BLUR_SIGMA)], p=views.AUG_BLUR_P),  # SimCLR's 10% kernel
        T.ToTensor(), T.Normalize(mean, std)])
    ours = views.augment_transform(preprocess)
    img = photos([(375, 500)]).load(0)
    for s in range(20):
        with torch.random.fork_rng():
            torch.manual_seed(s)
            a = ours(img)
            torch.manual_seed(s)
            assert torch.equal(a, reference(img)), s
    norm = views.view_steps(ours)[-1]
    assert norm[0] == 'normalize' and np.allclose(norm[1], mean) and np.allclose(norm[2], std)


def test_views_do_not_depend_on_grouping_autocast_or_tf32(monkeypatch, one_thread):
    """The same views from one batch of all images, from batches of one image, in another order, under
    budgets that put one image a group or a few of one image's views a group, under autocast and with
    float32 products in TF32 or bf16: every operation's sum is exact, so grouping cannot move a level."""
    transform = RECIPES['ours (SimCLR views)']()
    images = photos(SIZES)
    whole = pixels(images, transform, 5, 4)
    data = views.DecodedImages(images, range(5), transform, 5, 4)
    one_by_one = [views.make_pixels(*views.collate_decoded([data[k]])[:2], views.view_steps(transform), 'cpu')
                  for k in range(5)]
    assert torch.equal(torch.cat(one_by_one), whole)
    shuffled = pixels(images, transform, 5, 4, order=[3, 0, 4, 1, 2])
    assert torch.equal(shuffled.view(5, 5, *shuffled.shape[1:])[np.argsort([3, 0, 4, 1, 2])].flatten(0, 1), whole)
    for budget in (400 * 400, 30 * 224 * 1000, 1 << 30):
        groups = views.resample_groups([s for s in SIZES], list(range(5)), 5, (224, 224), budget)
        assert len(groups) > 1 or budget == 1 << 30
        assert torch.equal(pixels(images, transform, 5, 4, budget=budget), whole), budget
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(pixels(images, transform, 5, 4), whole)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'fp32_precision', 'tf32')
    monkeypatch.setattr(torch.backends.mkldnn.matmul, 'fp32_precision', 'bf16')
    assert torch.equal(pixels(images, transform, 5, 4), whole)


def test_resampling_groups_keep_their_memory_bound():
    """Every group's largest tensor (the images, the dense weights views x out x in, a pass's result) is
    within the budget; an image too large for it alone is cut into runs of views within it (a 12-megapixel
    photo's 120 views too); every view is in one group."""
    shapes = [(375, 500), (500, 375), (3000, 4000), (32, 32), (32, 32), (90, 600)]
    for budget in (1 << 22, 1 << 24, 1 << 26):
        groups = views.resample_groups(shapes, list(range(6)), 120, (224, 224), budget)
        seen = {}
        for pos, (va, ve), H, W in groups:
            n = ve - va
            of_views = n * 224 * max(W, 3 * H, H, 3 * W)  # either pass order
            assert len(pos) * max(3 * H * W, of_views) <= budget or (len(pos) == 1 and of_views <= budget)
            for b in pos:
                seen[b] = seen.get(b, 0) + n
        assert seen == {b: 120 for b in range(6)}


def test_unknown_transform_names_the_way_out():
    with pytest.raises(ValueError, match='does not know the transform.*--view_path=pil'):
        views.view_steps(T.Compose([T.RandomRotation(10), T.ToTensor()]))
    with pytest.raises(ValueError, match='bilinear or bicubic.*--view_path=pil'):
        views.view_steps(T.Compose([T.Resize(32, interpolation=T.InterpolationMode.NEAREST), T.ToTensor()]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_views_are_the_cpus():
    """On a GPU (TF32 products, cuBLAS's own order), the very views the CPU makes."""
    for name in RECIPES:
        transform = RECIPES[name]()
        images = photos([(32, 32)] * 3 if 'CIFAR' in name else SIZES)
        assert torch.equal(pixels(images, transform, 6, 2, device='cuda').cpu(), pixels(images, transform, 6, 2))
