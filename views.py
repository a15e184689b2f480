"""The views of an image the backbone encodes (Section 3.3's v1, v2, and the plain view): the recipes
(ours and the authors' released code's), the random draws of each view (torchvision's own samplers on
a stream of its own, kornia's `generate_parameters`), and the operations that apply them, batched on
the extraction device (`apply_transform`), to Pillow's arithmetic.
"""
import os

import numpy as np

from dataset import DataError

# -----------------------------------------------------------------------------
# augmentation of the training views v1, v2 (Section 3.3; the paper does not print its
# recipe, these are the usual SimCLR-style ones)
AUG_CROP_SCALE = (0.5, 1.0)   # RandomResizedCrop area range
AUG_FLIP_P = 0.5              # horizontal flip probability
AUG_JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter brightness, contrast, saturation, hue
AUG_JITTER_P = 0.8            # probability of applying the colour jitter
AUG_GRAY_P = 0.2              # RandomGrayscale probability
AUG_BLUR_P = 0.5              # probability of a Gaussian blur
AUG_BLUR_SIGMA = (0.1, 2.0)   # blur sigma range


# -----------------------------------------------------------------------------
# views: the plain view is the backbone's own preprocessing; the augmented views v1, v2 use
# the AUG_* constants, then the same resize and normalisation as the backbone
def augment_transform(preprocess):
    from torchvision import transforms as T
    from models import preprocess_params
    size, mean, std, interp = preprocess_params(preprocess)
    blur_kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.Compose([
        T.RandomResizedCrop(size, scale=AUG_CROP_SCALE, interpolation=interp),
        T.RandomHorizontalFlip(AUG_FLIP_P),
        T.RandomApply([T.ColorJitter(*AUG_JITTER)], p=AUG_JITTER_P),
        T.RandomGrayscale(AUG_GRAY_P),
        T.RandomApply([T.GaussianBlur(blur_kernel, AUG_BLUR_SIGMA)], p=AUG_BLUR_P),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def augment_settings():
    return dict(crop_scale=AUG_CROP_SCALE, flip=AUG_FLIP_P, jitter=AUG_JITTER, jitter_p=AUG_JITTER_P,
                gray=AUG_GRAY_P, blur_p=AUG_BLUR_P, blur_sigma=AUG_BLUR_SIGMA)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIEW_RECIPES = ('simclr', 'released')  # ours (the backbone's own plain view, AUG_* views) or the authors' code's


def released_views(dataset, size=224):
    """(plain, augmented) views of the authors' released code (their data loaders' transforms) at the backbone's
    input `size` (224 for every real backbone, as theirs; 256 scales with it), every one
    normalised with ImageNet's mean and std. CIFAR-10: plain Resize(224, bicubic) + CenterCrop(224);
    augmented Resize(224, bicubic), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.7, grayscale
    p = 0.2, a 3 x 3 Gaussian blur with sigma in [0.1, 2] at p = 0.5, no crop. The other sets:
    plain Resize(256) + CenterCrop(224); augmented RandomResizedCrop(224) + flip. (Their blur is
    OpenCV's on the uint8 array; torchvision's same kernel here may round a pixel differently.)"""
    from torchvision import transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if dataset == 'cifar10':
        plain = T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size)] + tail)
        augment = T.Compose([T.Resize(size, interpolation=bicubic), T.RandomHorizontalFlip(),
                             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.7), T.RandomGrayscale(p=0.2),
                             T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5)] + tail)
    else:
        plain = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)] + tail)
        augment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + tail)
    return plain, augment


# -----------------------------------------------------------------------------
# views made on the extraction device (dataset_extract.py's default, VIEW_PATH='tensor'): each
# image is decoded once, in a DataLoader worker, and all of its views are made from it as batched
# tensor operations on the device. A view's random choices are drawn by torchvision's own samplers
# (RandomResizedCrop.get_params, ColorJitter.get_params, ...), in the order its pipeline draws
# them, from a random stream of its own: the torchvision PIL pipeline run on the same stream makes
# the same view (VIEW_PATH='pil', the reference the tests hold this path to). Each operation
# reproduces PIL's arithmetic on the 0..255 grid (Pillow's Resample.c, Blend.c, Convert.c).
VIEW_PATHS = ('tensor', 'pil')


def view_seed(seed, i, view):
    """The seed of the random stream of view `view` of image `i`: 63 bits of numpy's SeedSequence
    of (seed, i, view). No two (seed, image, view) share a stream, in any worker, rank, chunk size or
    rerun (arithmetic such as (seed * p + i) * 101 + view collides once views outnumber 101)."""
    return int(np.random.SeedSequence([seed, int(i), int(view)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def view_steps(transform):
    """A torchvision pipeline as the steps the tensor path runs, in order: ('resize', size, max_size,
    interp), ('crop', h, w) (centre), ('rrc', h, w, scale, ratio, interp), ('flip', p), ('jitter', p,
    brightness, contrast, saturation, hue), ('gray', p), ('blur', p, kernel, sigma), ('normalize', mean,
    std); p is None where the pipeline tosses no coin (a bare ColorJitter).
    A transform it does not know is an error naming it."""
    from torchvision import transforms as T
    if not isinstance(transform, T.Compose):  # torchvision weights' preset (VGG-16): resize, crop, normalise
        return [('resize', list(transform.resize_size), None, transform.interpolation),
                ('crop', transform.crop_size[0], transform.crop_size[-1]),
                ('normalize', tuple(transform.mean), tuple(transform.std))]
    steps = []
    for t in transform.transforms:
        inner = t.transforms[0] if isinstance(t, T.RandomApply) and len(t.transforms) == 1 else t
        p = t.p if inner is not t else None
        if isinstance(t, T.Resize):
            steps.append(('resize', [t.size] if isinstance(t.size, int) else list(t.size), t.max_size, t.interpolation))
        elif isinstance(t, T.CenterCrop):
            steps.append(('crop', *t.size))
        elif isinstance(t, T.RandomResizedCrop):
            steps.append(('rrc', *t.size, tuple(t.scale), tuple(t.ratio), t.interpolation))
        elif isinstance(t, T.RandomHorizontalFlip):
            steps.append(('flip', t.p))
        elif isinstance(inner, T.ColorJitter):
            steps.append(('jitter', p, inner.brightness, inner.contrast, inner.saturation, inner.hue))
        elif isinstance(t, T.RandomGrayscale):
            steps.append(('gray', t.p))
        elif isinstance(inner, T.GaussianBlur):
            steps.append(('blur', p, tuple(inner.kernel_size), tuple(inner.sigma)))
        elif isinstance(t, T.ToTensor):  # (open_clip's MaybeToTensor too) the device's float conversion
            pass
        elif isinstance(t, T.Normalize):
            steps.append(('normalize', tuple(t.mean), tuple(t.std)))
        elif type(t).__name__ != 'MaybeConvertMode' and getattr(t, '__name__', '') != '_convert_to_rgb':
            raise ValueError(f"the tensor view path does not know the transform {t!r}: pass --view_path=pil")
        if steps and steps[-1][0] in ('resize', 'rrc') and steps[-1][-1] not in (T.InterpolationMode.BILINEAR,
                                                                                T.InterpolationMode.BICUBIC):
            raise ValueError(f"the tensor view path resizes bilinear or bicubic, not {steps[-1][-1]}: pass "
                             f"--view_path=pil")
    kinds = [s[0] for s in steps]
    if kinds.count('resize') + kinds.count('rrc') > 1 or ('crop' in kinds and kinds.index('crop') < max(
            [kinds.index(k) for k in ('resize', 'rrc') if k in kinds], default=-1)) or kinds.count('crop') > 1:
        raise ValueError(f"the tensor view path makes one resampling, then one centre crop: {transform!r} has "
                         f"another order; pass --view_path=pil")
    return steps


def _resized_size(h, w, size, max_size):
    """torchvision's Resize output size of an h x w image (its _compute_resized_output_size)."""
    if len(size) == 2:
        return list(size)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return [new_long, new_short] if w <= h else [new_short, new_long]


VIEW_KEYS = ('box', 'size', 'window', 'flip', 'jitter', 'order', 'factors', 'gray', 'blur', 'sigma')


def draw_view(steps, h, w, seed=None):
    """The choices of one view of an h x w image, drawn by torchvision's samplers in its pipeline's
    order on the stream torch.manual_seed(seed) (None: the plain view, which draws nothing):
    box (top, left, height, width of the region resampled), size (what it is resampled to), window
    (top, left of the part kept), flip, jitter (applied) with order (ColorJitter's fn_idx) and
    factors (brightness, contrast, saturation, hue; NaN: not drawn, not applied), gray, blur (applied)
    with sigma."""
    import torch
    from torchvision import transforms as T
    v = dict(box=[0, 0, h, w], size=[h, w], window=[0, 0], flip=0, jitter=0, order=[0, 1, 2, 3],
             factors=[np.nan] * 4, gray=0, blur=0, sigma=1.0)
    cur = [h, w]

    def coin(p):  # RandomApply's coin: applied unless p < rand
        return p is None or not p < torch.rand(1)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for s in steps:
            if s[0] == 'resize':
                v['size'] = cur = _resized_size(*cur, s[1], s[2])
            elif s[0] == 'rrc':
                v['box'] = list(T.RandomResizedCrop.get_params(torch.empty(()).expand(3, *cur), s[3], s[4]))
                v['size'] = cur = [s[1], s[2]]
            elif s[0] == 'crop':
                v['window'] = [int(round((cur[0] - s[1]) / 2.0)), int(round((cur[1] - s[2]) / 2.0))]
                if min(v['window']) < 0:
                    raise ValueError(f"a {cur[0]} x {cur[1]} image is smaller than the {s[1]} x {s[2]} crop")
                cur = [s[1], s[2]]
            elif s[0] == 'flip':
                v['flip'] = int(bool(torch.rand(1) < s[1]))
            elif s[0] == 'jitter' and coin(s[1]):
                fn_idx, *f = T.ColorJitter.get_params(*s[2:6])
                v.update(jitter=1, order=fn_idx.tolist(), factors=[np.nan if x is None else x for x in f])
            elif s[0] == 'gray':
                v['gray'] = int(bool(torch.rand(1) < s[1]))
            elif s[0] == 'blur' and coin(s[1]):
                v.update(blur=1, sigma=T.GaussianBlur.get_params(*s[3]))
    return v


def draw_views(steps, h, w, seed, i, n_views):
    """{key: array (n_views, ...)} of views 0..n_views-1 of image i (seed None: the plain view)."""
    vs = [draw_view(steps, h, w, None if seed is None else view_seed(seed, i, v)) for v in range(n_views)]
    return {k: np.array([v[k] for v in vs], np.float64) for k in VIEW_KEYS}


def pil_part(transform):
    """The PIL half of a torchvision pipeline (everything before ToTensor), as one callable."""
    from torchvision import transforms as T
    if not isinstance(transform, T.Compose):  # torchvision weights' preset
        return T.Compose([T.Resize(list(transform.resize_size), transform.interpolation),
                          T.CenterCrop(transform.crop_size)])
    cut = next((k for k, t in enumerate(transform.transforms) if isinstance(t, T.ToTensor)), len(transform.transforms))
    return T.Compose(transform.transforms[:cut])


class DecodedImages:
    """torch Dataset of one extraction pass over images[indices]: item k -> (image, draws, k, ok),
    the image decoded once as a 3 x H x W uint8 tensor with the draws of its n_views views, made
    on the device later (path 'tensor'); or its n_views views, n_views x 3 x h x w uint8, draws None:
    made here by the tensor path with Pillow's resize (path 'tensor', make_here: extraction on the
    CPU, where the loader's workers share the device's cores) or by the PIL pipeline (path 'pil').
    View v of image i draws from view_seed(seed, i, v); seed None: the plain view."""

    def __init__(self, images, indices, transform, n_views=1, seed=None, path='tensor', bad_images='stop',
                 make_here=False):
        self.images, self.indices, self.n_views, self.seed = images, np.asarray(indices), n_views, seed
        self.steps, self.pil, self.path, self.bad_images = view_steps(transform), pil_part(transform), path, bad_images
        self.make_here = make_here
        if path == 'tensor' and any(s[0] == 'jitter' for s in self.steps):
            hsv_tables()  # now, in the process that starts the workers

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        import torch
        i = int(self.indices[k])
        try:
            img, ok = self.images.load(i), True
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
            where = os.path.join(self.images.root or '', self.images.names[i])
            if self.bad_images == 'stop':
                raise DataError(f"cannot read image {where} ({type(e).__name__}: {e}); fix or remove it, "
                                f"or pass --bad_images=skip to skip such images") from e
            from PIL import Image
            img, ok = Image.new('RGB', (64, 64)), False
        if self.path == 'pil':
            views = []
            for v in range(self.n_views):
                with torch.random.fork_rng(devices=[]):
                    if self.seed is not None:
                        torch.manual_seed(view_seed(self.seed, i, v))
                    views.append(torch.from_numpy(np.array(self.pil(img), np.uint8)).permute(2, 0, 1))
            return torch.stack(views), None, k, ok
        draws = draw_views(self.steps, img.height, img.width, self.seed, i, self.n_views)
        if self.make_here:
            views = flip_jitter_gray_blur(resample_pil(img, draws, self.steps), draws, self.steps, 'cpu')
            return views.to(torch.uint8), None, k, ok
        return torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1), draws, k, ok


def collate_decoded(items):
    """A loader batch: (x, draws, k, ok). Path 'tensor': x is the list of the B decoded images (3 x H x W
    uint8, each its own size), draws {key: B x V x ...}; views made here or by the PIL path: x is
    B x V x 3 x h x w uint8, draws None."""
    import torch
    xs, draws, ks, oks = zip(*items)
    k, ok = torch.tensor(ks), torch.tensor(oks)
    if draws[0] is None:
        return torch.stack(xs), None, k, ok
    return list(xs), {key: torch.from_numpy(np.stack([d[key] for d in draws])) for key in VIEW_KEYS}, k, ok


def _pil_filter(x, interp):
    """Pillow's bilinear (triangle, support 1) or bicubic (a = -0.5, support 2) filter."""
    from torchvision.transforms import InterpolationMode
    x = x.abs()
    if interp == InterpolationMode.BILINEAR:
        return (1 - x).clamp(min=0)
    a = -0.5
    return (((a + 2) * x - (a + 3)) * x * x + 1) * (x < 1) + ((((x - 5) * x + 8) * x - 4) * a) * (x >= 1) * (x < 2)


def resample_weights(n_in, start, length, out_len, first, n_out, interp):
    """(V, n_out, n_in) float32: Pillow's resampling weights (Resample.c, precompute_coeffs) for
    resizing the span [start, start + length) of a row to out_len samples, rows first..first +
    n_out of the result; the span's neighbours outside it get no weight (PIL crops, then resizes).
    start, length, out_len, first: (V,) float64 tensors. Only the filter's taps are computed."""
    import torch
    from torchvision.transforms import InterpolationMode
    support = 1.0 if interp == InterpolationMode.BILINEAR else 2.0
    scale = (length / out_len)[:, None]
    fs = scale.clamp(min=1.0)
    center = (first[:, None] + torch.arange(n_out, dtype=torch.float64, device=start.device) + 0.5) * scale
    lo = torch.floor(center - support * fs + 0.5).clamp(min=0)                   # first tap, in the span
    hi = torch.minimum(torch.floor(center + support * fs + 0.5), length[:, None])  # one past the last
    taps = int(np.ceil(support * float(fs.max()))) * 2 + 1
    pos = lo[..., None] + torch.arange(taps, dtype=torch.float64, device=start.device)  # (V, n_out, taps)
    w = _pil_filter((pos - center[..., None] + 0.5) / fs[..., None], interp) * (pos < hi[..., None])
    w = (w / w.sum(-1, keepdim=True).clamp(min=1e-300)).float()
    col = (pos + start[:, None, None]).clamp(max=n_in - 1).long()  # a tap past the row has weight 0
    return torch.zeros(len(start), n_out, n_in, device=start.device).scatter_add_(2, col, w)


def _round8(x):
    """Pillow's rounding of a resampling pass to uint8: half up, clipped to 0..255."""
    return (x + 0.5).floor_().clamp_(0, 255)


def _luma(x):
    """Pillow's convert('L') of (N, 3, H, W) values in 0..255: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    return ((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536).floor_()[:, None]


def _blend(d, x, f):
    """Pillow's Image.blend(d, x, f) on uint8 values: d + f (x - d), clipped, truncated."""
    return (d + f * (x - d)).clamp_(0, 255).floor_()


def _hsv_tables():
    """Pillow's rgb2hsv and hsv2rgb (Convert.c) as tables over every uint8 input, built once with C's
    float and double steps: (h, s) of each (r, g, b), and (r, g, b) of each (h, s, v); 2^24 rows each."""
    f32, f64 = np.float32, np.float64
    g, b = (a.ravel() for a in np.meshgrid(np.arange(256), np.arange(256), indexing='ij'))
    hs = np.empty((256, 65536, 2), np.uint8)
    for r in range(256):
        mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
        cr = (mx - mn).astype(f32)
        with np.errstate(divide='ignore', invalid='ignore'):
            s = cr / mx.astype(f32)
            rc, gc, bc = ((mx - c).astype(f32) / cr for c in (np.full_like(g, r), g, b))
        h = np.where(r == mx, bc - gc, np.where(g == mx, (2.0 + rc.astype(f64) - bc).astype(f32),
                                                (4.0 + gc.astype(f64) - rc).astype(f32)))
        h = np.fmod(h.astype(f64) / 6.0 + 1.0, 1.0).astype(f32)
        grey = mx == mn
        hs[r, :, 0] = np.where(grey, 0, np.clip(np.nan_to_num(np.trunc(h.astype(f64) * 255.0)), 0, 255))
        hs[r, :, 1] = np.where(grey, 0, np.clip(np.nan_to_num(np.trunc(s.astype(f64) * 255.0)), 0, 255))
    s, v = g.astype(f64), b.astype(f64)  # the same grid read as (s, v)
    rgb = np.empty((256, 65536, 3), np.uint8)
    for h in range(256):
        i = np.floor(h * 6.0 / 255.0)
        f = f32(h * 6.0 / 255.0 - i)
        fs = (s / 255.0).astype(f32)
        p, q, t = (np.clip(np.floor(v * k + 0.5), 0, 255) for k in (
            1.0 - fs.astype(f64), 1.0 - (fs * f).astype(f64), 1.0 - fs.astype(f64) * (1.0 - f64(f))))
        vals = (v, p, q, t)
        rgb[h] = np.stack([vals[_SEXTANT[c][int(i) % 6]] for c in range(3)], -1)
    return hs.reshape(-1, 2), rgb.reshape(-1, 3)


_HSV = {}


def hsv_tables():
    """_hsv_tables as CPU tensors, built once a process (0.7 s). DecodedImages builds them before the
    loader's workers start, so the workers share them instead of each building its own."""
    import torch
    if 'cpu' not in _HSV:
        _HSV['cpu'] = tuple(torch.from_numpy(t) for t in _hsv_tables())
    return _HSV['cpu']


_SEXTANT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # r, g, b as (v, p, q, t)[i % 6]


def _hue(x, f):
    """Pillow's hue shift as torchvision's adjust_hue does it on a PIL image: RGB -> HSV (uint8, Convert.c
    rgb2hsv), H += int(255 f) modulo 256, HSV -> RGB (hsv2rgb); the conversions are looked up."""
    import torch
    if x.device not in _HSV:
        _HSV[x.device] = tuple(t.to(x.device) for t in hsv_tables())
    to_hs, to_rgb = _HSV[x.device]
    n, _, hh, ww = x.shape
    c = x.int()
    hs = to_hs.index_select(0, ((c[:, 0] * 256 + c[:, 1]) * 256 + c[:, 2]).flatten()).view(n, hh, ww, 2).int()
    h = (hs[..., 0] + torch.trunc(f * 255).int().view(-1, 1, 1)) % 256   # numpy's uint8 wrap-around
    rgb = to_rgb.index_select(0, ((h * 256 + hs[..., 1]) * 256 + c.amax(1)).flatten())
    return rgb.view(n, hh, ww, 3).permute(0, 3, 1, 2).float()


def _jitter(x, op, f):
    """One of ColorJitter's four operations (0 brightness, 1 contrast, 2 saturation, 3 hue) of every
    view of x (N, 3, H, W, values in 0..255) with its own factor f (N,), as Pillow computes it."""
    f4 = f.float().view(-1, 1, 1, 1)
    if op == 0:
        return _blend(0.0, x, f4)
    if op == 1:  # ImageEnhance.Contrast: the mean grey level, rounded
        return _blend((_luma(x).double().mean((1, 2, 3), keepdim=True) + 0.5).floor().float(), x, f4)
    if op == 2:
        return _blend(_luma(x), x, f4)
    return _hue(x, f)


def _blur(x, sigma, kernel):
    """torchvision's gaussian_blur (reflect padding, rounded to uint8) with each view's own sigma, as
    two 1-d passes."""
    import torch
    import torch.nn.functional as F
    n, c, h, w = x.shape
    kh, kw = kernel[1], kernel[0]
    out = x
    for size, shape in ((kw, (1, kw)), (kh, (kh, 1))):
        half = (size - 1) * 0.5
        t = torch.linspace(-half, half, size, device=x.device)
        pdf = torch.exp(-0.5 * (t[None] / sigma.float()[:, None]) ** 2)
        k1 = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0).view(n * c, 1, *shape)
        pad = (size // 2, size // 2, 0, 0) if shape[0] == 1 else (0, 0, size // 2, size // 2)
        out = F.conv2d(F.pad(out.reshape(1, n * c, h, w), pad, mode='reflect'), k1, groups=n * c).view(n, c, h, w)
    return out.round_()


def make_views(x, draws, steps, device):
    """The views of a loader batch (collate_decoded) on `device`, as the backbone's input: B x V views,
    each image's in view order, (B V) x 3 x h x w float32 normalised. draws None: x holds the views."""
    import torch
    norm = next(s for s in steps if s[0] == 'normalize')
    mean = torch.tensor(norm[1], device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm[2], device=device).view(1, 3, 1, 1)
    if draws is None:
        y = x.to(device, non_blocking=True).flatten(0, 1).float()
    else:
        flat = {k: v.reshape(-1, *v.shape[2:]).numpy() for k, v in draws.items()}  # on the CPU: no device sync
        y = flip_jitter_gray_blur(resample(x, draws, steps, device), flat, steps, device)
    return (y.div_(255) - mean) / std


def _out_size(steps, sizes):
    """The views' height and width: the centre crop's, else the one resampled size of every view."""
    crop = next((s for s in steps if s[0] == 'crop'), None)
    if crop:
        return crop[1], crop[2]
    if not (sizes == sizes[0]).all():
        raise ValueError("the views of this pipeline differ in size from image to image: the tensor path needs one "
                         "size (add a centre crop, or pass --view_path=pil)")
    return int(sizes[0, 0]), int(sizes[0, 1])


def _interp(steps):
    from torchvision.transforms import InterpolationMode
    geo = next((s for s in steps if s[0] in ('resize', 'rrc')), None)
    return geo[-1] if geo else InterpolationMode.BILINEAR  # no resampling: identity weights


RESAMPLE_PIXELS = 1 << 25  # the most pixels (images x padded height x width) one batched resize pass takes


def resample(xs, draws, steps, device):
    """The crop and resize of every view (box -> size -> window of its draws) of the decoded images xs
    (a list of 3 x H x W uint8) on `device`: (B V) x 3 x h x w float on the 0..255 grid. As Pillow does
    it: horizontally, rounded to uint8, then vertically, each pass one batched matrix product with
    Pillow's antialiasing weights, over groups of images zero-padded to a common size (no view reads
    the padding) of at most RESAMPLE_PIXELS."""
    import torch
    B, V = draws['flip'].shape
    box, size, win = (draws[k].reshape(B * V, -1).to(device, non_blocking=True) for k in ('box', 'size', 'window'))
    out_h, out_w = _out_size(steps, draws['size'].reshape(B * V, 2))
    out, a = [], 0
    while a < B:
        e, H, W = a + 1, *xs[a].shape[1:]
        while e < B and (e + 1 - a) * max(H, xs[e].shape[1]) * max(W, xs[e].shape[2]) <= RESAMPLE_PIXELS:
            H, W, e = max(H, xs[e].shape[1]), max(W, xs[e].shape[2]), e + 1
        x = torch.zeros((e - a, 3, H, W), dtype=torch.uint8, device=device)
        for j, im in enumerate(xs[a:e]):
            x[j, :, :im.shape[1], :im.shape[2]] = im.to(device, non_blocking=True)
        r = slice(a * V, e * V)
        wy = resample_weights(H, box[r, 0], box[r, 2], size[r, 0], win[r, 0], out_h, _interp(steps))
        wx = resample_weights(W, box[r, 1], box[r, 3], size[r, 1], win[r, 1], out_w, _interp(steps))
        t = torch.bmm(x.float().reshape(e - a, 3 * H, W), wx.view(e - a, V * out_w, W).transpose(1, 2))
        t = _round8(t).view(e - a, 3, H, V, out_w).permute(0, 3, 2, 1, 4).reshape((e - a) * V, H, 3 * out_w)
        out.append(_round8(torch.bmm(wy, t)).view((e - a) * V, out_h, 3, out_w).permute(0, 2, 1, 3))
        a = e
    return torch.cat(out).contiguous()


def resample_pil(img, draws, steps):
    """resample's views of one PIL image made by Pillow itself (crop, resize, crop): the fastest
    antialiased resize on a CPU. V x 3 x h x w float on the 0..255 grid."""
    import torch
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    mode = {InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
            InterpolationMode.BICUBIC: Image.Resampling.BICUBIC}[_interp(steps)]
    out_h, out_w = _out_size(steps, draws['size'])
    views = []
    for (top, left, bh, bw), (rh, rw), (wt, wl) in zip(draws['box'].astype(int), draws['size'].astype(int),
                                                       draws['window'].astype(int)):
        v = img.crop((left, top, left + bw, top + bh))
        if v.size != (rw, rh):
            v = v.resize((rw, rh), mode)
        views.append(np.asarray(v.crop((wl, wt, wl + out_w, wt + out_h))))
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float()


def flip_jitter_gray_blur(y, d, steps, device):
    """The flip, colour jitter, grey and blur steps of views y (N x 3 x h x w, 0..255 grid, on `device`),
    each view with its own draws d ({key: N x ... numpy}), batched over the views that take each
    operation, as Pillow computes it."""
    import torch

    def subset(mask):  # the views where mask holds, as a device index (no device sync)
        idx = torch.from_numpy(np.flatnonzero(mask))
        return idx.to(device, non_blocking=True) if len(idx) else None
    factors = torch.from_numpy(d['factors']).to(device, non_blocking=True)
    sigma = torch.from_numpy(d['sigma']).to(device, non_blocking=True)
    for s in steps:
        if s[0] == 'flip' and (i := subset(d['flip'] > 0)) is not None:
            y[i] = y[i].flip(-1)
        elif s[0] == 'jitter':  # ColorJitter's four operations, in each view's own order
            for pos in range(4):
                for op in range(4):
                    i = subset((d['jitter'] > 0) & (d['order'][:, pos] == op) & ~np.isnan(d['factors'][:, op]))
                    if i is not None:
                        y[i] = _jitter(y[i], op, factors[i, op])
        elif s[0] == 'gray' and (i := subset(d['gray'] > 0)) is not None:
            y[i] = _luma(y[i]).expand(-1, 3, -1, -1)
        elif s[0] == 'blur' and (i := subset(d['blur'] > 0)) is not None:
            y[i] = _blur(y[i], sigma[i], s[2])
    return y
