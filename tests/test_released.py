"""--released, item by item (where the authors' released code, XLearning-SCU/2025-ICML-DUHEG, differs from
the paper), and
the default's fresh views per epoch (Algorithm 2, line 10). Each behaviour on a small case worked out
by hand or computed separately here; faiss (the library the authors' code calls) where it applies."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import configurator
import dataset
import nouns_embed as ne
import train
import views
from cache import selection_dir
from conftest import needs_wordnet, run_script, saved_map

TINY = ['--clip_model=tiny-test', '--clip_pretrained=random']


def circle(deg):
    r = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


# -----------------------------------------------------------------------------
# Eq. 3: the two readings
def test_eq3_readings_on_a_drawable_example():
    """One centre at 0 degrees; nouns at 10 (cos .985, dis .030), 40 (cos .766, dis .468), 60 (cos .5,
    dis 1.0) and 90 degrees (cos 0, dis 2). At T1 = 0.9 the paper's distance keeps 60 and 90 (far), the
    authors' similarity keeps 10 (close): nearly complements."""
    t, c, a = circle([10, 40, 60, 90]), circle([0]), np.zeros(4, np.int64)
    assert ne.eq3_representative(t, c, a, 0.9, 'distance').numpy().nonzero()[0].tolist() == [2, 3]
    assert ne.eq3_representative(t, c, a, 0.9, 'similarity').numpy().nonzero()[0].tolist() == [0]
    assert ne.eq3_representative(t, c, a, 0.7, 'similarity').numpy().nonzero()[0].tolist() == [0, 1]
    rep, cen = ne.select_from_clusters(t, c, a, 0.9, reading='similarity')
    assert rep.tolist() == [0] and cen.tolist() == [1]  # the normal nouns' most probable: 40 degrees
    with pytest.raises(ValueError, match='T1_READING'):
        ne.eq3_representative(t, c, a, 0.9, 'cosine')


def test_eq3_similarity_is_faiss_spherical_search_score():
    """The authors' `dis` is what a faiss inner-product search of the unit rows against the unit
    centres returns: the cosine to the nearest centre. Ours, on the same centres, equals it."""
    faiss = pytest.importorskip('faiss')
    t = F.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    centres, assign = ne.spherical_kmeans(t, 8, 20, 1, 0, verbose=False)
    index = faiss.IndexFlatIP(16)
    index.add(np.ascontiguousarray(centres))
    d, i = index.search(t, 1)
    assert np.array_equal(i[:, 0], assign)
    ours = (t * centres[assign]).sum(1)
    assert np.abs(ours - d[:, 0]).max() < 1e-5
    for t1 in (0.5, 0.8, 0.9):
        assert np.array_equal(ne.eq3_representative(t, centres, assign, t1, 'similarity').numpy(), d[:, 0] > t1)


# -----------------------------------------------------------------------------
# Eq. 2: raw mean against normalised mean
def test_eq2_raw_mean_and_normalised_mean_on_two_prompts():
    from models import load_clip
    model, _, tok = load_clip('tiny-test', 'random')
    prompts = ('a photo of a {}.', 'art of the {} in a big museum.')
    with torch.no_grad():
        f = model.encode_text(tok([p.format('dog') for p in prompts])).float()
    assert abs(f[0].norm() - f[1].norm()) > 1e-3  # prompts of different norms: the two means differ
    paper = F.normalize(F.normalize(f, dim=1).mean(0), dim=0).numpy()
    released = F.normalize(f.mean(0), dim=0).numpy()
    got_paper = ne.embed_words(['dog'], model, tok, prompts=prompts)[0]
    got_released = ne.embed_words(['dog'], model, tok, prompts=prompts, raw_mean=True)[0]
    assert np.abs(got_paper - paper).max() < 1e-5 and np.abs(got_released - released).max() < 1e-5
    assert np.abs(paper - released).max() > 1e-4


# -----------------------------------------------------------------------------
# duplicates: the authors' 2-NN deletion
def test_2nn_deletion_on_a_triplicate():
    """Rows: a, b, a, c, a (a three times). Round 1: rows 2 and 4 find row 0 first (a tie broken by
    the lower index): row 0 is deleted. Round 2: row 4 finds row 2 first: row 2 is deleted. Then every
    row finds itself: b, c and the last a remain."""
    a, b, c = circle([0]), circle([90]), circle([200])
    t = np.concatenate([a, b, a, c, a])
    assert ne.delete_2nn(t).tolist() == [1, 3, 4]
    assert ne.drop_duplicates(t).tolist() == [0, 1, 3]  # the paper's exact de-duplication keeps the first


def test_2nn_deletion_equals_the_loop_on_faiss():
    """The deletion loop of the authors' code (their nouns script), run on faiss's IndexFlatL2 as the authors'
    code does, on
    unit rows with a triplicate, duplicates and near-duplicates: the same rows survive."""
    faiss = pytest.importorskip('faiss')
    x = F.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(1)), dim=1).numpy()
    x[10] = x[3]
    x[50] = x[3]                                   # a triplicate
    x[120] = x[7]                                  # a duplicate
    x[130] = F.normalize(torch.as_tensor(x[8] + 1e-3), dim=0).numpy()  # a near-duplicate: kept by both
    x = np.ascontiguousarray(x)
    keep = np.arange(len(x))
    while True:
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x[keep])
        _, nn = index.search(x[keep], 2)
        first = nn[:, 0]
        drop = np.unique(first[first != np.arange(len(keep))])
        if not len(drop):
            break
        keep = np.delete(keep, drop)
    ours = ne.delete_2nn(x)
    assert ours.tolist() == keep.tolist()
    assert 3 not in ours and 10 not in ours and 50 in ours and 7 not in ours and 120 in ours and 130 in ours


# -----------------------------------------------------------------------------
# K-means: random starts, every one of the fixed iterations
def test_released_kmeans_schedule_runs_every_iteration(capsys):
    x = F.normalize(torch.randn(400, 8, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    ne.spherical_kmeans(x, 5, iters=30, restarts=2, seed=0, tol=0.0, init='random')
    out = capsys.readouterr().out
    assert out.count('30 iterations') == 2  # tol = 0: no early stop, as faiss's niter
    ne.spherical_kmeans(x, 5, iters=30, restarts=1, seed=0, tol=1e-5, init='k-means++')
    assert '30 iterations' not in capsys.readouterr().out  # ours stops once the objective settles
    assert tuple(ne.RELEASED_DEFAULTS[k][1] for k in ('KMEANS_ITERS', 'KMEANS_RESTARTS', 'KMEANS_TOL', 'KMEANS_INIT')) \
        == (300, 10, 0.0, 'random')


@needs_wordnet
def test_released_words_are_the_authors_case_sensitive_lemmas(tmp_path):
    words, _, source = ne.read_words('wordnet', str(tmp_path), released=True)
    assert len(words) == 119034 and len({w.lower() for w in words}) == 117798 and 'case kept' in source
    assert {'capital_of_Connecticut', "cat's_foot", 'Aachen'} <= set(words)
    csv = tmp_path / 'WordNet_Nouns.csv'  # the authors' file: a header line 'Noun', then one lemma a line
    csv.write_text('Noun\nnational_service\ncat\'s_foot\nAachen\n')
    assert ne.read_words(str(csv))[0] == ['national_service', "cat's_foot", 'Aachen']


# -----------------------------------------------------------------------------
# train.py: drop_last, the clamped loss, the views of each epoch, normalised inputs
def _steps(monkeypatch, released, n=10, batch=4):
    monkeypatch.setattr(train, 'RELEASED', released)
    monkeypatch.setattr(train, 'BATCH_SIZE', batch)
    monkeypatch.setattr(train, 'EPOCHS', 2)
    monkeypatch.setattr(train, 'WARMUP', 1)
    calls = []
    real = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, 'step', lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    x = np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32)
    aug = np.stack([x, x + 0.1], 1).astype(np.float16)
    e = F.normalize(torch.randn(n, 5, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    train.train_heads(8, x, aug, e, 'cpu', 0.8, 0.97)
    return len(calls)


def test_drop_last_steps(monkeypatch):
    assert _steps(monkeypatch, released=True) == 2 * 2        # 10 images, batch 4: two full batches an epoch
    assert _steps(monkeypatch, released=False) == 3 * 2       # and the batch of 2 as well


def test_clamped_loss_equals_plain_where_nothing_clamps_and_by_hand_where_it_does():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.2], [0.1, 1.0], [-1.0, 0.5]])
    pos = torch.eye(3, dtype=torch.bool)
    assert torch.allclose(train.bcl_term(a, b, pos, 0.8), train.bcl_term(a, b, pos, 0.8, clamp=True), atol=1e-6)
    # tau2 = 0.001: row 0's softmax puts ~1 on item 0, so its positive's entry is clamped to 1 - 1e-12; row 2's
    # positive gets ~e^-1000: clamped up to 1e-12, so its loss is -log(1e-12) = 27.631
    loss = train.bcl_term(a, b, pos, 0.001, clamp=True)
    sims = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    assert sims[2].argmax() != 2 and float(loss) == pytest.approx((0 + 0 + 27.631021) / 3, abs=1e-3)


def test_views_of_each_epoch(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(train, 'EPOCHS', 60)
    for t in (0, 1, 59):  # the default extraction: 2 x EPOCHS views, views 2t and 2t+1 at epoch t
        v1, v2 = train.pick_views(5, 120, gen, t)
        assert v1.tolist() == [2 * t] * 5 and v2.tolist() == [2 * t + 1] * 5
    v1, v2 = train.pick_views(1000, 6, gen, 3)  # fewer: a random pair of distinct stored views
    assert (v1 != v2).all() and set(v1.tolist()) == set(range(6))
    monkeypatch.setattr(train, 'RELEASED', True)  # the authors': one fixed pair, every epoch
    v1, v2 = train.pick_views(5, 120, gen, 7)
    assert v1.tolist() == [0] * 5 and v2.tolist() == [1] * 5


def test_released_settings_resolve_together():
    def released_settings(cfg):  # train.py's table, resolved by the one shared function
        return configurator.released_defaults(cfg, train.RELEASED_DEFAULTS)
    assert released_settings(dict(RELEASED=False)) == dict(T1_READING='distance', VIEW_RECIPE='simclr',
                                                                 NORM_INPUTS=False)
    assert released_settings(dict(RELEASED=True)) == dict(T1_READING='similarity', VIEW_RECIPE='released',
                                                                NORM_INPUTS=True)
    # each one also on its own, over --released
    assert released_settings(dict(RELEASED=True, T1_READING='distance', NORM_INPUTS=False)) == dict(
        T1_READING='distance', VIEW_RECIPE='released', NORM_INPUTS=False)


# -----------------------------------------------------------------------------
# the view recipes, against torchvision pipelines written here from the authors' data loaders
def _same_under_seed(ours, ref, img, seed):
    torch.manual_seed(seed)
    a = ours(img)
    torch.manual_seed(seed)
    b = ref(img)
    return torch.equal(a, b)


def test_released_view_recipes_equal_torchvision_pipelines():
    from PIL import Image
    from torchvision import transforms as T
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    bicubic = T.InterpolationMode.BICUBIC
    plain, aug = views.released_views('cifar10')
    ref_plain = T.Compose([T.Resize(224, interpolation=bicubic), T.CenterCrop(224), T.ToTensor(), norm])
    ref_aug = T.Compose([T.Resize(224, interpolation=bicubic), T.RandomHorizontalFlip(0.5),
                         T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.7), T.RandomGrayscale(0.2),
                         T.RandomApply([T.GaussianBlur(3, (0.1, 2.0))], p=0.5), T.ToTensor(), norm])
    assert torch.equal(plain(img), ref_plain(img)) and plain(img).shape == (3, 224, 224)
    assert all(_same_under_seed(aug, ref_aug, img, s) for s in range(8))
    plain, aug = views.released_views('mscoco')
    ref_plain = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    ref_aug = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.RandomHorizontalFlip(0.5), T.ToTensor(), norm])
    assert torch.equal(plain(img), ref_plain(img))
    assert all(_same_under_seed(aug, ref_aug, img, s) for s in range(8))
    assert not _same_under_seed(aug, ref_aug, img, 0) or not torch.equal(aug(img), aug(img))  # really random


# -----------------------------------------------------------------------------
# the authors' split files, generated small
def _write_img(path, seed):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)


def test_cifar10_train_index_split(tmp_path):
    images = dataset.Images([f'cifar10/{i}' for i in range(60000)], np.eye(10, dtype=np.int8)[np.arange(60000) % 10])
    (tmp_path / 'train_index.txt').write_text('\n'.join(map(str, [49999, 3, 17, 0])) + '\n')
    q, r, t = dataset.read_split_dir(str(tmp_path), images)
    assert q.tolist() == list(range(50000, 60000)) and r.tolist() == list(range(50000))
    assert t.tolist() == [0, 3, 17, 49999]
    (tmp_path / 'train_index.txt').write_text('50000\n')  # beyond the training batches
    with pytest.raises(dataset.DataError, match=r'train_index.txt: 1 indices outside 0..49999'):
        dataset.read_split_dir(str(tmp_path), images)


@pytest.mark.parametrize('v73', [False, True])
def test_flickr25k_mat_h5_and_index_files(tmp_path, v73):
    import h5py
    import scipy.io
    rng = np.random.default_rng(0)
    pics = rng.integers(0, 256, (20, 6, 8, 3), dtype=np.uint8)          # N x H x W x 3
    labels = (rng.random((20, 24)) < 0.2).astype(np.uint8)
    with h5py.File(tmp_path / 'mirflickr25k-iall.mat', 'w') as f:
        f['IAll'] = np.transpose(pics, (0, 3, 2, 1))                     # stored N x 3 x W x H, as MATLAB writes it
    if v73:
        with h5py.File(tmp_path / 'mirflickr25k-lall.mat', 'w') as f:
            f['LAll'] = labels.T
    else:
        scipy.io.savemat(tmp_path / 'mirflickr25k-lall.mat', {'LAll': labels})
    images = dataset.load_images('flickr25k', str(tmp_path))
    assert len(images) == 20 and np.array_equal(images.labels, labels)
    assert np.array_equal(np.asarray(images.load(7)), pics[7])
    split = tmp_path / 'split'
    split.mkdir()
    (split / 'query_index.txt').write_text('0\n1\n2\n')
    (split / 'retrieval_index.txt').write_text('\n'.join(map(str, range(3, 20))) + '\n')
    (split / 'train_index.txt').write_text('3\n5\n9\n')
    q, r, t = dataset.read_split_dir(str(split), images)
    assert q.tolist() == [0, 1, 2] and len(r) == 17 and t.tolist() == [3, 5, 9]
    (split / 'train_index.txt').write_text('2\n5\n')  # a query image in train
    with pytest.raises(dataset.DataError, match=r'1 query images of .*query_index.txt are also in .*train_index.txt'):
        dataset.read_split_dir(str(split), images)


def test_nuswide_dsdh_lists_with_onehot_labels(tmp_path, capsys):
    data, split = tmp_path / 'nus', tmp_path / 'split'
    split.mkdir()
    names = [f'images/{i:04d}_{i * 7}.jpg' for i in range(12)]
    for i, n in enumerate(names):  # on disk as Flickr/<concept>/<file>, as the authors' code maps them
        _write_img(str(data / 'Flickr' / f'concept{i % 3}' / os.path.basename(n)), i)
    onehot = np.eye(21, dtype=int)[np.arange(12) % 21]
    parts = dict(test=[0, 1], database=list(range(2, 12)), train=[2, 5, 7])
    for part, idx in parts.items():
        (split / f'{part}_img.txt').write_text(''.join(names[i] + '\n' for i in idx))
        rows = (' ' + ' '.join(map(str, onehot[i])) + '\n' for i in idx)
        (split / f'{part}_label_onehot.txt').write_text(''.join(rows))
    images = dataset.load_images('nuswide', str(data), split_dir=str(split))
    assert len(images) == 12 and images.labels.shape == (12, 21)
    assert all(n.startswith('Flickr/') for n in images.names)
    q, r, t = dataset.read_split_dir(str(split), images)
    assert [images.listed[i] for i in q] == [names[0], names[1]] and len(r) == 10
    assert [images.listed[i] for i in t] == [names[2], names[5], names[7]]
    assert np.array_equal(images.labels[q], onehot[[0, 1]])
    (split / 'train_img.txt').write_text(names[0] + '\n' + names[1] + '\n')  # the query set itself
    (split / 'train_label_onehot.txt').write_text((' ' + ' '.join(map(str, onehot[0])) + '\n') * 2)
    with pytest.raises(dataset.DataError, match=r'2 query images of .*test_img.txt are also in .*train_img.txt'):
        dataset.read_split_dir(str(split), dataset.load_images('nuswide', str(data), split_dir=str(split)))


def test_mscoco_deephash_lists(tmp_path, capsys):
    data, split = tmp_path / 'coco', tmp_path / 'split'
    split.mkdir()
    names = [f'train2014/COCO_train2014_{i:012d}.jpg' for i in range(8)] + [f'val2014/COCO_val2014_{i:012d}.jpg'
                                                                            for i in range(4)]
    for i, n in enumerate(names):
        _write_img(str(data / n), i)
    lab = (np.random.default_rng(0).random((12, 80)) < 0.1).astype(int)
    lab[:, 0] = 1

    def write(part, idx):
        (split / f'{part}.txt').write_text(''.join(f"{names[i]} {' '.join(map(str, lab[i]))}\n" for i in idx))
    write('test', [8, 9, 10, 11])
    write('database', list(range(8)))
    write('train', [0, 1, 2, 11])  # one train image outside retrieval: reported, not refused...
    with pytest.raises(dataset.DataError, match='also in'):  # ...but it is a query image, which is refused
        dataset.read_split_dir(str(split), dataset.load_images('mscoco', str(data), split_dir=str(split)))
    write('train', [0, 1, 2])
    images = dataset.load_images('mscoco', str(data), split_dir=str(split))
    q, r, t = dataset.read_split_dir(str(split), images)
    assert len(images) == 12 and len(q) == 4 and len(r) == 8 and len(t) == 3
    assert np.array_equal(images.labels[q], lab[8:]) and images.names[q[0]] == names[8]
    write('database', list(range(2, 8)))  # train images 0, 1 outside retrieval
    images = dataset.load_images('mscoco', str(data), split_dir=str(split))
    capsys.readouterr()
    dataset.read_split_dir(str(split), images)
    assert 'note: 2 of 3 train images of' in capsys.readouterr().out


# -----------------------------------------------------------------------------
# end to end: the three scripts with --released on the generated image set
def test_released_end_to_end(image_folder, tmp_path):
    cache = str(tmp_path / 'cache')
    ext = run_script('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}', '--backbone=tiny-test',
                     '--backbone_pretrained=random', f'--cache_dir={cache}', '--num_workers=0', '--released')
    assert "on this CPU it runs in fp32" in ext.stdout and 'views=2' in ext.stdout.splitlines()[-1]
    fdir = os.path.join(cache, 'folder', 'tiny-test-random-released')
    aug = np.load(os.path.join(fdir, 'train_aug_split_s0.npy'))
    assert aug.shape == (200, 2, 32) and aug.dtype == np.float16
    meta = json.load(open(os.path.join(fdir, 'images.npy.json')))['settings']
    assert '0.485' in meta['transform'] and 'Resize(size=37' in meta['transform']  # ImageNet normalisation, 256/224
    nouns = run_script('nouns_embed.py', *TINY, '--vocab=imagenet', '--n_k=40', f'--cache_dir={cache}', '--released',
                       '--threads=1')
    last = nouns.stdout.strip().splitlines()[-1]
    assert 'reading=similarity' in last and 'the similarity reading (authors\' code, cos > T1) keeps' in nouns.stdout
    res = dict(kv.split('=', 1) for kv in last.split()[1:])
    assert int(res['t_com']) == int(res['t_rep']) == int(res['t_rep_similarity']) > 0
    sel = json.load(open(os.path.join(selection_dir(cache, 'imagenet', 'tiny-test', 'random', 40, 0.9, True,
                                                       'similarity'), 'selection.json')))
    assert sel['kmeans']['iters'] == 300 and sel['kmeans']['restarts'] == 10
    assert sel['config']['KMEANS_INIT'] == 'random' and sel['config']['KMEANS_TOL'] == 0.0
    run_script('train.py', '--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', *TINY,
               '--vocab=imagenet', '--n_k=40', f'--cache_dir={cache}', '--released', '--bits=16',
               '--epochs=8', '--warmup=2', '--batch_size=64', f'--results={tmp_path}/results.jsonl',
               f'--run_dir={tmp_path}/run')
    line = [json.loads(l) for l in open(tmp_path / 'results.jsonl')][0]
    cfg = line['config']
    assert cfg['RELEASED'] and cfg['T1_READING'] == 'similarity' and cfg['VIEW_RECIPE'] == 'released'
    assert cfg['NORM_INPUTS'] is True
    # the printed and recorded MAP is the MAP of the codes the run saved, and above chance (0.1, 10 classes)
    assert line['map'] == pytest.approx(saved_map(f'{tmp_path}/run/16bits'), abs=1e-6) and line['map'] > 0.1 + 0.3
    # the default run does not pick up the released caches: another feature folder, another selection
    proc = run_script('train.py', '--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', *TINY,
                      '--vocab=imagenet', '--n_k=40', f'--cache_dir={cache}', '--bits=16', '--epochs=1', '--warmup=0',
                      check=False)
    assert proc.returncode == 1 and 'tiny-test-random/images.npy does not exist' in proc.stderr


def test_reproduce_passes_released_and_the_reading(tmp_path):
    proc = run_script('reproduce.py', '--table=fig5a', '--datasets=cifar10', '--dry_run', '--released',
                      '--t1_reading=distance', f'--out_dir={tmp_path}', f'--cache_dir={tmp_path}/cache')
    cmds = [l for l in proc.stdout.splitlines() if l.startswith('would run: ')]
    assert len(cmds) == 5 and all('--released=true' in c and '--t1_reading=distance' in c for c in cmds)
    import reproduce
    s = dict(BACKBONE='ViT-B-16', BACKBONE_PRETRAINED='openai', CLIP_MODEL='ViT-B-16', CLIP_PRETRAINED='openai',
             CACHE_DIR=str(tmp_path), DATASET='cifar10', RELEASED=True)
    why = reproduce.missing_features(s)  # the released features live apart, and the advice says how to make them
    assert 'ViT-B-16-openai-released/images.npy.json is missing' in why and ' --released ' in why
    cmd = reproduce.nouns_command(str(tmp_path), 'wordnet', 'ViT-B-16', 'openai', 800, 0.9, True, 'distance')
    assert '--released=true' in cmd and '--t1_reading=distance' in cmd
