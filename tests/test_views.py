"""The views made on the extraction device (views.make_views) against torchvision's PIL pipeline:
the same random draws from torchvision's own samplers, each operation within the tolerances
torchvision's own tensor-versus-PIL tests use, whole views within a stated tolerance, and one
independent random stream per (seed, image, view)."""
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


def levels(a, b, steps):
    """|a - b| of two normalised view batches, in 0..255 grey levels."""
    std = torch.tensor(next(s for s in steps if s[0] == 'normalize')[2]).view(1, 3, 1, 1)
    return ((a - b) * std * 255).abs()


def both_paths(images, transform, n_views, seed, device='cpu'):
    """The views of every image by the tensor path and by the PIL path: two (N V) x 3 x h x w batches."""
    steps = views.view_steps(transform)
    out = []
    for path in views.VIEW_PATHS:
        data = views.DecodedImages(images, range(len(images)), transform, n_views, seed, path)
        made = [views.make_views(*views.collate_decoded([data[k]])[:2], steps, device).cpu()
                 for k in range(len(images))]
        out.append(torch.cat(made))
    return out[0], out[1], steps


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
def test_plain_views_equal_pil_within_one_level(name, one_thread):
    transform = PLAIN[name]()
    images = photos([(32, 32)] * 2 if 'CIFAR' in name else SIZES)
    t, p, steps = both_paths(images, transform, 1, None)
    d = levels(t, p, steps)
    assert d.max() <= 1.0 + 1e-3 and d.mean() < 0.05, (name, d.max(), d.mean())
    # and the PIL path is torchvision's pipeline itself
    ref = torch.stack([transform(images.load(i)) for i in range(len(images))])
    assert torch.equal(p, ref)


@pytest.mark.parametrize('name', RECIPES)
def test_augmented_views_equal_pil_within_tolerance(name, one_thread):
    """Whole views: the same draws, so the same crop, flip, jitter, grey and blur; pixels differ by
    Pillow's one-level rounding of a resize, which a hue shift can widen where colour is faint
    (torchvision allows 16.1 levels for hue alone): at most 16 levels, 0.2 on average, 99% within 1."""
    transform = RECIPES[name]()
    images = photos([(32, 32)] * 3 if 'CIFAR' in name else SIZES)
    t, p, steps = both_paths(images, transform, 8, seed=5)
    d = levels(t, p, steps)
    assert d.max() <= 16.1 and d.mean() < 0.2 and (d <= 1.0 + 1e-3).float().mean() > 0.99, (d.max(), d.mean())
    with torch.random.fork_rng():  # the PIL path is torchvision's pipeline itself, on the view's stream
        torch.manual_seed(views.view_seed(5, 1, 3))
        assert torch.equal(p[1 * 8 + 3], transform(images.load(1)))


@pytest.mark.parametrize('interp', [T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR])
def test_crop_and_resize_within_one_level(interp, one_thread):
    """Downscaling (antialiased) and upscaling crops, against torchvision's resized_crop on PIL (<= 1/255)."""
    images = photos([(375, 500), (20, 28)], seed=3)
    for i, (box, size) in enumerate([((10, 33, 301, 287), (224, 224)), ((2, 3, 15, 20), (64, 48))]):
        x = torch.from_numpy(images.arrays[i]).permute(2, 0, 1)[None]
        steps = [('rrc', *size, (0.08, 1.0), (0.75, 4 / 3), interp), ('normalize', (0, 0, 0), (1, 1, 1))]
        draws = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in views.draw_view(steps, 1, 1).items()}
        draws['box'] = torch.tensor([[box]], dtype=torch.float64)
        t = views.make_views(x, draws, steps, 'cpu')[0] * 255
        ref = torch.from_numpy(np.array(F.resized_crop(images.load(i), *box, list(size), interp))).permute(2, 0, 1)
        assert (t - ref).abs().max() <= 1.0 + 1e-3


@pytest.mark.parametrize('op,fn,factors,tol', [
    (0, F.adjust_brightness, [0.6, 0.93, 1.0, 1.37], 2.0),
    (1, F.adjust_contrast, [0.6, 1.21, 1.4], 2.0),
    (2, F.adjust_saturation, [0.6, 1.1, 1.4], 2.0),
    (3, F.adjust_hue, [-0.45, -0.1, -0.03, 0.07, 0.45], 16.1),
])
def test_colour_jitter_operations_against_pil(op, fn, factors, tol, one_thread):
    """Each of ColorJitter's operations with a per-view factor, against torchvision's PIL function with
    that factor, on random and smooth images: within torchvision's own tensor-vs-PIL tolerance (its
    max agg), and on average within a tenth of a level."""
    rng = np.random.default_rng(op)
    a = rng.integers(0, 256, (6, 40, 52, 3), dtype=np.uint8)
    a[:3] = np.clip(np.cumsum(rng.normal(0, 12, (3, 40, 52, 3)), 2) + 128, 0, 255).astype(np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    f = torch.tensor([factors[i % len(factors)] for i in range(6)], dtype=torch.float64)
    t = views._jitter(x.clone(), op, f)
    ref = torch.stack([torch.from_numpy(np.array(fn(Image.fromarray(a[i]), float(f[i])))).permute(2, 0, 1)
                       for i in range(6)]).float()
    assert (t - ref).abs().max() <= tol and (t - ref).abs().mean() < 0.1


def test_grayscale_flip_and_blur_against_pil(one_thread):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (4, 48, 40, 3), dtype=np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    pil = [Image.fromarray(v) for v in a]
    back = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float()  # noqa: E731
    grey = torch.stack([back(F.rgb_to_grayscale(p, 3)) for p in pil])
    assert torch.equal(views._luma(x).expand(-1, 3, -1, -1), grey)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0], dtype=torch.float64)
    for kernel in [(3, 3), (23, 23)]:
        t = views._blur(x.clone(), sigma, kernel)
        ref = torch.stack([back(F.gaussian_blur(p, list(kernel), [float(s)] * 2)) for p, s in zip(pil, sigma)])
        assert (t - ref).abs().max() <= 1.0 and (t != ref).float().mean() < 0.01
    # flip: a whole view through make_views with a forced flip equals PIL's mirror
    steps = [('flip', 1.0), ('normalize', (0, 0, 0), (1, 1, 1))]
    draws = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in views.draw_view(steps, 48, 40, seed=0).items()}
    assert draws['flip'].item() == 1
    assert torch.equal(views.make_views(torch.from_numpy(a[:1]).permute(0, 3, 1, 2), draws, steps, 'cpu')[0] * 255,
                       back(F.hflip(pil[0])))


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
    """Over 200 (image, view) streams, draw_view returns exactly what torchvision's pipeline draws
    on the same stream: crop boxes, jitter order and factors, blur sigma (and the coins, through the
    identical PIL views of the other tests)."""
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
        want = list(calls)
        del calls[:]
        d = views.draw_view(steps, img.height, img.width, seed)
        got = [c for c in calls]
        assert [c[0] for c in got] == [c[0] for c in want]
        for (kind, a), (_, b) in zip(got, want):
            if kind == 'ColorJitter':
                assert a[0].tolist() == b[0].tolist() and a[1:] == b[1:]
            else:
                assert a == b
        box = [c[1] for c in want if c[0] == 'RandomResizedCrop']
        assert not box or d['box'] == list(box[0])
        jit = [c[1] for c in want if c[0] == 'ColorJitter']
        assert d['jitter'] == len(jit) and (not jit or d['order'] == jit[0][0].tolist())


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
def test_views_made_in_a_worker_equal_views_made_on_the_device(name, one_thread):
    """On the CPU the loader's workers make the views with Pillow's own resize (make_here): the
    same draws and colour operations as on the device, so the same views within the resize's level."""
    transform = RECIPES[name]()
    images, steps = photos([(32, 32)] * 2 if 'CIFAR' in name else SIZES[:3]), views.view_steps(transform)
    n = len(images)
    here = [views.DecodedImages(images, range(n), transform, 4, seed=1, make_here=True)[k] for k in range(n)]
    device = [views.DecodedImages(images, range(n), transform, 4, seed=1)[k] for k in range(n)]
    made = views.collate_decoded(here)
    assert made[0].dtype == torch.uint8 and made[1] is None and made[0].shape[:3] == (n, 4, 3)
    a = views.make_views(*made[:2], steps, 'cpu')
    b = views.make_views(*views.collate_decoded(device)[:2], steps, 'cpu')
    d = levels(a, b, steps)
    assert d.max() <= 16.1 and d.mean() < 0.2 and (d <= 1.0 + 1e-3).float().mean() > 0.99
    pil = views.collate_decoded([views.DecodedImages(images, range(n), transform, 4, seed=1, path='pil')[k]
                                   for k in range(n)])
    d = levels(a, views.make_views(*pil[:2], steps, 'cpu'), steps)  # Pillow's resize: closer still to PIL
    assert d.max() <= 2.0 and (d == 0).float().mean() > 0.999


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


def test_large_images_resized_in_groups_equal_one_batch(monkeypatch, one_thread):
    """Images are resized in groups of at most RESAMPLE_PIXELS padded pixels (a batch of large photos
    would not fit a GPU at once): any grouping gives the same views."""
    transform = RECIPES['ours (SimCLR views)']()
    images, steps = photos(SIZES), views.view_steps(transform)
    data = views.DecodedImages(images, range(5), transform, 3, seed=4)
    batch = views.collate_decoded([data[k] for k in range(5)])
    whole = views.make_views(*batch[:2], steps, 'cpu')
    monkeypatch.setattr(views, 'RESAMPLE_PIXELS', 400 * 400)  # one photo a group, the small ones together
    assert torch.equal(views.make_views(*batch[:2], steps, 'cpu'), whole)


def test_unknown_transform_names_the_way_out():
    with pytest.raises(ValueError, match='does not know the transform.*--view_path=pil'):
        views.view_steps(T.Compose([T.RandomRotation(10), T.ToTensor()]))
    with pytest.raises(ValueError, match='bilinear or bicubic.*--view_path=pil'):
        views.view_steps(T.Compose([T.Resize(32, interpolation=T.InterpolationMode.NEAREST), T.ToTensor()]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_views_equal_cpu_views():
    transform = RECIPES['ours (SimCLR views)']()
    images = photos(SIZES[:3])
    t_cpu, _, steps = both_paths(images, transform, 6, seed=2)
    t_gpu, p_gpu, _ = both_paths(images, transform, 6, seed=2, device='cuda')
    d = levels(t_cpu, t_gpu, steps)
    assert d.max() <= 16.1 and d.mean() < 0.05
