"""Every cached product knows what it was made from (#16): a changed input makes it stale, rebuilt or
reported, never silently reused; settings are checked before any work; results lines are whole and
single; every error a user can cause is one line naming the file, line or setting."""
import errno
import json
import os

import numpy as np
import pytest

import cache
import dataset
import runs
from conftest import fake_run as _fake_run, one_error_line as _one_error_line, run_script, write_feature_set

TINY = ['--clip_model=tiny-test', '--clip_pretrained=random']
TRAIN = ['--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', *TINY, '--bits=8', '--epochs=1',
         '--warmup=0', '--batch_size=64']


# -----------------------------------------------------------------------------
# 1. products and their inputs
def test_external_features_follow_their_inputs(tmp_path):
    """train.py's cached e_i are rebuilt when the CLIP features or the split they were made from change
    (a re-extraction, a new split of the same size), never reused."""
    cache_dir = str(tmp_path)
    write_feature_set(cache_dir)
    args = [*TRAIN, f'--cache_dir={cache_dir}', '--external=imgk', '--aug=false', f'--results={tmp_path}/r.jsonl']
    first = run_script('train.py', *args).stdout
    assert 'rebuilding' not in first
    again = run_script('train.py', *args).stdout
    assert 'rebuilding' not in again  # nothing changed: reused
    feats = os.path.join(cache_dir, 'folder', 'tiny-test-random', 'images.npy')
    meta = json.load(open(feats + '.json'))['settings']
    cache.save_array(feats, np.load(feats) * 1.01 + 0.01, meta, 'test')  # as a re-extraction in another precision
    out = run_script('train.py', *args).stdout
    assert 'rebuilding the external features' in out and 'inputs' in out
    train = os.path.join(cache_dir, 'folder', 'split_s0', 'train.npy')
    idx = np.load(train)
    cache.save_array(train, np.sort(np.concatenate([idx[1:], [np.setdiff1d(np.arange(480), idx)[0]]])), {}, 'test')
    out = run_script('train.py', *args).stdout  # a new split with the same train count
    assert 'rebuilding the external features' in out


def test_external_features_follow_the_noun_selection(tmp_path):
    """After nouns_embed.py --kmeans_seed=1 --force (another selection in the same folder) and after a
    word list edited in place (reported by nouns_embed.py, then rebuilt with --force), train.py's
    cached e_i are rebuilt."""
    cache = str(tmp_path)
    write_feature_set(cache, dim=32)  # the tiny CLIP's width
    words = tmp_path / 'words.txt'
    words.write_text('\n'.join(f'word{i}' for i in range(60)) + '\n')
    nouns = ['nouns_embed.py', *TINY, f'--vocab={words}', '--n_k=8', '--t1=0.05', f'--cache_dir={cache}', '--threads=1']
    run_script(*nouns)
    args = [*TRAIN, f'--cache_dir={cache}', f'--vocab={words}', '--n_k=8', '--t1=0.05', '--aug=false',
            f'--results={tmp_path}/r.jsonl']
    run_script('train.py', *args)
    assert 'rebuilding' not in run_script('train.py', *args).stdout
    run_script(*nouns, '--kmeans_seed=1', '--force')
    assert 'rebuilding the external features' in run_script('train.py', *args).stdout
    words.write_text('\n'.join(f'word{i}' for i in range(60)).replace('word7', 'cat') + '\n')  # edited in place
    line = _one_error_line(run_script(*nouns, '--kmeans_seed=1', check=False))
    assert 'stale cache' in line and 'words_sha256' in line
    run_script(*nouns, '--kmeans_seed=1', '--force')
    assert 'rebuilding the external features' in run_script('train.py', *args).stdout


def test_extraction_caches_follow_images_labels_and_split_files(tmp_path):
    """labels edited in the list file, other pictures under the same names, edited split files and a
    truncated .npy are each reported (stale, with --force), never reused."""
    data, cache = tmp_path / 'data', str(tmp_path / 'cache')
    data.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f'im {i}.png')  # spaces
    lab = np.eye(3, dtype=int)[np.arange(12) % 3]
    (data / 'list.txt').write_text(''.join(f'im {i}.png {" ".join(map(str, lab[i]))}\n' for i in range(12)))
    split = tmp_path / 'split'
    split.mkdir()

    def write_split(train):  # the split lists give the labels of the list file (#33: they must agree)
        for name, part in (('query', (0, 1)), ('retrieval', range(2, 12)), ('train', train)):
            (split / f'{name}.txt').write_text(''.join(f'im {i}.png {" ".join(map(str, lab[i]))}\n' for i in part))
    write_split((2, 3, 4, 5))
    base = ['--dataset=mscoco', f'--data_path={data}', '--backbone=tiny-test', '--backbone_pretrained=random',
            '--num_workers=0', '--aug_views=2', f'--cache_dir={cache}', f'--split_dir={split}']
    run_script('dataset_extract.py', *base)
    assert 'reusing' in run_script('dataset_extract.py', *base).stdout
    lab[4] = [0, 0, 1]  # an edited label, same paths
    (data / 'list.txt').write_text(''.join(f'im {i}.png {" ".join(map(str, lab[i]))}\n' for i in range(12)))
    write_split((2, 3, 4, 5))
    line = _one_error_line(run_script('dataset_extract.py', *base, check=False))
    assert 'stale cache' in line and 'images_sha' in line and '--force' in line
    run_script('dataset_extract.py', *base, '--force')
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / 'im 7.png')  # another picture
    assert 'images_sha' in _one_error_line(run_script('dataset_extract.py', *base, check=False))
    run_script('dataset_extract.py', *base, '--force')
    write_split((2, 3, 4, 6))
    assert 'split_files' in _one_error_line(run_script('dataset_extract.py', *base, check=False))
    run_script('dataset_extract.py', *base, '--force')
    feats = os.path.join(cache, 'mscoco', 'tiny-test-random', 'images.npy')
    with open(feats, 'r+b') as f:
        f.truncate(os.path.getsize(feats) - 64)
    line = _one_error_line(run_script('dataset_extract.py', *base, check=False))
    assert 'does not match the checksum' in line and 'images.npy' in line


def test_reproduce_done_follows_the_inputs(tmp_path):
    import reproduce
    import train
    cache_dir = str(tmp_path)
    write_feature_set(cache_dir)
    cfg = dict(reproduce.train_defaults(), DATASET='folder', CACHE_DIR=cache_dir, BACKBONE='tiny-test',
               BACKBONE_PRETRAINED='random', METHOD='lsh')
    result = dict(inputs=cache.fingerprints(**train.input_paths(cfg)))
    assert set(result['inputs']) == {'features', 'labels', 'query', 'retrieval', 'train'}
    assert reproduce.changed_inputs(result, cfg) == []
    feats = os.path.join(cache_dir, 'folder', 'tiny-test-random', 'images.npy')
    cache.save_array(feats, np.load(feats) + 1, json.load(open(feats + '.json'))['settings'], 'test')
    assert reproduce.changed_inputs(result, cfg) == ['features']


# -----------------------------------------------------------------------------
# 2. settings checked before any work
@pytest.mark.parametrize('arg,message', [
    ('--tau2=-1', '--tau2=-1.0: -1.0 is outside [0, inf) (Eq. 9 temperature'),
    ('--lr_max=-1', '--lr_max=-1.0: -1.0 is outside (0, inf)'),
    ('--t2=1.5', '--t2=1.5: 1.5 is outside (-1, 1] (Eq. 8 threshold'),
    ('--t2=-1', '--t2=-1.0: -1.0 is outside (-1, 1]'),
    ('--tau1=0', '--tau1=0.0: 0.0 is outside (0, inf) (Eq. 6 temperature'),
    ('--topk=-5', '--topk=-5: -5 is outside [0, inf)'),
    ('--bits=16,16', '--bits=16,16 repeats 16'),
    ('--bits=0', '--bits=0: 0 is outside [1, 1024]'),
])
def test_train_settings_out_of_range_stop_before_any_work(tmp_path, arg, message):
    proc = run_script('train.py', '--dataset=folder', f'--cache_dir={tmp_path}/nothing', arg, check=False)
    assert message in _one_error_line(proc)  # the settings error, not the missing cache


def test_other_scripts_check_their_ranges(tmp_path):
    assert '--n_k=0: 0 is outside [1, inf)' in _one_error_line(
        run_script('nouns_embed.py', *TINY, '--n_k=0', f'--cache_dir={tmp_path}', check=False))
    assert '--aug_views=-1: -1 is outside [0, inf)' in _one_error_line(
        run_script('dataset_extract.py', '--dataset=folder', '--aug_views=-1', f'--cache_dir={tmp_path}', check=False))
    assert '--radius=-1: -1 is outside [0, inf)' in _one_error_line(
        run_script('eval_hash.py', '--run=x', '--radius=-1', check=False))
    assert 'fp16 needs a GPU' in _one_error_line(run_script(
        'dataset_extract.py', '--dataset=folder', '--precision=fp16', '--device=cpu', f'--cache_dir={tmp_path}',
        check=False))
    assert not os.path.exists(os.path.join(tmp_path, 'folder'))  # refused before anything was read or written


# -----------------------------------------------------------------------------
# 3. results lines: whole, one per run
def test_results_file_partial_line_and_reruns(tmp_path):
    cache = str(tmp_path)
    write_feature_set(cache)
    results = tmp_path / 'results.jsonl'
    results.write_text('{"dataset": "folder", "bits": 8, "map": 0.5}\n{"dataset": "fol')  # a write cut short
    args = [*TRAIN, f'--cache_dir={cache}', '--method=lsh', f'--results={results}']
    out = run_script('train.py', *args).stdout
    assert 'results.jsonl:2 is not a whole JSON line' in out
    lines = [json.loads(l) for l in results.read_text().splitlines()]
    assert len(lines) == 2 and lines[1]['method'] == 'lsh' and results.read_text().endswith('\n')
    out = run_script('train.py', *args).stdout  # the same settings again: replaced, not repeated
    assert 'held this run already' in out and len(results.read_text().splitlines()) == 2
    run_script('train.py', *args, '--seed=1')  # another seed is another run
    assert len(results.read_text().splitlines()) == 3


def test_full_disk_keeps_the_results_file_and_says_so(tmp_path, monkeypatch):
    results = tmp_path / 'results.jsonl'
    results.write_text('{"dataset": "folder", "bits": 8, "map": 0.5}\n')
    before = results.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(OSError) as e:
        runs.write_result(str(results), dict(dataset='folder', bits=16, map=0.7, config={}))
    assert results.read_bytes() == before and not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]
    msg = cache.user_error(e.value, dict(results=str(results), cache_dir=str(tmp_path)))
    assert msg.startswith('error: no space left on the device while writing') and str(results) in msg
    assert 'choose another --results' in msg


# -----------------------------------------------------------------------------
# 4. images of high bit depth
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / 'sixteen.png')  # a 16-bit greyscale PNG
    with Image.open(tmp_path / 'sixteen.png') as im:
        assert im.mode in ('I', 'I;16') and np.asarray(im.convert('RGB')).mean() > 250  # what convert() alone gives
        rgb = np.asarray(dataset.to_rgb(im))
    assert rgb.shape == (16, 16, 3) and np.abs(rgb[..., 0].astype(int) - grey8).max() == 0
    f = Image.fromarray(grey8.astype(np.float32) / 255, 'F')
    assert np.abs(np.asarray(dataset.to_rgb(f))[..., 0].astype(int) - grey8).max() <= 1


# -----------------------------------------------------------------------------
# 5. one line for every error a user can cause
def test_list_file_errors_name_the_file_and_line(tmp_path):
    (tmp_path / 'a b.png').write_bytes(b'')
    (tmp_path / 'list.txt').write_bytes('a b.png 0 1\ncaf\xe9.png 1 0\n'.encode('latin-1'))
    with pytest.raises(dataset.DataError, match=r'list.txt:2: not UTF-8 .*iconv -f latin1 -t utf-8'):
        dataset.read_list_file(str(tmp_path / 'list.txt'), str(tmp_path))
    (tmp_path / 'list.txt').write_text('a b.png 0 1\n')  # a path with a space
    names, labels = dataset.read_list_file(str(tmp_path / 'list.txt'), str(tmp_path))
    assert names == ['a b.png'] and labels.tolist() == [[0, 1]]
    (tmp_path / 'list.txt').write_text('a b.png 0 1\nonly-a-path.png\n')
    with pytest.raises(dataset.DataError, match=r"list.txt:2: expected 'path 0 1 0 ...'"):
        dataset.read_list_file(str(tmp_path / 'list.txt'), str(tmp_path))


def test_unreadable_image_in_a_worker_process_is_one_line(image_folder, tmp_path):
    import shutil
    data = tmp_path / 'images'
    shutil.copytree(image_folder, data)
    (data / 'class03' / '005.png').write_bytes(b'not a png at all')
    proc = run_script('dataset_extract.py', '--dataset=folder', f'--data_path={data}', '--backbone=tiny-test',
                      '--backbone_pretrained=random', '--num_workers=1', '--aug_views=0', f'--cache_dir={tmp_path}/c',
                      check=False)
    line = _one_error_line(proc)
    assert 'cannot read image' in line and 'class03/005.png' in line and '--bad_images=skip' in line
    assert 'DataLoader worker' not in line


def test_empty_class_folder_and_corrupt_codes(tmp_path):
    (tmp_path / 'imgs' / 'cats').mkdir(parents=True)
    (tmp_path / 'imgs' / 'dogs').mkdir()
    from PIL import Image
    Image.new('RGB', (8, 8)).save(tmp_path / 'imgs' / 'dogs' / 'a.png')
    with pytest.raises(dataset.DataError,
                       match=r'class folder .*imgs/cats holds no images.*add images to it or move it'):
        dataset.load_images('folder', str(tmp_path / 'imgs'))
    run = tmp_path / 'run' / '16bits'
    run.mkdir(parents=True)
    (run / 'codes.npz').write_bytes(b'PK\x03\x04 broken')
    line = _one_error_line(run_script('eval_hash.py', f'--run={tmp_path / "run"}', check=False))
    assert 'codes.npz cannot be read' in line and 'rerun train.py' in line


def test_read_only_and_full_disk_messages_name_the_file():
    assert cache.user_error(PermissionError(errno.EROFS, 'Read-only file system', '/data/cache/x.npy'),
                            dict(cache_dir='/data/cache', results='/data/cache/r.jsonl')) == \
        'error: cannot write /data/cache/x.npy (Read-only file system): choose a writable --cache_dir'
    assert cache.user_error(PermissionError(errno.EACCES, 'Permission denied', '/data/cache/r.jsonl'),
                            dict(cache_dir='/data/cache', results='/data/cache/r.jsonl')) == \
        'error: cannot write /data/cache/r.jsonl (Permission denied): choose a writable --results'
    assert '/c/y.npy' in cache.user_error(OSError(errno.ENOSPC, 'No space left on device', '/c/y.npy'))


def test_read_only_cache_from_the_command_line(image_folder):
    """/sys is read-only here: the script stops on its first write with one line naming it."""
    proc = run_script('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}', '--backbone=tiny-test',
                      '--backbone_pretrained=random', '--num_workers=0', '--aug_views=0',
                      '--cache_dir=/sys/duheg-cache', check=False)
    line = _one_error_line(proc)
    assert line.startswith('error: cannot write /sys/duheg-cache') and 'choose a writable --cache_dir' in line


def test_fp16_on_a_cpu_is_refused_before_anything_is_deleted(tmp_path):
    cache = str(tmp_path)
    run_script('nouns_embed.py', *TINY, '--vocab=imagenet', '--n_k=10', f'--cache_dir={cache}', '--threads=1')
    sidecars = sorted(p for d, _, fs in os.walk(cache) for p in (os.path.join(d, f) for f in fs) if p.endswith('.json'))
    line = _one_error_line(run_script('nouns_embed.py', *TINY, '--vocab=imagenet', '--n_k=10', f'--cache_dir={cache}',
                                      '--precision=fp16', '--force', '--device=cpu', check=False))
    assert 'fp16 needs a GPU' in line
    found = (os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs)
    assert sorted(p for p in found if p.endswith('.json')) == sidecars


# -----------------------------------------------------------------------------
# 6. eval_hash.py --runs
def test_eval_runs_keyed_by_path_and_checked(tmp_path):
    _fake_run(tmp_path / 'a' / 'run', 'folder', seed=0)
    _fake_run(tmp_path / 'b' / 'run', 'folder', seed=1)
    out = run_script('eval_hash.py', f'--runs={tmp_path}/a/run,{tmp_path}/b/run', '--bits=16', f'--out={tmp_path}/cmp',
                     '--examples=0').stdout
    assert f'run={tmp_path}/a/run ' in out and f'run={tmp_path}/b/run ' in out  # two runs named 'run': both kept
    saved = json.load(open(tmp_path / 'cmp' / 'compare_16bits.json'))['runs']
    assert set(saved) == {f'{tmp_path}/a/run', f'{tmp_path}/b/run'}
    _fake_run(tmp_path / 'c', 'mscoco', seed=2)
    line = _one_error_line(run_script('eval_hash.py', f'--runs={tmp_path}/a/run,{tmp_path}/c', '--bits=16',
                                      f'--out={tmp_path}/cmp', check=False))
    assert 'mixes datasets' in line and 'folder' in line and 'mscoco' in line
    line = _one_error_line(run_script('eval_hash.py', f'--runs={tmp_path}/a/run,{tmp_path}/b/run', '--bits=64',
                                      f'--out={tmp_path}/cmp', check=False))
    assert 'has no 64-bit codes' in line and 'its code lengths: [16]' in line
    os.makedirs(tmp_path / 'a' / 'run' / '32bits')  # a code length whose training did not finish
    out = run_script('eval_hash.py', f'--run={tmp_path}/a/run', '--examples=0').stdout
    assert '32bits has no codes.npz' in out
