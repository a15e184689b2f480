"""dataset.py: configuration, cache files, list files, splits, views."""
import json
import os

import numpy as np
import pytest

import cache
import configurator
import dataset
import views
from cache import CacheError
from dataset import DataError


def test_configure_overrides_types_and_rejects_unknown():
    g = dict(BITS=(16, 32, 64), T2=0.97, EPOCHS=60, SIM=True, NAME='x', OPT=None, lower='ignored')
    cfg = configurator.configure(g, ['--bits=16,64', '--t2=0.9', '--epochs=3', '--sim=false', '--name=y', '--opt=1e-3'])
    assert g['BITS'] == (16, 64) and g['T2'] == 0.9 and g['EPOCHS'] == 3 and g['SIM'] is False
    assert g['NAME'] == 'y' and g['OPT'] == 1e-3 and cfg['EPOCHS'] == 3 and 'lower' not in cfg
    configurator.configure(g, ['--sim'])
    assert g['SIM'] is True
    with pytest.raises(SystemExit, match='unknown setting --bitz'):
        configurator.configure(g, ['--bitz=3'])
    with pytest.raises(SystemExit, match='is not an integer'):
        configurator.configure(g, ['--epochs=1.5'])
    with pytest.raises(SystemExit, match='is not a number'):
        configurator.configure(g, ['--t2=high'])
    with pytest.raises(SystemExit, match='is not an integer'):
        configurator.configure(g, ['--bits=16,x'])
    with pytest.raises(SystemExit, match='needs a value'):
        configurator.configure(g, ['--epochs'])


def test_cache_roundtrip_and_stale_settings(tmp_path):
    p = str(tmp_path / 'a' / 'x.npy')
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.save_array(p, x, dict(backbone='ViT-B-16', seed=0), 'test')
    np.testing.assert_array_equal(cache.load_array(p, dict(backbone='ViT-B-16')), x)
    assert cache.cache_status(p, dict(seed=0)) == 'ok'
    with pytest.raises(CacheError, match="made with backbone='ViT-B-16', but this run has backbone='vgg16'"):
        cache.load_array(p, dict(backbone='vgg16'))
    assert not [f for f in os.listdir(tmp_path / 'a') if f.endswith('.tmp')]


def test_cache_untrusted_without_sidecar_or_with_bad_content(tmp_path):
    p = str(tmp_path / 'x.npy')
    np.save(p, np.zeros(3))  # as if killed before the sidecar was written
    with pytest.raises(CacheError, match='has no sidecar'):
        cache.load_array(p)
    cache.save_array(p, np.zeros((2, 2), np.float32), {}, 'test')
    with open(p, 'r+b') as f:  # change a byte of the data
        f.seek(-1, 2)
        f.write(b'\x01')
    with pytest.raises(CacheError, match='checksum'):
        cache.load_array(p)
    cache.save_array(p, np.array([[1.0, np.nan]], np.float32), {}, 'test')
    with pytest.raises(CacheError, match='NaN or infinite values in 1 rows'):
        cache.load_array(p)
    cache.save_array(p, np.zeros((2, 2), np.float32), {}, 'test')
    meta = json.load(open(p + '.json'))
    meta['shape'] = [4, 1]
    json.dump(meta, open(p + '.json', 'w'))
    with pytest.raises(CacheError, match='has shape'):
        cache.load_array(p)


def _list(tmp_path, text, images=('a.png', 'b.png')):
    for name in images:
        (tmp_path / name).write_bytes(b'x')
    f = tmp_path / 'list.txt'
    f.write_text(text)
    return str(f)


def test_read_list_file_and_its_errors(tmp_path):
    names, labels = dataset.read_list_file(_list(tmp_path, 'a.png 0 1 1\n\nb.png 1 0 0\n'), str(tmp_path))
    assert names == ['a.png', 'b.png'] and labels.tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(DataError, match=r'list.txt:2: 2 labels, but earlier lines have 3'):
        dataset.read_list_file(_list(tmp_path, 'a.png 0 1 1\nb.png 1 0\n'), str(tmp_path))
    with pytest.raises(DataError, match=r'list.txt:1: labels must be 0/1 integers'):
        dataset.read_list_file(_list(tmp_path, 'a.png 0 x 1\n'), str(tmp_path))
    with pytest.raises(DataError, match=r'list.txt:1: labels must be 0/1'):
        dataset.read_list_file(_list(tmp_path, 'a.png 0 2 1\n'), str(tmp_path))
    with pytest.raises(DataError, match=r"list.txt:1: expected 'path 0 1 0"):
        dataset.read_list_file(_list(tmp_path, 'a.png\n'), str(tmp_path))
    with pytest.raises(DataError, match=r'3 of 4 images named in .*list.txt do not exist .* e.g. c.png, d.png, e.png'):
        dataset.read_list_file(_list(tmp_path, 'a.png 1\nc.png 1\nd.png 1\ne.png 1\n'), str(tmp_path))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DataError, match='unknown dataset .*cifar10, nuswide, flickr25k, mscoco, folder'):
        dataset.load_images('imagenet', '/nonexistent')


def test_split_rules():
    labels = np.eye(4, dtype=np.int8)[np.repeat(np.arange(4), 30)]
    q, r, t = dataset.make_split(labels, dict(query_per_class=5, train_per_class=10), seed=0)
    assert len(q) == 20 and len(r) == 100 and len(t) == 40
    assert (labels[q].sum(0) == 5).all() and (labels[t].sum(0) == 10).all()
    assert not set(q) & set(r) and set(t) <= set(r) and set(q) | set(r) == set(range(120))
    q2, _, t2 = dataset.make_split(labels, dict(query_per_class=5, train_per_class=10), seed=0)
    assert (q == q2).all() and (t == t2).all()  # a fixed seed gives the same split
    q3, _, _ = dataset.make_split(labels, dict(query_per_class=5, train_per_class=10), seed=1)
    assert (q != q3).any()
    q, r, t = dataset.make_split(labels, dict(query=7, train=11), seed=0)
    assert len(q) == 7 and len(r) == 113 and len(t) == 11 and set(t) <= set(r)
    with pytest.raises(DataError, match='needs 31 query images of each class, but class 0 has 30 images: give '
                                        'dataset_extract.py a smaller --query'):
        dataset.make_split(labels, dict(query_per_class=31, train_per_class=1), seed=0)


def test_multilabel_per_concept_query_has_each_concept():
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 6)) < 0.3).astype(np.int8)
    q, r, t = dataset.make_split(labels, dict(query_per_class=10, train_per_class=20), seed=0)
    assert len(q) == 60 and len(set(q)) == 60 and len(t) == 120
    assert (labels[q].sum(0) >= 10).all()


def test_folder_dataset_and_views(image_folder):
    from models import load_clip
    images = dataset.load_images('folder', image_folder)
    assert len(images) == 400 and images.labels.shape == (400, 10) and images.classes[0] == 'class00'
    _, preprocess, _ = load_clip('tiny-test', 'random')
    aug = views.augment_transform(preprocess)
    steps = views.view_steps(aug)
    a = views.DecodedImages(images, [0, 5], aug, n_views=3, seed=3)
    x1, x2 = (views.make_views(*views.collate_decoded([a[1]])[:2], steps, 'cpu') for _ in range(2))
    assert x1.shape == (3, 3, 32, 32) and (x1 == x2).all()  # the same seed, image and view give the same view
    assert all((x1[u] - x1[v]).abs().max() > 0.1 for u in range(3) for v in range(u))  # three different views
    b = views.DecodedImages(images, [5], aug, n_views=3, seed=4)  # another seed, other views
    y = views.make_views(*views.collate_decoded([b[0]])[:2], steps, 'cpu')
    assert (y - x1).abs().amax((1, 2, 3)).min() > 0.1


def test_unreadable_image_stops_or_is_skipped(tmp_path):
    from models import load_clip
    (tmp_path / 'c0').mkdir()
    (tmp_path / 'c0' / 'bad.png').write_bytes(b'not a png')
    images = dataset.load_images('folder', str(tmp_path))
    _, preprocess, _ = load_clip('tiny-test', 'random')
    for path in views.VIEW_PATHS:
        with pytest.raises(DataError, match=r'cannot read image .*bad.png.*--bad_images=skip'):
            views.DecodedImages(images, [0], preprocess, path=path)[0]
        x, draws, k, ok = views.DecodedImages(images, [0], preprocess, path=path, bad_images='skip')[0]
        assert ok is False and x.shape[-3:] == ((3, 64, 64) if path == 'tensor' else (3, 32, 32))


def _png(path):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (8, 8), (10, 20, 30)).save(path)


def test_mirflickr_layout(tmp_path):
    # 25,000 image names; annotation files list image numbers; *_r1 files are not labels; unlabelled images dropped
    for i in range(1, 25001):
        (tmp_path / 'mirflickr').mkdir(exist_ok=True)
        (tmp_path / 'mirflickr' / f'im{i}.jpg').touch()
    ann = tmp_path / 'annotations'
    ann.mkdir()
    (ann / 'dog.txt').write_text('1\n3\n')
    (ann / 'sky.txt').write_text('3\n25000\n')
    (ann / 'sky_r1.txt').write_text('2\n')
    (ann / 'README.txt').write_text('not labels\n')
    images = dataset.load_images('flickr25k', str(tmp_path))
    assert images.names == ['mirflickr/im1.jpg', 'mirflickr/im3.jpg', 'mirflickr/im25000.jpg']
    assert images.labels.tolist() == [[1, 0], [1, 1], [0, 1]] and images.classes == ['dog', 'sky']
    (ann / 'dog.txt').write_text('1\nthree\n')
    with pytest.raises(DataError, match=r'dog.txt:2: expected an image number'):
        dataset.load_images('flickr25k', str(tmp_path))


def test_nuswide_keeps_21_most_frequent_concepts(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 81)) < np.linspace(0.5, 0.01, 81)).astype(int)
    labels[0] = 0
    labels[0, 80] = 1  # only a rare concept: dropped with it
    lines = []
    for i, row in enumerate(labels):
        _png(str(tmp_path / 'img' / f'{i}.jpg'))
        lines.append(f'img/{i}.jpg ' + ' '.join(map(str, row)))
    (tmp_path / 'list.txt').write_text('\n'.join(lines) + '\n')
    images = dataset.load_images('nuswide', str(tmp_path))
    top = np.sort(np.argsort(-labels.sum(0), kind='stable')[:21])
    assert images.labels.shape[1] == 21 and 'img/0.jpg' not in images.names
    keep = labels[:, top].any(1)
    assert (images.labels == labels[keep][:, top]).all()


def test_user_split_dir(tmp_path):
    for i in range(4):
        _png(str(tmp_path / f'{i}.png'))
    (tmp_path / 'list.txt').write_text(''.join(f'{i}.png {i % 2} {1 - i % 2}\n' for i in range(4)))
    images = dataset.load_images('mscoco', str(tmp_path))
    s = tmp_path / 'split'
    s.mkdir()
    (s / 'query.txt').write_text('3.png 1 0\n')
    (s / 'retrieval.txt').write_text('0.png 0 1\n1.png 1 0\n2.png 0 1\n')
    (s / 'train.txt').write_text('2.png 0 1\n')
    q, r, t = dataset.read_split_dir(str(s), images)
    assert q.tolist() == [3] and r.tolist() == [0, 1, 2] and t.tolist() == [2]
    (s / 'train.txt').write_text('9.png 0 1\n')
    with pytest.raises(DataError, match=r'1 images of .*train.txt are not in the dataset, e.g. 9.png'):
        dataset.read_split_dir(str(s), images)
    (s / 'train.txt').write_text('3.png 1 0\n')  # the query image: refused, with the files and the count
    with pytest.raises(DataError, match=r'1 query images of .*query.txt are also in .*train.txt'):
        dataset.read_split_dir(str(s), images)


def test_cifar10_offline_error_says_what_to_fetch(tmp_path):
    with pytest.raises(DataError, match=r'cifar-10-python.tar.gz .* --data_path='):
        dataset.load_images('cifar10', str(tmp_path), download=False)  # as offline: nothing there
