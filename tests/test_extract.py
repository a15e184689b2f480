"""dataset_extract.py through its command line: the files it writes, resuming after SIGKILL,
two-process (gloo) extraction, bf16 autocast, the views made on the device's code path on the CPU
(the same features as the workers', nothing read back between forwards), and its errors."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_script

BASE = ['--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', '--num_workers=0', '--aug_views=2']


def extract(cache, *args, **kw):
    return run_script('dataset_extract.py', *BASE, f'--cache_dir={cache}', *args, **kw)


def load(cache, name='images.npy'):
    return np.load(os.path.join(cache, 'folder', 'tiny-test-random', name))


@pytest.fixture(scope='module')
def reference(image_folder, tmp_path_factory):
    """One uninterrupted single-process run (one thread, as each torchrun process has)."""
    cache = str(tmp_path_factory.mktemp('ref'))
    proc = extract(cache, f'--data_path={image_folder}', '--batch_size=16', '--chunk_batches=1',
                   env=dict(OMP_NUM_THREADS='1'))
    return cache, proc


def test_writes_features_split_and_labels(reference):
    cache, proc = reference
    d = os.path.join(cache, 'folder')
    for f in ('labels.npy', 'names.txt', 'classes.txt', 'split_s0/query.npy', 'split_s0/retrieval.npy',
              'split_s0/train.npy', 'tiny-test-random/images.npy', 'tiny-test-random/train_aug_split_s0.npy'):
        assert os.path.isfile(os.path.join(d, f)), f
        assert not f.endswith('.npy') or os.path.isfile(os.path.join(d, f + '.json')), f
    assert load(cache).shape == (400, 32) and load(cache, 'train_aug_split_s0.npy').shape == (200, 2, 32)
    assert not os.path.exists(os.path.join(d, 'tiny-test-random', '.chunks', 'images'))  # merged and cleaned
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith('extract dataset=folder backbone=tiny-test images=400 query=100 retrieval=300 train=200')
    aug = load(cache, 'train_aug_split_s0.npy')
    assert np.abs(aug[:, 0] - aug[:, 1]).max() > 1e-3  # two different views
    import json
    from models import hardware  # the run documents itself: settings, time, where it ran
    cfg = json.load(open(os.path.join(d, 'extract_tiny-test-random_config.json')))
    assert cfg['DATASET'] == 'folder' and cfg['BATCH_SIZE'] == 16 and cfg['world'] == 1
    assert cfg['seconds'] > 0 and cfg['hardware'] == hardware('cpu')


def test_resume_after_sigkill_is_bit_identical(reference, image_folder, tmp_path):
    ref_cache, _ = reference
    cache = str(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, 'dataset_extract.py'), *BASE, f'--cache_dir={cache}',
           f'--data_path={image_folder}', '--batch_size=16', '--chunk_batches=1']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = os.path.join(cache, 'folder', 'tiny-test-random', '.chunks', 'images')
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(os.path.join(chunks, '*.npy.json'))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # frozen: what it saved can be counted before it is killed
    done = len(glob.glob(os.path.join(chunks, '*.npy.json')))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= done < 25, 'the run was not killed part-way'
    assert not os.path.exists(os.path.join(cache, 'folder', 'tiny-test-random', 'images.npy.json'))
    again = run_script('dataset_extract.py', *cmd[2:], env=dict(OMP_NUM_THREADS='1'))
    assert f'{(25 - done) * 16}/{(25 - done) * 16}' in again.stderr  # only the missing chunks' views were encoded
    for name in ('images.npy', 'train_aug_split_s0.npy'):
        assert np.array_equal(load(cache, name), load(ref_cache, name)), name


def test_two_processes_gloo_equal_single_process(reference, image_folder, tmp_path):
    ref_cache, _ = reference
    cache = str(tmp_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
           os.path.join(ROOT, 'dataset_extract.py'), *BASE, f'--cache_dir={cache}', f'--data_path={image_folder}',
           '--batch_size=16', '--chunk_batches=1', '--device=cpu']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'world=2' in proc.stdout
    for name in ('images.npy', 'train_aug_split_s0.npy'):
        assert np.array_equal(load(cache, name), load(ref_cache, name)), name


def test_bf16_autocast_close_to_fp32(reference, image_folder, tmp_path):
    ref_cache, _ = reference
    extract(str(tmp_path), f'--data_path={image_folder}', '--precision=bf16', '--aug_views=0')
    a, b = load(str(tmp_path)), load(ref_cache)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999 and np.abs(a - b).max() > 0  # close, and really computed in bf16


def test_changed_setting_is_caught_as_stale(reference, image_folder):
    cache, _ = reference
    proc = extract(cache, f'--data_path={image_folder}', '--aug_views=3', check=False)
    assert proc.returncode != 0 and 'aug_views' in proc.stderr and '--force' in proc.stderr


def test_bad_settings_and_inputs(image_folder, tmp_path):
    cases = [(['--dataset=imagenet'], '--dataset=\'imagenet\': choose one of cifar10'),
             (['--batch_size=0'], '--batch_size'),
             (['--bogus=1'], 'unknown setting --bogus'),
             (['--data_path=/nonexistent/dir'], 'image folder /nonexistent/dir does not exist'),
             (['--precision=fp8'], "error: --precision='fp8': choose one of fp32, bf16, fp16"),  # only what is wrong
             (['--bad_images=ignore'], "error: --bad_images='ignore': choose one of stop, skip"),
             (['--view_path=gpu'], "error: --view_path='gpu': choose one of tensor, pil"),
             (['--views_on=gpu'], "error: --views_on='gpu': choose one of auto, device, workers")]
    for args, message in cases:
        proc = run_script('dataset_extract.py', *BASE, f'--cache_dir={tmp_path}', f'--data_path={image_folder}',
                          *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-500:])


def test_views_identical_in_any_worker_count_and_chunk_size(reference, image_folder, tmp_path):
    """Two workers making the views beside the forward (on the CPU), with another chunk size, give the
    one-process run's features: every view comes from its own (seed, image, view) stream."""
    ref_cache, _ = reference
    extract(str(tmp_path), f'--data_path={image_folder}', '--batch_size=16', '--chunk_batches=3',
            '--num_workers=2', env=dict(OMP_NUM_THREADS='1'))
    for name in ('images.npy', 'train_aug_split_s0.npy'):
        assert np.array_equal(load(str(tmp_path), name), load(ref_cache, name)), name


def test_features_of_the_old_view_seeding_are_reported_stale(reference, image_folder):
    """A cache written before the views had one stream each (version 2) is not reused."""
    import json
    import dataset_extract
    cache, _ = reference
    side = os.path.join(cache, 'folder', 'tiny-test-random', 'train_aug_split_s0.npy.json')
    meta = json.load(open(side))
    old = dict(meta, settings=dict(meta['settings'], version=2))
    try:
        json.dump(old, open(side, 'w'))
        proc = extract(cache, f'--data_path={image_folder}', '--batch_size=16', '--chunk_batches=1', check=False)
        assert proc.returncode != 0 and 'version=2' in proc.stderr
        assert f'version={dataset_extract._VERSION}' in proc.stderr
    finally:
        json.dump(meta, open(side, 'w'))


def test_default_precision_follows_the_device():
    """fp16 on a GPU (as OpenAI's clip.load runs CLIP on CUDA), fp32 on the CPU; nouns_embed.py's batch likewise."""
    import dataset_extract
    import nouns_embed
    for device, want in (('cuda', 'fp16'), ('cuda:1', 'fp16'), ('cpu', 'fp32')):
        dataset_extract.PRECISION = None
        dataset_extract.resolve_settings(device)
        assert dataset_extract.PRECISION == want
        assert nouns_embed.resolve_settings(device)[-1] == want
    dataset_extract.PRECISION = None
    assert nouns_embed.batch_size_for('cuda') == 1024 and nouns_embed.batch_size_for('cpu') == 128


@pytest.mark.skipif(not __import__('torch').cuda.is_available(), reason='needs a CUDA GPU')
def test_fp16_features_close_to_fp32_on_a_gpu(image_folder, tmp_path):
    """The GPU default (fp16) against fp32 on the same views: cosine >= 0.999 for every image."""
    out = {}
    for p in ('fp16', 'fp32'):
        extract(str(tmp_path / p), f'--data_path={image_folder}', '--device=cuda', f'--precision={p}', '--aug_views=0')
        out[p] = load(str(tmp_path / p))
    a, b = out['fp16'], out['fp32']
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999 and np.abs(a - b).max() > 0


def test_views_made_on_the_devices_code_path_give_the_workers_features(reference, image_folder, tmp_path):
    """--views_on=device on the CPU (the code a GPU runs, end to end) with small calls, small loader
    batches, a tiny resampling budget and two workers gives the workers' run's features, bit for bit:
    the same views, and forwards that depend on the chunk alone."""
    ref_cache, _ = reference
    extract(str(tmp_path), f'--data_path={image_folder}', '--batch_size=16', '--chunk_batches=1', '--views_on=device',
            '--views_per_call=5', '--load_mb=1', '--resample_mb=1', '--num_workers=2', env=dict(OMP_NUM_THREADS='1'))
    for name in ('images.npy', 'train_aug_split_s0.npy'):
        assert np.array_equal(load(str(tmp_path), name), load(ref_cache, name)), name


def test_chunks_fill_whole_forwards_and_loader_batches_keep_their_bounds(image_folder, monkeypatch):
    """A chunk's views fill whole forwards where that is near (120 views, 128 a forward: 16 images, 15
    forwards); a loader batch holds at most VIEWS_PER_CALL views' images and LOAD_MB of pixels, never
    two chunks' images."""
    import dataset_extract
    import views
    from dataset import load_images
    monkeypatch.setattr(dataset_extract, 'BATCH_SIZE', 128)
    monkeypatch.setattr(dataset_extract, 'CHUNK_BATCHES', 8)
    assert [dataset_extract.chunk_images(v) for v in (120, 1, 2, 3, 127)] == [16, 1024, 512, 384, 8]
    images = load_images('folder', image_folder)
    transform = views.augment_transform(__import__('test_views').clip_preprocess(32))
    data = views.DecodedImages(images, np.arange(40), transform, 4, 0)
    monkeypatch.setattr(dataset_extract, 'VIEWS_PER_CALL', 18)  # 4 images
    monkeypatch.setattr(dataset_extract, 'LOAD_MB', 1)
    batches = list(dataset_extract.ChunkBatches(data, [(0, 0, 10), (1, 10, 40)]))
    assert [(c, len(b[2])) for c, b in batches] == [(0, 4), (0, 4), (0, 2)] + [(1, 4)] * 7 + [(1, 2)]
    assert [int(k) for _, b in batches for k in b[2]] == list(range(40))
    monkeypatch.setattr(dataset_extract, 'LOAD_MB', 0)  # an image larger than the bound comes alone
    assert {len(b[2]) for _, b in dataset_extract.ChunkBatches(data, [(0, 0, 10)])} == {1}


class DeviceReads(__import__('torch').overrides.TorchFunctionMode):
    """The sync detector: every tensor that went to the device (.to(device), or a factory given a device in
    views.py or dataset_extract.py; the loader's rebuilt batches are host tensors), and every tensor
    computed from one, is a device tensor, even when the device is the CPU; reading one
    on the host (.item(), float(), int(), bool(), .tolist(), .numpy(), .cpu(), a blocking .to('cpu'),
    nonzero, unique, masked_select, a boolean mask) raises, as each would wait for a GPU. Copying one
    out with .to('cpu', non_blocking=True) is allowed, and gives a host tensor."""
    import torch as _t
    READS = {_t.Tensor.item, _t.Tensor.tolist, _t.Tensor.numpy, _t.Tensor.cpu, _t.Tensor.__float__,
             _t.Tensor.__int__, _t.Tensor.__bool__, _t.Tensor.__index__, _t.Tensor.__array__, _t.Tensor.nonzero,
             _t.nonzero, _t.Tensor.unique, _t.unique, _t.masked_select, _t.Tensor.masked_select}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch
        kwargs = kwargs or {}
        flat = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
        on_device = any(getattr(a, '_on_device', False) for a in flat if isinstance(a, torch.Tensor))
        to = func is torch.Tensor.to and any(isinstance(a, (str, torch.device)) for a in flat)
        copy_out = to and on_device and kwargs.get('non_blocking', False)
        if on_device and (func in self.READS or (to and not copy_out) or (func is torch.Tensor.__getitem__ and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in flat))):
            raise AssertionError(f'{getattr(func, "__name__", func)} of a device tensor: a host-device sync')
        out = func(*args, **kwargs)
        made_here = 'device' in kwargs and os.path.basename(sys._getframe(1).f_code.co_filename) in (
            'views.py', 'dataset_extract.py')
        mark = not copy_out and (on_device or to or made_here)
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                o._on_device = mark
        return out


def _extract_in_process(image_folder, out, monkeypatch, mode=None):
    """dataset_extract.encode_views in this process, views on the device's code path on the CPU: 24 images'
    plain view and 3 augmented views of 12; each pass under `mode` (the model loaded before)."""
    import contextlib
    import dataset_extract
    import views
    from dataset import load_images
    from models import load_backbone
    for k, v in dict(PRECISION='fp32', BATCH_SIZE=8, CHUNK_BATCHES=1, NUM_WORKERS=1, VIEWS_ON='device', FORCE=False,
                     VIEW_PATH='tensor', VIEWS_PER_CALL=6).items():
        monkeypatch.setattr(dataset_extract, k, v)
    images = load_images('folder', image_folder)
    encode, preprocess, _ = load_backbone('tiny-test', 'random', 'cpu')
    for name, tr, n, seed in (('plain', preprocess, 1, None), ('aug', views.augment_transform(preprocess), 3, 0)):
        with mode or contextlib.nullcontext():
            dataset_extract.encode_views(name, images, np.arange(24 if n == 1 else 12), tr, n, encode,
                                         os.path.join(out, f'{name}.npy'), dict(test=name), 0, 1, 'cpu', seed=seed)


def test_the_view_path_reads_nothing_back_between_forwards(image_folder, tmp_path, monkeypatch):
    """A whole pass (views made, normalised, forwarded, features copied out and saved) under DeviceReads:
    no host-device synchronisation between forwards; its features are the unwatched run's. The detector
    itself catches a planted .item() in the resampling."""
    import views
    _extract_in_process(image_folder, str(tmp_path / 'free'), monkeypatch)
    _extract_in_process(image_folder, str(tmp_path / 'watched'), monkeypatch, DeviceReads())
    for name in ('plain.npy', 'aug.npy'):
        assert np.array_equal(np.load(tmp_path / 'free' / name), np.load(tmp_path / 'watched' / name))
    clip8 = views._clip8
    monkeypatch.setattr(views, '_clip8', lambda acc: clip8(acc) + 0 * acc.max().item())
    with pytest.raises(AssertionError, match='item of a device tensor'):
        _extract_in_process(image_folder, str(tmp_path / 'planted'), monkeypatch, DeviceReads())
