"""The views of an image the backbone encodes (Section 3.3's v1, v2, and the plain view): the recipes
(ours and the authors' released code's), the random draws of each view (torchvision's own samplers on
a stream of its own, kornia's `generate_parameters`), and the operations that apply them, batched on
the extraction device (`apply_transform`), to Pillow's arithmetic.
"""
import math
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
# views made on the extraction device (dataset_extract.py's default, VIEW_PATH='tensor'): each image is
# decoded once, in a DataLoader worker, and all of its views are made from it as batched tensor
# operations on the device (VIEWS_ON='device'), or in the worker (VIEWS_ON='workers', a CPU's choice).
# A view's random choices are torchvision's samplers' draws (RandomResizedCrop.get_params,
# ColorJitter.get_params, ...) reproduced on a torch.Generator of the view's own stream, in its
# pipeline's order: the torchvision PIL pipeline run on that stream makes the same view
# (VIEW_PATH='pil', the reference the tests hold this path to). Each operation computes Pillow's own
# result on the 0..255 grid (Resample.c, Blend.c, Convert.c) in integers, or in floating point whose
# every partial sum is exact: a view is the same bits whatever batch, group, padding, order, device,
# autocast or TF32 setting it is made under. Only the blur departs from torchvision's float32
# convolution (its kernel is rounded to 2^-22ths, then summed exactly): by one level, on a few pixels.
VIEW_PATHS = ('tensor', 'pil')
VIEWS_ON = ('device', 'workers')


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


VIEW_KEYS = ('box', 'size', 'window', 'flip', 'jitter', 'order', 'factors', 'gray', 'blur', 'sigma', 'kernel')
BLUR_BITS = 22  # the blur's 1-d kernels are rounded to multiples of 2^-22: both passes then sum exactly in float64


def _blur_sizes(steps):
    """The blur step's kernel width and height (torchvision's kernel_size), (0, 0) without one."""
    s = next((s for s in steps if s[0] == 'blur'), None)
    return (s[2][0], s[2][1]) if s else (0, 0)


def blur_kernel(size, sigma):
    """torchvision's 1-d Gaussian kernel (_get_gaussian_kernel1d) in float64, summed in order, rounded to
    multiples of 2^-BLUR_BITS (1.2e-7 at most from torchvision's float32 kernel)."""
    half = (size - 1) * 0.5
    pdf = [math.exp(-0.5 * ((t - half) / sigma) ** 2) for t in range(size)]
    return np.round(np.array(pdf) / sum(pdf) * 2.0 ** BLUR_BITS) / 2.0 ** BLUR_BITS


def _rrc_box(g, height, width, scale, ratio):
    """RandomResizedCrop.get_params drawn from generator g: its arithmetic and draws, in its order."""
    import torch
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # fallback to the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(steps, h, w, seed=None):
    """The choices of one view of an h x w image, drawn as torchvision's samplers draw them in its
    pipeline's order, from the stream torch.Generator().manual_seed(seed) (None: the plain view, which
    draws nothing); the global generator is neither read nor reseeded. box (top, left, height, width of
    the region resampled), size (what it is resampled to), window (top, left of the part kept), flip,
    jitter (applied) with order (ColorJitter's fn_idx) and factors (brightness, contrast, saturation,
    hue; NaN: not drawn, not applied), gray, blur (applied) with sigma and kernel (its x then y 1-d
    kernels, blur_kernel)."""
    import torch
    kx, ky = _blur_sizes(steps)
    v = dict(box=[0, 0, h, w], size=[h, w], window=[0, 0], flip=0, jitter=0, order=[0, 1, 2, 3],
             factors=[np.nan] * 4, gray=0, blur=0, sigma=1.0, kernel=np.zeros(kx + ky))
    g = None if seed is None else torch.Generator().manual_seed(seed)
    cur = [h, w]

    def coin(p):  # RandomApply's coin: applied unless p < rand
        return p is None or not p < torch.rand(1, generator=g)
    for s in steps:
        if s[0] == 'resize':
            v['size'] = cur = _resized_size(*cur, s[1], s[2])
        elif s[0] == 'rrc':
            v['box'] = list(_rrc_box(g, *cur, s[3], s[4]))
            v['size'] = cur = [s[1], s[2]]
        elif s[0] == 'crop':
            v['window'] = [int(round((cur[0] - s[1]) / 2.0)), int(round((cur[1] - s[2]) / 2.0))]
            if min(v['window']) < 0:
                raise ValueError(f"a {cur[0]} x {cur[1]} image is smaller than the {s[1]} x {s[2]} crop")
            cur = [s[1], s[2]]
        elif s[0] == 'flip':
            v['flip'] = int(bool(torch.rand(1, generator=g) < s[1]))
        elif s[0] == 'jitter' and coin(s[1]):  # ColorJitter.get_params
            order = torch.randperm(4, generator=g).tolist()
            f = [np.nan if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=g)) for r in s[2:6]]
            v.update(jitter=1, order=order, factors=f)
        elif s[0] == 'gray':
            v['gray'] = int(bool(torch.rand(1, generator=g) < s[1]))
        elif s[0] == 'blur' and coin(s[1]):  # GaussianBlur.get_params
            sigma = torch.empty(1).uniform_(s[3][0], s[3][1], generator=g).item()
            v.update(blur=1, sigma=sigma, kernel=np.concatenate([blur_kernel(kx, sigma), blur_kernel(ky, sigma)]))
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
    made here by the tensor path (path 'tensor', make_here: VIEWS_ON='workers'; Pillow's resize, whose
    result the device's equals, then the same colour steps) or by the PIL pipeline (path 'pil').
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
            return views_here(img, draws, self.steps), None, k, ok
        return torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1), draws, k, ok


def collate_decoded(items):
    """A loader batch: (x, draws, k, ok). Path 'tensor': x = dict(pixels: every image's 3 x H x W uint8
    pixels, one flat tensor, in the order `order` (batch positions sorted by size, so images of one
    size lie together), shapes: (H, W) of each), draws {key: B x V x ...}; views made in the workers or
    by the PIL path: x is B x V x 3 x h x w uint8, draws None."""
    import torch
    xs, draws, ks, oks = zip(*items)
    k, ok = torch.tensor(ks), torch.tensor(oks)
    if draws[0] is None:
        return torch.stack(xs), None, k, ok
    shapes = [tuple(x.shape[1:]) for x in xs]
    order = sorted(range(len(xs)), key=lambda b: shapes[b])
    x = dict(pixels=torch.cat([xs[b].reshape(-1) for b in order]), shapes=shapes, order=order)
    return x, {key: torch.from_numpy(np.stack([d[key] for d in draws])) for key in VIEW_KEYS}, k, ok


# -----------------------------------------------------------------------------
# the crop and resize, as Pillow computes it for 8-bit images (Resample.c): coefficients in double,
# rounded to integers of 2^-22, a horizontal pass summed in integers and rounded to 0..255, then a
# vertical one. Here each pass is one batched product whose operands are split into 8-bit parts
# (pixels 0..255 times parts -255..255, at most EXACT_TAPS taps): every partial sum is an integer below
# 2^24, exact in float32, TF32 or bf16, in any order. So the device makes Pillow's very pixels.
PIL_BITS = 22      # Pillow's PRECISION_BITS for 8 bits a sample
EXACT_TAPS = 258   # 255 * 255 * taps < 2^24: beyond (a downscale past 64x) the products run in float64


def _pil_filter(x, interp):
    """Pillow's bilinear (triangle, support 1) or bicubic (a = -0.5, support 2) filter, in double."""
    import torch
    from torchvision.transforms import InterpolationMode
    x = x.abs()
    if interp == InterpolationMode.BILINEAR:
        return torch.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


def _support(interp):
    from torchvision.transforms import InterpolationMode
    return 1.0 if interp == InterpolationMode.BILINEAR else 2.0


def ksize(length, out_len, interp):
    """Pillow's coefficients per output sample of resizing `length` to `out_len` (numpy, on the host):
    (int)ceil(support * filterscale) * 2 + 1."""
    return (np.ceil(_support(interp) * np.maximum(length / out_len, 1.0)) * 2 + 1).astype(np.int64)


def pil_coeffs(n_in, start, length, out_len, first, n_out, taps, interp):
    """Pillow's 8-bit coefficients (precompute_coeffs, normalize_coeffs_8bpc) of V resizes: the span
    [start, start + length) of a row of n_in samples (PIL crops, then resizes) resized to out_len, its
    samples first .. first + n_out (the centre crop's): (kk, col), (V, n_out, taps) int64, the integer
    coefficients and the columns they weigh (a tap past the span weighs 0). start, length, out_len, first:
    (V,) float64 tensors; taps >= every ksize. Pillow's double arithmetic in its order, its weight sum
    `ww` summed tap by tap, so its integers."""
    import torch
    f64 = dict(dtype=torch.float64, device=start.device)
    scale = (length / out_len)[:, None]
    fs = scale.clamp(min=1.0)
    support = _support(interp) * fs
    center = (first[:, None] + torch.arange(n_out, **f64) + 0.5) * scale
    xmin = torch.trunc(center - support + 0.5).clamp_(min=0)
    count = torch.minimum(torch.trunc(center + support + 0.5), length[:, None]) - xmin
    x = torch.arange(taps, **f64)
    w = _pil_filter((x + xmin[..., None] - center[..., None] + 0.5) * (1.0 / fs)[..., None], interp)
    w = torch.where(x < count[..., None], w, 0.0)
    ww = w[..., 0]
    for t in range(1, taps):
        ww = ww + w[..., t]
    k = torch.where(ww[..., None] != 0, w / ww[..., None], w)
    kk = torch.where(k < 0, -0.5 + k * 2.0 ** PIL_BITS, 0.5 + k * 2.0 ** PIL_BITS).trunc_().long()
    col = (x + xmin[..., None] + start[:, None, None]).clamp_(max=n_in - 1).long()
    return kk, col


def _weight_parts(kk, col, n_in, dtype):
    """The dense (V, n_out, n_in) matrices of the coefficients kk as (shift, matrix) parts, kk = sum of
    part << shift: three signed 8-bit parts in float32, or kk whole in float64."""
    import torch
    shape = (*kk.shape[:2], n_in)
    if dtype == torch.float64:
        yield 0, torch.zeros(shape, dtype=dtype, device=kk.device).scatter_add_(2, col, kk.double())
        return
    sign, mag = kk.sign(), kk.abs()
    for shift in (16, 8, 0):
        part = (sign * ((mag >> shift) & 255)).to(dtype)
        yield shift, torch.zeros(shape, dtype=dtype, device=kk.device).scatter_add_(2, col, part)


def _add_part(acc, part, shift):
    """acc + (part << shift) in int32 (Pillow's own int accumulator; its sums fit): part holds exact integers."""
    import torch
    p = part.to(torch.int32)
    if shift:
        p.mul_(1 << shift)
    return p if acc is None else acc.add_(p)


def _clip8(acc):
    """Pillow's clip8 of an accumulated sum: (sum + 2^21) >> 22 (arithmetic shift), clipped to 0..255."""
    return acc.add_(1 << (PIL_BITS - 1)).bitwise_right_shift_(PIL_BITS).clamp_(0, 255)


def _pass(acc_in, x, kk, col, n_in, left):
    """One resampling pass, Pillow's integer sum of each output sample, as batched products of x and the
    dense parts of kk (left: weights @ x, else x @ weights^T), then clip8: int32 in 0..255."""
    import torch
    acc = None
    for shift, w in _weight_parts(kk, col, n_in, x.dtype):
        w = w.view(acc_in, -1, n_in)
        acc = _add_part(acc, torch.bmm(w, x) if left else torch.bmm(x, w.transpose(1, 2)), shift)
    return _clip8(acc)


def resample_group(x, geo, out_hw, taps, interp, vertical_first=False):
    """Pillow's crop, resize and centre crop of n views of each of G images x (G, 3, H, W, zero-padded,
    float32 or float64 on the device, 0..255): (G n, 3, out_h, out_w) int32 in 0..255, the views of
    image 0 first. geo (G n, 8) float64: box (top, left, height, width), size (h, w), window (top, left).
    taps (vertical, horizontal) >= every view's ksize. Horizontally, rounded to 0..255 as Pillow's
    intermediate image, then vertically; or vertically first (pillow_vertical_first). Each pass is one
    batched product per 8-bit part."""
    G, _, H, W = x.shape
    n, (out_h, out_w) = len(geo) // G, out_hw
    ky, cy = pil_coeffs(H, geo[:, 0], geo[:, 2], geo[:, 4], geo[:, 6], out_h, taps[0], interp)
    kx, cx = pil_coeffs(W, geo[:, 1], geo[:, 3], geo[:, 5], geo[:, 7], out_w, taps[1], interp)
    if vertical_first:  # (G, n out_h, 3 W), then (G n, 3 out_h, out_w)
        t = _pass(G, x.permute(0, 2, 1, 3).reshape(G, H, 3 * W), ky, cy, H, left=True)
        t = t.view(G, n, out_h, 3, W).permute(0, 1, 3, 2, 4).reshape(G * n, 3 * out_h, W).to(x.dtype)
        return _pass(G * n, t, kx, cx, W, left=False).view(G * n, 3, out_h, out_w)
    t = _pass(G, x.view(G, 3 * H, W), kx, cx, W, left=False)  # (G, 3 H, n out_w), then (G n, out_h, 3 out_w)
    t = t.view(G, 3, H, n, out_w).permute(0, 3, 2, 1, 4).reshape(G * n, H, 3 * out_w).to(x.dtype)
    return _pass(G * n, t, ky, cy, H, left=True).view(G * n, out_h, 3, out_w).permute(0, 2, 1, 3)


_PILLOW = {}


def pillow_vertical_first(box_h, box_w, out_h, out_w):
    """Which views the installed Pillow resizes vertically first (numpy, on the host): Pillow 13 does when
    the height shrinks by more than twice what the width does, earlier releases never. The rule is
    probed once on a 40 x 40 image, whose two orders give different pixels."""
    if 'vertical_first' not in _PILLOW:
        from PIL import Image
        im, bicubic = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)), 3
        both = np.asarray(im.resize((39, 10), bicubic))
        _PILLOW['vertical_first'] = bool((both == np.asarray(im.resize((40, 10), bicubic).resize((39, 10), bicubic)))
                                         .all())
    return _PILLOW['vertical_first'] & (out_h < box_h) & (box_h - out_h > 2 * (box_w - out_w))


def resample_pil(img, draws, steps):
    """The views' crop and resize of one PIL image made by Pillow itself (crop, resize, crop): what
    resample_group makes, and the fastest on a CPU. V x 3 x h x w float on the 0..255 grid."""
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


# -----------------------------------------------------------------------------
# the colour steps, as Pillow computes them on uint8 images (its arithmetic is exact on the grid)
def _luma(x):
    """Pillow's convert('L') of (N, 3, H, W) values in 0..255: (19595 R + 38470 G + 7471 B + 2^15) >> 16
    (every partial sum an integer below 2^24: exact in float32)."""
    return ((x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536).floor_()[:, None]


def _blend(d, x, f):
    """Pillow's Image.blend(d, x, f) on uint8 values, in C's float: d + f (x - d), clipped, truncated."""
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
    to_hs, to_rgb = _device_tables(x.device)
    n, _, hh, ww = x.shape
    c = x.int()
    hs = to_hs.index_select(0, ((c[:, 0] * 256 + c[:, 1]) * 256 + c[:, 2]).flatten()).view(n, hh, ww, 2).int()
    h = (hs[..., 0] + torch.trunc(f * 255).int().view(-1, 1, 1)) % 256   # numpy's uint8 wrap-around
    rgb = to_rgb.index_select(0, ((h * 256 + hs[..., 1]) * 256 + c.amax(1)).flatten())
    return rgb.view(n, hh, ww, 3).permute(0, 3, 1, 2).float()


def _jitter(x, op, f):
    """One of ColorJitter's four operations (0 brightness, 1 contrast, 2 saturation, 3 hue) of every
    view of x (N, 3, H, W, values in 0..255) with its own factor f (N, float64), as Pillow computes it."""
    f4 = f.float().view(-1, 1, 1, 1)
    if op == 0:
        return _blend(0.0, x, f4)
    if op == 1:  # ImageEnhance.Contrast: int(mean grey level + 0.5); the sum of integers is exact in double
        mean = _luma(x).double().sum((1, 2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
        return _blend((mean + 0.5).floor().float(), x, f4)
    if op == 2:
        return _blend(_luma(x), x, f4)
    return _hue(x, f)


def _blur(x, k, kernel):
    """torchvision's gaussian_blur (reflect padding, rounded to uint8) of views x (N, 3, H, W, integers),
    each with its own 1-d kernels k (N, kx + ky: x, then y; multiples of 2^-22, blur_kernel), as two 1-d
    passes in float64: every partial sum (a multiple of 2^-22, then 2^-44, below 2^8) is exact, so the
    result is the same in any order; direct convolution (cuDNN off). kernel: (kx, ky)."""
    import torch
    import torch.nn.functional as F
    n, c, h, w = x.shape
    kx, ky = kernel
    out = x.double()
    with torch.backends.cudnn.flags(enabled=False):
        for k1, size, shape in ((k[:, :kx], kx, (1, kx)), (k[:, kx:kx + ky], ky, (ky, 1))):
            weight = k1.repeat_interleave(c, 0).view(n * c, 1, *shape)
            pad = (size // 2, size // 2, 0, 0) if shape[0] == 1 else (0, 0, size // 2, size // 2)
            out = F.conv2d(F.pad(out.reshape(1, n * c, h, w), pad, mode='reflect'), weight, groups=n * c)
    return out.view(n, c, h, w).round_().float()


def _colour_plan(d, steps):
    """The colour steps of n views with draws d ({key: (n, ...) numpy}), on the host: [(kind, op, first,
    count)] in the pipeline's order (ColorJitter's four in each view's own order), and the int64 indices
    of the views each applies to, concatenated."""
    ops, idx, first = [], [], 0

    def add(kind, op, mask):
        nonlocal first
        i = np.flatnonzero(mask)
        if len(i):
            ops.append((kind, op, first, len(i)))
            idx.append(i)
            first += len(i)
    for s in steps:
        if s[0] == 'flip':
            add('flip', 0, d['flip'] > 0)
        elif s[0] == 'jitter':
            for pos in range(4):
                for op in range(4):
                    add('jitter', op, (d['jitter'] > 0) & (d['order'][:, pos] == op) & ~np.isnan(d['factors'][:, op]))
        elif s[0] in ('gray', 'blur'):
            add(s[0], 0, d[s[0]] > 0)
    return ops, (np.concatenate(idx) if idx else np.zeros(0, np.int64))


PARAMS = ('box', 'size', 'window', 'factors', 'kernel')  # a view's float draws on the device, in this order


def colour(y, ops, idx, par, kernel):
    """The flip, jitter, grey and blur steps `ops` (_colour_plan; idx: their view indices on y's device)
    of views y (n, 3, h, w float, 0..255 grid), each view with its own draws par (n, 8 + 4 + kx + ky
    float64: PARAMS), batched over the views that take each operation."""
    for kind, op, a, m in ops:
        i = idx[a:a + m]
        if kind == 'flip':
            y[i] = y[i].flip(-1)
        elif kind == 'jitter':
            y[i] = _jitter(y[i], op, par[i, 8 + op])
        elif kind == 'gray':
            y[i] = _luma(y[i]).expand(-1, 3, -1, -1)
        else:
            y[i] = _blur(y[i], par[i, 12:], kernel)
    return y


def views_here(img, draws, steps):
    """The views of one PIL image made in a loader worker (VIEWS_ON='workers'): Pillow's own resize, the
    same pixels as the device's, then the same colour steps on the CPU. V x 3 x h x w uint8."""
    import torch
    ops, idx = _colour_plan(draws, steps)
    par = torch.from_numpy(np.concatenate([draws[k].reshape(len(draws['flip']), -1) for k in PARAMS], 1))
    y = colour(resample_pil(img, draws, steps), ops, torch.from_numpy(idx), par, _blur_sizes(steps))
    return y.to(torch.uint8)


# -----------------------------------------------------------------------------
# a loader batch's views on the device: planned on the host, made without a synchronisation
RESAMPLE_ELEMS = 1 << 26  # the largest tensor of one resampling group, in elements (x 4 bytes)


def resample_groups(shapes, order, n_views, out_hw, budget=RESAMPLE_ELEMS):
    """The resampling groups of a batch: [(positions, (first view, end view), H, W)], consecutive images of
    `order` zero-padded to H x W, each group's largest tensor (the images, the weights (views x out x
    in), a pass's result) within `budget` elements, padding at most a quarter more pixels; an image
    whose views exceed it alone, in runs of views whose tensors are within it (the image itself may be
    larger). The views are the same in any grouping: the budget bounds memory, nothing else."""
    out_h, out_w = out_hw

    def elems(g, n, H, W):  # per view: the weights and a pass's result, in either pass order
        return max(g * 3 * H * W, g * n * max(out_w * max(W, 3 * H), out_h * max(H, 3 * W)))
    groups, j = [], 0
    while j < len(order):
        H, W = shapes[order[j]]
        if elems(1, n_views, H, W) > budget:
            run = max(1, budget // max(out_w * max(W, 3 * H), out_h * max(H, 3 * W)))
            groups += [([order[j]], (v, min(v + run, n_views)), H, W) for v in range(0, n_views, run)]
            j += 1
            continue
        e, area = j + 1, H * W
        while e < len(order):
            (h, w), Hn, Wn = shapes[order[e]], max(H, shapes[order[e]][0]), max(W, shapes[order[e]][1])
            if elems(e + 1 - j, n_views, Hn, Wn) > budget or (e + 1 - j) * Hn * Wn > 1.25 * (area + h * w):
                break
            H, W, e, area = Hn, Wn, e + 1, area + h * w
        groups.append((order[j:e], (0, n_views), H, W))
        j = e
    return groups


def _pass_plan(rows, order_mask, d, steps, put):
    """One pass order's batch of a group (rows (G, n) of its views, order_mask their pass order): each
    image's views of that order first, padded to the same count m with its other views (made, then
    dropped): sel (G m rows made), keep (the made views kept), dest (their rows), taps, colour ops."""
    m = int(order_mask.sum(1).max())
    first = np.argsort(~order_mask, axis=1, kind='stable')[:, :m]
    sel, real = np.take_along_axis(rows, first, 1).ravel(), np.take_along_axis(order_mask, first, 1).ravel()
    keep = np.flatnonzero(real)
    dest = sel[keep]
    taps = [int(ksize(d['box'][sel, 2 + a], d['size'][sel, a], _interp(steps)).max()) for a in (0, 1)]
    ops, idx = _colour_plan({k: v[dest] for k, v in d.items()}, steps)
    at = put(idx)[0]
    return dict(sel=put(sel), keep=None if real.all() else put(keep), dest=put(dest), taps=taps,
                ops=[(k, o, a + at, c) for k, o, a, c in ops])


def _plan(x, d, n_views, steps, budget):
    """The host's plan of a batch's views (make_pixels): its groups (resample_groups), each with its runs
    of same-size images in the pixels ([first, end, h, w, offset]) and its passes (_pass_plan), one per
    pass order; every index array in one int64 array, each named by its (first, count) in it."""
    import torch
    out_hw = _out_size(steps, d['size'])
    vfirst = pillow_vertical_first(d['box'][:, 2], d['box'][:, 3], d['size'][:, 0], d['size'][:, 1])
    offsets = np.cumsum([0] + [3 * h * w for h, w in (x['shapes'][b] for b in x['order'])])
    at = {b: int(offsets[j]) for j, b in enumerate(x['order'])}
    ints, total = [], [0]

    def put(a):
        ints.append(np.asarray(a, np.int64))
        total[0] += len(a)
        return total[0] - len(a), len(a)
    groups = []
    for pos, (va, ve), H, W in resample_groups(x['shapes'], x['order'], n_views, out_hw, budget):
        runs = []
        for j, b in enumerate(pos):
            if runs and x['shapes'][b] == x['shapes'][pos[runs[-1][0]]]:
                runs[-1][1] = j + 1
            else:
                runs.append([j, j + 1, *x['shapes'][b], at[b]])
        rows = np.asarray(pos)[:, None] * n_views + np.arange(va, ve)
        passes = [dict(_pass_plan(rows, vfirst[rows] == o, d, steps, put), vertical_first=o)
                  for o in (False, True) if (vfirst[rows] == o).any()]
        exact = max(max(p['taps']) for p in passes) <= EXACT_TAPS
        groups.append(dict(runs=runs, size=(len(pos), 3, H, W), passes=passes,
                           dtype=torch.float32 if exact else torch.float64))
    return out_hw, groups, np.concatenate(ints)


def _upload(t, device):
    """A host array on `device` without a synchronisation: from pinned memory, asynchronously."""
    import torch
    t = torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
    if device.type == 'cuda' and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class _fast_exact_products:
    """On a GPU, the resampling's float32 products in TF32 (its tensor cores): their operands and sums are
    integers that TF32 holds exactly, so the same result, faster. The setting is restored after."""

    def __init__(self, device):
        self.cuda = device.type == 'cuda'

    def __enter__(self):
        import torch
        if self.cuda:
            self.old = torch.backends.cuda.matmul.fp32_precision
            torch.backends.cuda.matmul.fp32_precision = 'tf32'

    def __exit__(self, *exc):
        import torch
        if self.cuda:
            torch.backends.cuda.matmul.fp32_precision = self.old


def make_pixels(x, draws, steps, device, budget=RESAMPLE_ELEMS):
    """The views of a loader batch (collate_decoded) on `device`, the backbone's input before normalising:
    B x V views, each image's in view order, (B V) x 3 x h x w uint8. draws None: x holds the views. No
    host-device synchronisation: every shape is known on the host, every upload is asynchronous from
    pinned memory, nothing is read back. Autocast off; the same pixels under any TF32 setting."""
    import torch
    dev = torch.device(device)
    if draws is None:
        return _upload(x, dev).flatten(0, 1)
    B, V = draws['flip'].shape
    d = {k: v.reshape(B * V, *v.shape[2:]).numpy() for k, v in draws.items()}
    out_hw, groups, ints = _plan(x, d, V, steps, budget)
    par = np.concatenate([d[k].reshape(B * V, -1) for k in PARAMS], 1)
    pix, par, ints = _upload(x['pixels'], dev), _upload(par, dev), _upload(ints, dev)
    out = torch.empty((B * V, 3, *out_hw), dtype=torch.uint8, device=dev)
    with torch.autocast(dev.type, enabled=False), _fast_exact_products(dev):
        for g in groups:
            x_g = torch.zeros(g['size'], dtype=g['dtype'], device=dev)
            for j, e, h, w, at in g['runs']:
                x_g[j:e, :, :h, :w] = pix[at:at + (e - j) * 3 * h * w].view(e - j, 3, h, w)
            for p in g['passes']:
                rows = ints[p['sel'][0]:sum(p['sel'])]
                y = resample_group(x_g, par.index_select(0, rows), out_hw, p['taps'], _interp(steps),
                                   p['vertical_first'])
                if p['keep'] is not None:
                    y = y.index_select(0, ints[p['keep'][0]:sum(p['keep'])])
                dest = ints[p['dest'][0]:sum(p['dest'])]
                y = colour(y.float(), p['ops'], ints, par.index_select(0, dest), _blur_sizes(steps))
                out.index_copy_(0, dest, y.to(torch.uint8))
    return out


_CONST = {}


def prepare(steps, device, tables=False):
    """A pipeline's constants on `device`, uploaded once (before a pass, not between its forwards): its
    normalisation's mean and std, and with `tables` Pillow's HSV tables when it jitters."""
    import torch
    dev = torch.device(device)
    norm = next(s for s in steps if s[0] == 'normalize')
    key = (norm[1], norm[2], str(dev))
    if key not in _CONST:
        _CONST[key] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(dev) for v in norm[1:])
    if tables and any(s[0] == 'jitter' for s in steps):
        _device_tables(dev)
    return _CONST[key]


def _device_tables(device):
    if device not in _HSV:
        _HSV[device] = tuple(t.to(device) for t in hsv_tables())
    return _HSV[device]


def normalize(pixels, steps):
    """Views (N, 3, h, w uint8) as the backbone's input: float32, /255, minus the mean, over the std."""
    mean, std = prepare(steps, pixels.device)
    return (pixels.float().div_(255) - mean) / std


def make_views(x, draws, steps, device):
    """The backbone's input of a loader batch: make_pixels, normalised. (B V) x 3 x h x w float32."""
    return normalize(make_pixels(x, draws, steps, device), steps)
