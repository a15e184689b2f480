"""dataset_extract.py through its command line: the files it writes, resuming after SIGKILL,
two-process (gloo) extraction, bf16 autocast, and its errors."""
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
             (['--view_path=gpu'], "error: --view_path='gpu': choose one of tensor, pil")]
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
    cache, _ = reference
    side = os.path.join(cache, 'folder', 'tiny-test-random', 'train_aug_split_s0.npy.json')
    meta = json.load(open(side))
    old = dict(meta, settings=dict(meta['settings'], version=2))
    try:
        json.dump(old, open(side, 'w'))
        proc = extract(cache, f'--data_path={image_folder}', '--batch_size=16', '--chunk_batches=1', check=False)
        assert proc.returncode != 0 and 'version=2' in proc.stderr and 'version=3' in proc.stderr
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
