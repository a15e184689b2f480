"""Datasets and splits (Section 4.1.1): every dataset becomes a list of images with a 0/1 label
matrix (CIFAR-10, NUS-WIDE, Flickr25k, MS-COCO, your own folder), read from image folders, list
files or the authors' split files; the query / retrieval / train split is drawn with a seed or read.
"""
import glob
import hashlib
import os
import re

import numpy as np

from cache import name_bytes, read_json, read_sidecar, sha256_file, shown, source_path, split_paths

# -----------------------------------------------------------------------------
# splits (Section 4.1.1): per dataset, how query / train sets are drawn and MAP's K
DATASETS = {
    #              query             train              K for MAP@K   labels
    'cifar10':   dict(query_per_class=1000, train_per_class=500, topk=1000, multilabel=False),
    'nuswide':   dict(query_per_class=100, train_per_class=500, topk=5000, multilabel=True),
    'flickr25k': dict(query=2000, train=5000, topk=5000, multilabel=True),
    'mscoco':    dict(query=5000, train=10000, topk=5000, multilabel=True),
    # your own images: DATA_PATH/<class>/<image>; sizes are per-class settings
    'folder':    dict(query_per_class=10, train_per_class=20, topk=1000, multilabel=False),
    # 400 generated images of 10 classes, made in memory (demo_images): the offline quick start
    'demo':      dict(query_per_class=10, train_per_class=20, topk=1000, multilabel=False),
}
NUSWIDE_CONCEPTS = 21  # NUS-WIDE keeps its 21 most frequent of 81 concepts
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


# -----------------------------------------------------------------------------
# image sources: every dataset becomes a list of images (a path or an in-memory array) with
# a 0/1 label matrix; single-label sets are one-hot. Bad input names the file and line.
class DataError(ValueError):
    pass


class Images:
    """The images of a dataset in a fixed order: `len`, `labels` (N x C int8), `names`,
    and `load(i)` -> RGB PIL image. `root` + `names[i]` is the file, or `arrays[i]` the pixels."""

    def __init__(self, names, labels, root=None, arrays=None, classes=None):
        self.names, self.labels, self.root, self.arrays = list(names), np.asarray(labels, np.int8), root, arrays
        self.classes = classes or [str(c) for c in range(self.labels.shape[1])]

    def __len__(self):
        return len(self.names)

    def load(self, i):
        from PIL import Image
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        with Image.open(os.path.join(self.root, self.names[i])) as im:
            return to_rgb(im)

    def fingerprint(self):
        """sha256 of what the features are made from: every image's name, size and modification
        time (files), or the pixels (arrays), and the labels. Another picture under the same name,
        an edited label or another image order gives another fingerprint."""
        h = hashlib.sha256()
        if isinstance(self.arrays, np.ndarray):
            h.update(np.ascontiguousarray(self.arrays).data)
        elif self.arrays is not None:  # an HDF5 file: its size and time
            st = os.stat(self.arrays.path)
            h.update(f'{self.arrays.path}\t{st.st_size}\t{st.st_mtime_ns}\n'.encode())
        for n in self.names:
            if self.root is not None:
                st = os.stat(os.path.join(self.root, n))
                h.update(name_bytes(f'{n}\t{st.st_size}\t{st.st_mtime_ns}\n'))
            else:
                h.update(name_bytes(f'{n}\n'))
        h.update(np.ascontiguousarray(self.labels).data)
        return h.hexdigest()[:16]


def to_rgb(im):
    """An 8-bit RGB copy of a PIL image. High-bit-depth modes are scaled to 0..255, not clipped
    (PIL's convert('RGB') clips a 16-bit grey value above 255 to white): 16-bit ('I;16*', or 'I'
    holding values above 255) divides by 257, float ('F') in 0..1 multiplies by 255."""
    from PIL import Image
    if im.mode.startswith('I;16') or im.mode in ('I', 'F'):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == 'F' and a.max(initial=0) <= 1.0:
            a = a * 255
        elif im.mode != 'F' and (im.mode.startswith('I;16') or a.max(initial=0) > 255):
            a = a / 257
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
    return im.convert('RGB')  # convert() reads the whole file, so truncation shows here


_LIST_LINE = re.compile(r'^\s*(.*?\S)((?:\s+[01](?=\s|$))+)\s*$')   # path, then 0/1 labels
_LIST_PATH = re.compile(r'^\s*(.*?\.(?:' + '|'.join(e[1:] for e in IMAGE_EXTS) + r'))(?=\s|$)(.*)$',
                                      re.IGNORECASE)              # the path ends at an image extension


def read_lines(path):
    """The lines of a text file in UTF-8 (a byte-order mark left out); another encoding is an error
    naming the file, the line and the fix."""
    if not os.path.isfile(path):
        raise DataError(f"list file {path} does not exist")
    with open(path, 'rb') as f:
        raw = f.read()
    raw = raw[3:] if raw.startswith(b'\xef\xbb\xbf') else raw  # a byte-order mark is not part of the first line
    try:
        return raw.decode('utf-8').splitlines()
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b'\n') + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#x}); convert the file, e.g. "
                        f"iconv -f latin1 -t utf-8 {path} > fixed.txt") from None


def read_list_file(path, root, n_labels=None, check=True):
    """`relative/path.jpg 0 1 0 ...` per line -> (names, labels). The path is everything before the
    trailing 0/1 labels, so it may hold spaces. Checks every line (UTF-8, the label count) and that
    the images exist (lists the first missing ones and their count)."""
    names, labels = [], []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        m = _LIST_PATH.match(line) or _LIST_LINE.match(line)
        if not m or not m.group(2).split():
            raise DataError(f"{path}:{lineno}: expected 'path 0 1 0 ...' (one-hot labels after the image path), "
                            f"got {line.strip()[:120]!r}")
        name, vec = m.group(1), m.group(2).split()
        if any(v not in ('0', '1') for v in vec):
            raise DataError(f"{path}:{lineno}: labels must be 0/1 integers after the image path, got "
                            f"{line.strip()[:120]!r}")
        if n_labels and len(vec) > n_labels:  # a file name that itself ends in ' 0' or ' 1'
            name, vec = name + ' ' + ' '.join(vec[:len(vec) - n_labels]), vec[len(vec) - n_labels:]
        n_labels = n_labels or len(vec)
        if len(vec) != n_labels:
            raise DataError(f"{path}:{lineno}: {len(vec)} labels, but earlier lines have {n_labels}")
        names.append(name)
        labels.append([int(v) for v in vec])
    if not names:
        raise DataError(f"list file {path} holds no images")
    if check:
        check_exist(names, root, path)
    return names, np.array(labels, np.int8)


def check_exist(names, root, source):
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise DataError(f"{len(missing)} of {len(names)} images named in {source} do not exist under {root}, "
                        f"e.g. {', '.join(missing[:5])}")


def _cifar10(path, download):
    import torchvision
    try:
        parts = [torchvision.datasets.CIFAR10(path, train=t, download=download) for t in (True, False)]
    except Exception as e:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, ...
        raise DataError(f"cannot load CIFAR-10 from {path} ({type(e).__name__}: {e}). With no network, download "
                        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on another machine, unpack it "
                        f"so that {path}/cifar-10-batches-py exists, and pass --data_path={path}") from e
    arrays = np.concatenate([p.data for p in parts])          # the 60,000 images, train then test
    y = np.concatenate([np.array(p.targets) for p in parts])
    return Images([f'cifar10/{i}' for i in range(len(y))], np.eye(10, dtype=np.int8)[y],
                  arrays=arrays, classes=list(parts[0].classes))


def _folder(path, cache_dir=''):
    """DATA_PATH/<class>/<image>. Hidden folders and files (.ipynb_checkpoints, ._x.png) are not classes
    or images, nor is the cache when it lies inside the image folder."""
    if not os.path.isdir(path):
        raise DataError(f"image folder {path} does not exist (expected {path}/<class>/<image>)")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))
    if cache_dir and os.path.isdir(cache_dir):
        inside = [d for d in classes if os.path.samefile(os.path.join(path, d), cache_dir)]
        if inside:
            print(f"note: {os.path.join(path, inside[0])} is the cache (--cache_dir), not a class: left out")
            classes.remove(inside[0])
    names, y = [], []
    for c, cls in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(path, cls))
                       if f.lower().endswith(IMAGE_EXTS) and not f.startswith('.'))
        if not files:
            raise DataError(f"the class folder {os.path.join(path, cls)} holds no images ({', '.join(IMAGE_EXTS)}): "
                            f"add images to it or move it out of {path}")
        names += [f'{cls}/{f}' for f in files]
        y += [c] * len(files)
    if not names:
        raise DataError(f"no images found in {path}/<class>/ (extensions {', '.join(IMAGE_EXTS)})")
    return Images(names, np.eye(len(classes), dtype=np.int8)[y], root=path, classes=classes)


def demo_images(n_classes=10, per_class=40, size=32, seed=0):
    """(pixels uint8 [N, size, size, 3], class of each): each class a base colour and a stripe
    direction, with noise and a random phase, so that a random-weight encoder tells the classes
    apart too (the 'demo' dataset; the tests write them as an image folder)."""
    rng = np.random.default_rng(seed)
    hues = rng.uniform(0, 255, (n_classes, 3))
    yy, xx = np.mgrid[:size, :size]
    out = []
    for c in range(n_classes):
        angle = np.pi * c / n_classes
        for _ in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.6 + phase)[..., None]
            img = hues[c] * (0.6 + 0.3 * stripes) + rng.normal(0, 20, (size, size, 3))
            out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out), np.repeat(np.arange(n_classes), per_class)


def _demo():
    """The 'demo' dataset: demo_images, named class<c>/<i>.png as the tests' image folder names them."""
    pixels, y = demo_images()
    per_class = np.bincount(y)
    names = [f'class{c:02d}/{i:03d}.png' for c in range(len(per_class)) for i in range(per_class[c])]
    return Images(names, np.eye(len(per_class), dtype=np.int8)[y], arrays=pixels,
                  classes=[f'class{c:02d}' for c in range(len(per_class))])


def _mirflickr(path):
    """MIRFlickr-25k: images mirflickr/im<N>.jpg, annotations/<label>.txt listing image numbers
    (the 24 potential labels; the *_r1 'relevant' files are not used)."""
    ann = os.path.join(path, 'annotations')
    img_dir = os.path.join(path, 'mirflickr')
    files = sorted(f for f in glob.glob(os.path.join(ann, '*.txt'))
                   if not f.endswith('_r1.txt') and 'README' not in os.path.basename(f).upper())
    if not files or not os.path.isdir(img_dir):
        raise DataError(f"Flickr25k: expected {path}/list.txt, or the MIRFlickr layout {img_dir}/im<N>.jpg with "
                        f"annotation files {ann}/<label>.txt")
    labels = np.zeros((25000, len(files)), np.int8)
    for c, f in enumerate(files):
        for lineno, line in enumerate(read_lines(f), 1):
            if line.strip():
                try:
                    labels[int(line) - 1, c] = 1
                except (ValueError, IndexError):
                    raise DataError(f"{f}:{lineno}: expected an image number 1..25000, got {line.strip()!r}") from None
    names = [f'mirflickr/im{i + 1}.jpg' for i in range(25000)]
    check_exist(names, path, img_dir)
    return Images(names, labels, root=path, classes=[os.path.basename(f)[:-4] for f in files])


class _H5Images:
    """Images stored as IAll[i] (3 x W x H uint8) in an HDF5 file (the 20,015-image MIRFlickr .mat/.h5
    that the authors' code reads), opened lazily in each process, so DataLoader workers can share it."""

    def __init__(self, path):
        self.path, self._file, self._pid = path, None, None

    def __getitem__(self, i):
        import h5py
        if self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, 'r'), os.getpid()
        return np.ascontiguousarray(np.transpose(self._file['IAll'][i], (2, 1, 0)))  # -> H x W x 3, as the authors

    def __getstate__(self):
        return dict(path=self.path, _file=None, _pid=None)


def _flickr_mat(path):
    """The authors' Flickr25k: a file with IAll (images, HDF5: .h5 or a v7.3 .mat) and a .mat with LAll
    (20,015 x 24 labels), found in `path` by those names (e.g. mirflickr25k-iall.mat, mirflickr25k-lall.mat)."""
    files = sorted(os.listdir(path)) if os.path.isdir(path) else []
    iall = [f for f in files if 'iall' in f.lower() and f.lower().endswith(('.mat', '.h5', '.hdf5'))]
    lall = [f for f in files if 'lall' in f.lower() and f.lower().endswith(('.mat', '.h5', '.hdf5'))]
    if not iall or not lall:
        return None
    try:
        import h5py
    except ImportError:
        raise DataError(f"reading {path}/{iall[0]} (HDF5) needs h5py: pip install h5py") from None
    ipath, lpath = os.path.join(path, iall[0]), os.path.join(path, lall[0])
    try:
        import scipy.io
        labels = scipy.io.loadmat(lpath)['LAll']
    except (NotImplementedError, ValueError):  # a v7.3 .mat is HDF5, stored transposed
        with h5py.File(lpath, 'r') as f:
            labels = np.asarray(f['LAll']).T
    except KeyError:
        raise DataError(f"{lpath} has no LAll variable (the Flickr25k labels)") from None
    try:
        with h5py.File(ipath, 'r') as f:
            n = f['IAll'].shape[0]
    except (OSError, KeyError) as e:
        raise DataError(f"{ipath} is not an HDF5 file with an IAll dataset (the Flickr25k images): {e}") from None
    if n != len(labels):
        raise DataError(f"{ipath} holds {n} images but {lpath} {len(labels)} label rows")
    return Images([f'flickr25k/{i}' for i in range(n)], labels, arrays=_H5Images(ipath))


# the split files of the authors' repository (its data/<set>/ files) and of DeepHash-pytorch, in a --split_dir
SPLIT_FORMATS = {
    'lists': ('query.txt', 'retrieval.txt', 'train.txt'),             # ours: 'path 0 1 ...', names in the dataset
    'cifar_index': ('train_index.txt',),                              # CIFAR-10: train indices into the 50,000
    'index': ('query_index.txt', 'retrieval_index.txt', 'train_index.txt'),  # Flickr25k: indices into IAll
    'dsdh': ('test_img.txt', 'database_img.txt', 'train_img.txt'),     # NUS-WIDE, with *_label_onehot.txt
    'deephash': ('test.txt', 'database.txt', 'train.txt'),            # MS-COCO, DeepHash-pytorch: 'path 0 1 ...'
}


def split_fingerprints(split_dir):
    """{file: sha256} of the split files a --split_dir holds (its format's, and NUS-WIDE's label files)."""
    fmt = split_format(split_dir)
    files = list(SPLIT_FORMATS[fmt]) + ([f.replace('_img.txt', '_label_onehot.txt') for f in SPLIT_FORMATS[fmt]]
                                        if fmt == 'dsdh' else [])
    return {f: sha256_file(os.path.join(split_dir, f)) for f in files}


def split_format(split_dir):
    """Which SPLIT_FORMATS a --split_dir holds (the first whose files are all there)."""
    for name in ('lists', 'index', 'dsdh', 'deephash', 'cifar_index'):
        if all(os.path.isfile(os.path.join(split_dir, f)) for f in SPLIT_FORMATS[name]):
            return name
    raise DataError(f"--split_dir={split_dir} holds none of the split formats: "
                    + '; '.join(', '.join(v) for v in SPLIT_FORMATS.values()))


def _resolve(names, root, source):
    """Image paths relative to `root`: as listed, or else found by file name anywhere under root (the
    authors' code maps NUS-WIDE's images/x.jpg to Flickr/*/x.jpg and prefixes MS-COCO's with MSCOCO/)."""
    missing = [i for i, n in enumerate(names) if not os.path.isfile(os.path.join(root, n))]
    if not missing:
        return names
    where = {}
    for d, _, files in os.walk(root):
        for f in files:
            where.setdefault(f, os.path.relpath(os.path.join(d, f), root))
    names = list(names)
    for i in missing:
        names[i] = where.get(os.path.basename(names[i]), names[i])
    check_exist(names, root, source)
    return names


def _listed_images(dataset, data_path, split_dir, fmt):
    """Images defined by split lists (dsdh, deephash): every listed image once, retrieval's first."""
    parts = []
    for f in SPLIT_FORMATS[fmt][::-1]:  # retrieval (database), query (test), then train
        path = os.path.join(split_dir, f)
        if fmt == 'dsdh':
            label_file = os.path.join(split_dir, f.replace('_img.txt', '_label_onehot.txt'))
            names = [l.strip() for l in read_lines(path) if l.strip()]
            try:
                labels = np.loadtxt(label_file, dtype=np.int64, ndmin=2)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read the labels {label_file}: {e}") from None
            if len(labels) != len(names):
                raise DataError(f"{path} lists {len(names)} images but {label_file} has {len(labels)} label rows")
        else:
            names, labels = read_list_file(path, data_path, check=False)
        parts.append((names, labels, path))
    seen, out_names, out_labels = {}, [], []
    for names, labels, path in parts:
        for n, l in zip(names, labels):
            if n not in seen:
                seen[n] = len(out_names)
                out_names.append(n)
                out_labels.append(l)
    resolved = _resolve(out_names, data_path, ', '.join(p for _, _, p in parts))
    images = Images(resolved, np.array(out_labels, np.int8), root=data_path)
    images.listed = out_names  # the names as the split files write them
    return images


def load_images(dataset, data_path, download=True, split_dir='', cache_dir=''):
    """The Images of `dataset` (a name of DATASETS) found at `data_path`; split files that list
    the images themselves (NUS-WIDE's *_img.txt, MS-COCO's train/test/database.txt) define them.
    `cache_dir`, when it lies inside a folder dataset, is not one of its classes."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split_dir and split_format(split_dir) in ('dsdh', 'deephash'):
        return _listed_images(dataset, data_path, split_dir, split_format(split_dir))
    if dataset == 'cifar10':
        return _cifar10(data_path, download)
    if dataset == 'folder':
        return _folder(data_path, cache_dir)
    if dataset == 'demo':
        return _demo()
    list_file = os.path.join(data_path, 'list.txt')
    if dataset == 'flickr25k' and not os.path.isfile(list_file):
        images = _flickr_mat(data_path) if os.path.isdir(data_path) else None
        if images is not None:
            return images
        images = _mirflickr(data_path)
    else:
        if not os.path.isfile(list_file):
            raise DataError(f"{dataset}: expected the list file {list_file} ('relative/path.jpg 0 1 0 ...' per "
                            f"image, paths relative to {data_path}), or your own split lists via --split_dir")
        images = Images(*read_list_file(list_file, data_path), root=data_path)
    if dataset == 'nuswide' and images.labels.shape[1] > NUSWIDE_CONCEPTS:  # keep the 21 most frequent concepts
        top = np.sort(np.argsort(-images.labels.sum(0), kind='stable')[:NUSWIDE_CONCEPTS])
        images.labels, images.classes = images.labels[:, top], [images.classes[c] for c in top]
    keep = np.flatnonzero(images.labels.any(1))  # unlabelled images are removed (Section 4.1.1)
    if len(keep) < len(images):
        images = Images([images.names[i] for i in keep], images.labels[keep], images.root,
                        None if images.arrays is None else images.arrays[keep], images.classes)
    return images


# -----------------------------------------------------------------------------
# splits (Section 4.1.1): query, retrieval = the rest, train drawn from retrieval
def _per_class(labels, n, rng, pool, part):
    """For each class in order, draw n images of that class from `pool`, none drawn twice (`part`: the
    set drawn, 'query' or 'train', for the error)."""
    avail = np.zeros(len(labels), bool)
    avail[np.asarray(pool)] = True
    out = []
    for c in range(labels.shape[1]):
        cand = np.flatnonzero(avail & (labels[:, c] > 0))
        if len(cand) < n:
            left = 'images' if part == 'query' else 'images outside the query set'
            raise DataError(f"the split needs {n} {part} images of each class, but class {c} has {len(cand)} {left}: "
                            f"give dataset_extract.py a smaller --{part} (per class), or your own split with "
                            f"--split_dir")
        pick = rng.choice(cand, n, replace=False)
        avail[pick] = False
        out.append(pick)
    return np.sort(np.concatenate(out)).astype(np.int64)


def split_rule(dataset, query=None, train=None):
    """The DATASETS rule with the query/train sizes overridden where given (per class for
    per-class sets, in total otherwise)."""
    rule = dict(DATASETS[dataset])
    qk, tk = ('query_per_class', 'train_per_class') if 'query_per_class' in rule else ('query', 'train')
    if query is not None:
        rule[qk] = query
    if train is not None:
        rule[tk] = train
    return rule


def make_split(labels, rule, seed):
    """(query, retrieval, train) index arrays drawn by `rule` (a DATASETS entry) with `seed`."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if 'query_per_class' in rule:
        query = _per_class(labels, rule['query_per_class'], rng, np.arange(n), 'query')
        retrieval = np.setdiff1d(np.arange(n), query)
        train = _per_class(labels, rule['train_per_class'], rng, retrieval, 'train')
    else:
        if rule['query'] + rule['train'] > n:
            raise DataError(f"{n} images cannot give {rule['query']} query and {rule['train']} train images: give "
                            f"dataset_extract.py a smaller --query or --train, or your own split with --split_dir")
        query = np.sort(rng.permutation(n)[:rule['query']])
        retrieval = np.setdiff1d(np.arange(n), query)
        train = np.sort(rng.choice(retrieval, rule['train'], replace=False))
    return query, retrieval, train


def _read_indices(path, n):
    try:
        idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise DataError(f"{path}: expected one integer index per line ({e})") from None
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise DataError(f"{path}: {len(bad)} indices outside 0..{n - 1}, e.g. {bad[:5].tolist()}")
    return idx


def read_split_dir(split_dir, images):
    """(query, retrieval, train) index arrays into `images` from the split files in `split_dir`, in
    any of SPLIT_FORMATS: our query.txt / retrieval.txt / train.txt lists of the dataset's names; the
    authors' CIFAR-10 train_index.txt (query: the official test batch, retrieval: the five training
    batches, train: those indices into them); Flickr25k's *_index.txt into IAll; NUS-WIDE's *_img.txt
    and MS-COCO's (or DeepHash-pytorch's) test/database/train.txt, whose images load_images read.
    Then check_split reports overlaps."""
    fmt = split_format(split_dir)
    files = [os.path.join(split_dir, f) for f in SPLIT_FORMATS[fmt]]
    if fmt == 'cifar_index':
        if len(images) != 60000:
            raise DataError(f"{files[0]} indexes CIFAR-10's 50,000 training images; this dataset has {len(images)}")
        out = (np.arange(50000, 60000), np.arange(50000), np.sort(_read_indices(files[0], 50000)))
        files = ['the test batch', 'the training batches', files[0]]
    elif fmt == 'index':
        out = tuple(_read_indices(f, len(images)) for f in files)
    else:
        pos = {n: i for i, n in enumerate(getattr(images, 'listed', images.names))}
        out = []
        for path in files:
            if fmt == 'dsdh':
                names = [l.strip() for l in read_lines(path) if l.strip()]
            else:
                names, labels = read_list_file(path, '', images.labels.shape[1], check=False)
            unknown = [n for n in names if n not in pos]
            if unknown:
                raise DataError(f"{len(unknown)} images of {path} are not in the dataset, e.g. "
                                f"{', '.join(map(shown, unknown[:5]))}")
            out.append(np.array([pos[n] for n in names], np.int64))
            if fmt == 'lists':
                check_labels(path, names, labels, images.labels[out[-1]])
    check_split(*out, *files)
    return tuple(out)


def check_labels(path, names, given, own):
    """The labels a split list file gives its images must be the dataset's own (its class folders or
    list file): a disagreement is an error naming the file and line, the image and both labels."""
    bad = np.flatnonzero((np.asarray(given) != np.asarray(own)).any(1))
    if len(bad):
        i = bad[0]
        line = [k for k, l in enumerate(read_lines(path), 1) if l.strip()][i]
        raise DataError(f"{path}:{line}: the labels of {shown(names[i])} ({' '.join(map(str, given[i]))}) disagree "
                        f"with the dataset's own ({' '.join(map(str, own[i]))}, from its class folders or list file)"
                        + (f", as do {len(bad) - 1} more lines" if len(bad) > 1 else '')
                        + f": correct them in {path} (training and MAP use the dataset's labels)")


def one_label_warning(labels, classes=None):
    """'' or the warning for labels that every image shares (a folder dataset of one class): every
    retrieval item is then relevant to every query and MAP is 1.0, whatever the codes."""
    shared = np.flatnonzero(np.asarray(labels).all(0)) if len(labels) else []
    if not len(shared):
        return ''
    name = classes[shared[0]] if classes is not None and len(classes) > shared[0] else str(shared[0])
    return (f"warning: every image has the label {name!r} (one class): every retrieval item is relevant to every "
            f"query, so MAP is 1.0 whatever the codes; give the dataset two or more classes to measure retrieval")


def check_split(query, retrieval, train, q_name='query', r_name='retrieval', t_name='train'):
    """A query image in retrieval or train, or an image twice in one part, is an error; train
    images outside retrieval are reported (the paper draws train from retrieval)."""
    for idx, name in ((query, q_name), (retrieval, r_name), (train, t_name)):
        if len(np.unique(idx)) < len(idx):
            raise DataError(f"{name} lists {len(idx) - len(np.unique(idx))} images more than once")
    for other, name in ((retrieval, r_name), (train, t_name)):
        both = np.intersect1d(query, other)
        if len(both):
            raise DataError(f"{len(both)} query images of {q_name} are also in {name} (e.g. indices "
                            f"{both[:5].tolist()}): a query must be unseen by training and not retrieve itself")
    outside = np.setdiff1d(train, retrieval)
    if len(outside):
        print(f"note: {len(outside)} of {len(train)} train images of {t_name} are not in {r_name} (the paper draws "
              f"train from retrieval)")


def extracted_images(cache_dir, dataset, data_path=''):
    """The images dataset_extract.py read into `cache_dir` (eval_hash.py's and search.py's pictures):
    from `data_path`, or from where it recorded it read them, checked against the fingerprint it
    recorded. Other images (another dataset, a changed folder) are a DataError naming both."""
    src = read_json(source_path(cache_dir, dataset)) if os.path.exists(source_path(cache_dir, dataset)) else {}
    path = data_path or src.get('data_path') or os.path.join('data', dataset)
    images = load_images(dataset, path, download=False, split_dir=src.get('split_dir', ''), cache_dir=cache_dir)
    want = read_sidecar(split_paths(cache_dir, dataset, '')['labels'])['settings'].get('images_sha')
    if want and images.fingerprint() != want:
        raise DataError(f"the images under {path} are not the ones dataset_extract.py read into {cache_dir}/{dataset} "
                        f"(from {src.get('data_path', 'a folder it did not record')}): "
                        + ("give --data_path the folder it read" if data_path else
                           "they changed since; rerun dataset_extract.py, or give --data_path the folder it read"))
    return images
