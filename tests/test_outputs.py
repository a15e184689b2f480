"""Runs, pictures and tables never mix results made from different inputs: a run folder is keyed like
a cache, eval_hash.py draws only the images that were extracted, reproduce.py --released compares the
authors' own metric; and the messages that used to send a user the wrong way, each asserted whole."""
import fcntl
import json
import os
import shutil

import numpy as np
import pytest

import cache
from conftest import make_image_folder, run_script, write_feature_set

BASE = ['--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', '--clip_model=tiny-test',
        '--clip_pretrained=random']


def train(cache, *args, check=True):
    return run_script('train.py', *BASE, f'--cache_dir={cache}', '--epochs=2', '--warmup=1', '--batch_size=64',
                      *args, check=check)


def error(proc):
    """The one line a script ended with (it must have failed, without a traceback)."""
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# 1. a run folder holds one run
def test_a_run_folder_is_refused_to_other_inputs_then_replaced_whole(tmp_path):
    a, b, run = tmp_path / 'a', tmp_path / 'b', tmp_path / 'run'
    write_feature_set(str(a), seed=0)
    write_feature_set(str(b), seed=1)  # another dataset: other features, the same labels and split
    common = ['--method=lsh', f'--run_dir={run}', f'--results={tmp_path}/results.jsonl']
    train(a, '--bits=16,32', *common)
    first = json.load(open(run / 'run.json'))
    assert error(train(b, '--bits=16', *common, check=False)) == (
        f"error: {run} holds a run made from other settings or inputs (other features): give another --run_dir, "
        f"or --force to replace that run whole")  # what the caches hold differs, not where they lie
    assert json.load(open(run / 'run.json')) == first  # refused: nothing touched
    shutil.copytree(run / '32bits', tmp_path / 'old32')
    out = train(b, '--bits=16', *common, '--force').stdout
    assert f'replacing the run in {run}' in out
    assert sorted(os.listdir(run)) == ['.lock', '16bits', 'run.json']  # the old 32 bits went with the old run
    assert json.load(open(run / '16bits' / 'result.json'))['config']['CACHE_DIR'] == str(b)
    lines = [json.loads(l) for l in open(tmp_path / 'results.jsonl')]
    assert len({l['run_key'] for l in lines}) == 2 and all(len(l['run_key']) == 64 for l in lines)
    # a folder an older train.py could leave, two runs' code lengths in one (put together here by hand):
    # eval_hash.py refuses to score it
    shutil.copytree(tmp_path / 'old32', run / '32bits')
    proc = run_script('eval_hash.py', f'--run={run}', '--examples=0', check=False)
    assert error(proc) == (f"error: {run} mixes runs made from different settings or inputs (16 bits and 32 bits: "
                           f"other features); train each into its own --run_dir")


def test_a_second_train_py_into_the_same_folder_stops(tmp_path):
    write_feature_set(str(tmp_path / 'c'))
    run = tmp_path / 'run'
    os.makedirs(run)
    with open(run / '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        proc = train(tmp_path / 'c', '--method=lsh', '--bits=8', f'--run_dir={run}', f'--results={tmp_path}/r.jsonl',
                     check=False)
    assert error(proc) == f"error: another train.py is writing {run}: wait for it, or give another --run_dir"


# -----------------------------------------------------------------------------
# 2. eval_hash.py's pictures: the images dataset_extract.py read, or none
def test_figures_come_from_the_extracted_images_never_from_others(run, tmp_path):
    tmp, cache, rundir = run
    other = make_image_folder(str(tmp_path / 'other'), seed=7)  # the same names, other pictures
    proc = run_script('eval_hash.py', f'--run={rundir}', f'--data_path={other}', '--examples=1', check=False)
    src = json.load(open(os.path.join(cache, 'folder', 'source.json')))
    assert error(proc) == (f"error: --data_path={other}: the images under {other} are not the ones "
                           f"dataset_extract.py read into {cache}/folder (from {src['data_path']}): give --data_path "
                           f"the folder it read")
    assert not os.path.exists(os.path.join(rundir, 'top10_query0.png'))
    # without --data_path: where extraction recorded it read them, checked, and drawn
    out = run_script('eval_hash.py', f'--run={rundir}', '--examples=1').stdout
    assert 'wrote 1 pictures (Figures 6-7, 64 bits): top10_query0.png' in out


# -----------------------------------------------------------------------------
# 3. reproduce.py --released compares the authors' metric, the Hamming MAP beside it
def test_released_tables_compare_the_authors_metric(monkeypatch, tmp_path):
    import eval_hash
    import reproduce

    # the authors' evaluation on saved outputs, by hand: rank by the continuous outputs (np.argsort of
    # the negated inner products), AP@K over the relevant items retrieved
    rng = np.random.default_rng(0)
    q_h, r_h = np.tanh(rng.normal(size=(6, 16))), np.tanh(rng.normal(size=(40, 16)))
    q_y, r_y = np.eye(3)[rng.integers(0, 3, 6)], np.eye(3)[rng.integers(0, 3, 40)]
    aps = []
    for i in range(6):
        order = np.argsort(-(r_h @ q_h[i]), kind='stable')[:10]
        rel = (r_y[order] @ q_y[i]) > 0
        hits = np.cumsum(rel)
        aps.append((hits / np.arange(1, 11))[rel].sum() / max(rel.sum(), 1))
    by_hand = float(np.mean(aps))
    cont = eval_hash.map_continuous(q_h, r_h, q_y, r_y, 10)
    assert cont == pytest.approx(by_hand, abs=1e-12)
    hamming = eval_hash.mean_average_precision(eval_hash.to_codes(q_h), eval_hash.to_codes(r_h), q_y, r_y, 10)
    monkeypatch.setattr(reproduce, 'DATASETS', ('cifar10',))
    monkeypatch.setattr(reproduce, 'BITS', (16,))
    monkeypatch.setattr(reproduce, 'ROWS', ('clip',))
    mark = lambda d: f'**{d:+.3f}**' if abs(d) > 0.01 else f'{d:+.3f}'  # beyond 0.01 of the paper's: bold
    for released, want in ((True, f'{cont:.3f} (Hamming {hamming:.3f}) / 0.931 / {mark(cont - 0.931)}'),
                           (False, f'{hamming:.3f} / 0.931 / {mark(hamming - 0.931)}')):
        monkeypatch.setattr(reproduce, 'RELEASED', released)
        cells = reproduce.make_cells('1', reproduce.train_defaults(), reproduce.train_args())
        for c in cells:
            c.result, c.status = dict(map=hamming, map_continuous=cont, method='duheg'), 'trained'
        header = reproduce.measured_on(cells, {})
        lines = reproduce.markdown_table('Table 1', header, reproduce.table_rows('1'), ('cifar10',), (16,), cells, 1)
        assert lines[-2] == f'| DUH-EG, CLIP ViT-B/16, T2 = 0.97 | clip | CIFAR-10 | {want} |'
        assert ("the authors' own metric, the continuous-output MAP@K" in header) == released
        assert cells[0].line().startswith(f"cell table=1 row=clip dataset=cifar10 bits=16 seed=0 "
                                          f"{'map_continuous' if released else 'map'}=")


# -----------------------------------------------------------------------------
# 4. messages that name the step, file or setting to change, whole
def test_train_before_nouns_embed_names_step_2_and_its_settings(tmp_path):
    cache = tmp_path / 'c'
    write_feature_set(str(cache), views=2)
    sel = f'{cache}/nouns/wordnet_tiny-test_random/select_k800_t0.9/selected_feats.npy'
    assert error(train(cache, check=False)) == (
        f"error: {sel} does not exist: run nouns_embed.py first (step 2): python nouns_embed.py --vocab=wordnet "
        f"--clip_model=tiny-test --clip_pretrained=random --cache_dir={cache} --n_k=800 --t1=0.9")


def test_train_names_the_features_this_cache_holds(tmp_path):
    cache = tmp_path / 'c'
    write_feature_set(str(cache), views=2)
    proc = run_script('train.py', '--dataset=folder', f'--cache_dir={cache}', check=False)
    assert error(proc) == (
        f"error: {cache}/folder/ViT-B-16-openai/images.npy does not exist: run dataset_extract.py first (step 1): "
        f"python dataset_extract.py --dataset=folder --cache_dir={cache} --split_seed=0 --backbone=ViT-B-16 "
        f"--backbone_pretrained=openai; {cache}/folder holds the features of tiny-test-random (pass train.py the "
        f"--backbone and --backbone_pretrained, --clip_model and --clip_pretrained they were extracted with)")


@pytest.mark.parametrize('args,message', [
    (['--warmup=10', '--epochs=5'], "error: --warmup=10 must be below --epochs=5 (Eq. 10-11: T_warm < T_max)"),
    (['--lr_min=0.001'], "error: --lr_min=0.001 must be at most --lr_max=0.0001 (Eq. 10-11)"),
    (['--t1=-1'], "error: --t1=-1.0 is outside [0, 4], the range of Eq. 3's distance reading (2 - 2cos of a noun "
                  "and its centre)"),
    (['--t1=1.5', '--released'], "error: --t1=1.5 is outside [-1, 1], the range of Eq. 3's similarity reading (cos "
                                 "of a noun and its centre)")])
def test_train_settings_name_only_what_is_wrong(args, message, tmp_path):
    assert error(run_script('train.py', f'--cache_dir={tmp_path}', *args, check=False)) == message


def test_one_stored_view_is_refused_for_two_view_training(tmp_path):
    cache = tmp_path / 'c'
    write_feature_set(str(cache), views=1)
    views = f'{cache}/folder/tiny-test-random/train_aug_split_s0.npy'
    assert error(train(cache, '--external=imgk', f'--run_dir={tmp_path}/r', check=False)) == (
        f"error: {views} holds 1 view of each image; --method=duheg with --aug=true trains on two: rerun "
        f"dataset_extract.py --aug_views=2 (or more) --force, or train with --aug=false")


def test_a_failed_split_names_the_setting_and_train_names_step_1(tmp_path, image_folder):
    cache = tmp_path / 'c'
    proc = run_script('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}', *BASE[1:],
                      '--num_workers=0', '--train=35', f'--cache_dir={cache}', check=False)
    assert error(proc) == ("error: the split needs 35 train images of each class, but class 0 has 30 images outside "
                           "the query set: give dataset_extract.py a smaller --train (per class), or your own split "
                           "with --split_dir")
    assert error(train(cache, '--external=imgk', check=False)).startswith(
        f"error: {cache}/folder/split_s0/query.npy does not exist: run dataset_extract.py first (step 1): python "
        f"dataset_extract.py --dataset=folder --cache_dir={cache} --split_seed=0 --backbone=tiny-test")


def test_offline_clip_says_one_line_cut_between_words(tmp_path):
    proc = run_script('nouns_embed.py', '--vocab=imagenet', '--clip_model=ViT-B-32', f'--cache_dir={tmp_path}',
                      check=False)
    line = error(proc)
    assert 'ERROR:root' not in proc.stderr and 'Failed to download' not in proc.stderr.replace(line, '')
    why = line.split('(RuntimeError: ', 1)[1].split('). With no network', 1)[0]
    assert why.endswith(' …') and len(why) <= 202  # cut between two words, marked
    assert 'ViT-B-32.pt' in line and '--clip_pretrained=/path/to/ViT-B-32.pt' in line


def test_offline_backbone_error_names_backbone_pretrained(tmp_path):
    """The CLIP weights still at 'openai' are the backbone's: the error names --backbone_pretrained, not the CLIP's."""
    proc = run_script('dataset_extract.py', '--dataset=demo', '--clip_pretrained=random', '--aug_views=2',
                      f'--cache_dir={tmp_path}', check=False)
    line = error(proc)
    assert line.startswith("error: --backbone_pretrained='openai': cannot load CLIP ViT-B-16 weights 'openai'"), line
    assert 'or anywhere and pass --backbone_pretrained=/path/to/ViT-B-16.pt;' in line and '--clip_pre' not in line
    proc = run_script('dataset_extract.py', '--dataset=demo', '--backbone=ViT-X', f'--cache_dir={tmp_path}',
                      check=False)
    assert error(proc).startswith("error: --backbone='ViT-X' is not a CLIP model: choose one of ViT-B-16, ViT-B-32, "
                                  "tiny-test")


def test_file_system_errors_name_the_file_and_what_to_do(tmp_path, monkeypatch):
    link = tmp_path / 'imgs' / 'cats' / 'gone.png'
    os.makedirs(link.parent)
    os.symlink(tmp_path / 'nowhere.png', link)
    with pytest.raises(OSError) as e:
        os.stat(link)
    assert cache.user_error(e.value) == (f"error: {link} is a broken symbolic link (its target "
                                           f"{tmp_path}/nowhere.png does not exist): mend or remove the link, then "
                                           f"run again")
    # a writer that fails without an errno on a full disk (numpy's may): said to be a full disk
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(100, 100, 0))
    chunk = str(tmp_path / '.chunks' / 'images' / '00006.npy')
    assert cache.user_error(OSError(None, None, chunk), dict(cache_dir=str(tmp_path))) == (
        f"error: no space left on the device while writing {chunk} (the disk is full): free some space (or choose "
        f"another --cache_dir) and run the same command again; nothing half-written is kept, and an extraction "
        f"resumes where it stopped")
