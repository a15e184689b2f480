"""Shared test fixtures: a small generated image set with known classes."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_image_folder(root, n_classes=10, per_class=40, size=32, seed=0):
    """DATA_PATH/<class>/<i>.png: each class a base colour and a stripe direction, with noise
    and a random shift, so classes are told apart by a random-weight encoder too."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    hues = rng.uniform(0, 255, (n_classes, 3))
    yy, xx = np.mgrid[:size, :size]
    for c in range(n_classes):
        os.makedirs(os.path.join(root, f'class{c:02d}'), exist_ok=True)
        angle = np.pi * c / n_classes
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.6 + phase)[..., None]
            img = hues[c] * (0.6 + 0.3 * stripes) + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, f'class{c:02d}', f'{i:03d}.png'))
    return root


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster than two fighting for a busy 2-core machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('images')))


def run_script(script, *args, check=True, env=None):
    """Run one of the pipeline scripts through its command line; returns CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


VIEW_KEEP = 0.8  # correlation of a view's nuisance with the item's: augmentations remove only part of it
CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def write_feature_set(cache, n_classes=8, per_class=60, dim=64, nuisance=1.0, seed=0, views=0):
    """A feature cache as dataset_extract.py leaves it (labels, split, images.npy of the 'folder'
    dataset with backbone tiny-test/random, classes.txt) whose classes live in 16 of `dim`
    dimensions and a nuisance of the given strength fills the rest: raw similarity only half knows
    the class. views: that many augmented views of each training item (train_aug_split_s0.npy,
    fp16), as an augmentation does: the class part kept, the nuisance partly drawn anew (VIEW_KEEP),
    fresh noise."""
    import dataset
    import models
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    x = np.zeros((len(y), dim), np.float32)
    x[:, :16] = rng.normal(0, 1, (n_classes, 16))[y]
    x[:, 16:] = nuisance * rng.normal(0, 1, (len(y), dim - 16)) * np.linspace(1.5, 0.5, dim - 16)
    x += rng.normal(0, 0.3, x.shape)
    labels = np.eye(n_classes, dtype=np.int8)[y]
    d = os.path.join(cache, 'folder')
    dataset.save_array(os.path.join(d, 'labels.npy'), labels, {}, 'test')
    split = dataset.make_split(labels, dict(query_per_class=10, train_per_class=30), 0)
    for name, idx in zip(('query', 'retrieval', 'train'), split):
        dataset.save_array(os.path.join(d, 'split_s0', name + '.npy'), idx, {}, 'test')
    build = models.backbone_build('tiny-test', 'random')  # as dataset_extract.py records it
    dataset.save_array(os.path.join(d, 'tiny-test-random', 'images.npy'), x, dict(build=build), 'test')
    dataset.save_text(os.path.join(d, 'classes.txt'), CLASS_NAMES[:n_classes])
    if views:
        train = split[2]
        v = np.repeat(x[train][:, None], views, 1)  # the item's nuisance, a part of it drawn anew per view
        fresh = nuisance * rng.normal(0, 1, v[:, :, 16:].shape) * np.linspace(1.5, 0.5, dim - 16)
        v[:, :, 16:] = VIEW_KEEP * v[:, :, 16:] + np.sqrt(1 - VIEW_KEEP ** 2) * fresh
        v += rng.normal(0, 0.3, v.shape)
        dataset.save_array(os.path.join(d, 'tiny-test-random', 'train_aug_split_s0.npy'), v.astype(np.float16), {}, 'test')
    return labels, split
