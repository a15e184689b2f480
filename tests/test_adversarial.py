"""Adversarial input (#33): nothing stale is trusted, nothing crashes on a user's input, every message
names the file or setting at fault and the way out, and nothing done is lost. One test per case of the
issue, through the real command lines, with the exact line a user reads."""
import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import cache
from conftest import ROOT, fake_run, make_image_folder, noun_settings, run_script, write_feature_set
from conftest import one_error_line as error

MODELS = ['--backbone=tiny-test', '--backbone_pretrained=random', '--clip_model=tiny-test', '--clip_pretrained=random']
TINY = MODELS[2:]


def extract(data, cache_dir, *args, check=True):
    return run_script('dataset_extract.py', '--dataset=folder', *MODELS, f'--data_path={data}',
                      f'--cache_dir={cache_dir}', '--query=2', '--train=4', '--num_workers=0', '--aug_views=0', *args,
                      check=check)


def train(cache_dir, *args, check=True):
    return run_script('train.py', '--dataset=folder', *MODELS, f'--cache_dir={cache_dir}', '--bits=8', '--epochs=2',
                      '--warmup=1', '--batch_size=16', *args, check=check)


@pytest.fixture(scope='module')
def search_run(tmp_path_factory):
    """A run search.py can index with (Hv on tiny-test's 32-d features, 8 bits), trained on generated features."""
    tmp = tmp_path_factory.mktemp('search_run')
    write_feature_set(str(tmp / 'c'), dim=32)
    train(tmp / 'c', '--external=imgk', '--aug=false', '--epochs=1', '--warmup=0', f'--run_dir={tmp}/run',
          f'--results={tmp}/r.jsonl')
    return str(tmp / 'run')


@pytest.fixture
def small(tmp_path):
    """Four classes of ten generated images."""
    return make_image_folder(str(tmp_path / 'img'), 4, 10)


# -----------------------------------------------------------------------------
# failures
def test_case1_views_of_old_features_are_removed_and_refused(small, tmp_path):
    c = tmp_path / 'c'
    fdir = c / 'folder' / 'tiny-test-random'
    views, feats = fdir / 'train_aug_split_s0.npy', fdir / 'images.npy'
    extract(small, c, '--aug_views=2')
    shutil.copy(views, tmp_path / 'old.npy')
    shutil.copy(str(views) + '.json', tmp_path / 'old.npy.json')
    out = extract(small, c, '--aug_views=0', '--precision=bf16', '--force').stdout
    assert (f"removed the augmented views {views} was made with precision='fp32', but {feats} has precision='bf16': "
            f"a product of other features is not kept beside them") in out
    assert not os.path.exists(views) and not os.path.exists(str(views) + '.json')
    shutil.copy(tmp_path / 'old.npy', views)  # as the old extraction left it beside the new features
    shutil.copy(tmp_path / 'old.npy.json', str(views) + '.json')
    assert error(train(c, '--external=imgk', f'--run_dir={tmp_path}/run', f'--results={tmp_path}/r.jsonl',
                       check=False)) == (
        f"error: stale or incomplete cache: {views} was made with precision='fp32', but {feats} has "
        f"precision='bf16'. Rerun dataset_extract.py --dataset=folder --backbone=tiny-test (AUG_VIEWS >= 1) with "
        f"--force, or change CACHE_DIR")


def test_case2_a_file_name_that_is_not_utf8(small, search_run, tmp_path):
    name = os.fsdecode(b'caf\xe9.png')  # how os.listdir hands Python a latin-1 name
    shutil.copy(os.path.join(small, 'class01', '000.png'), os.path.join(small, 'class01', name))
    c = tmp_path / 'c'
    assert 'images=41' in extract(small, c).stdout
    with open(c / 'folder' / 'names.txt', 'rb') as f:
        assert b'class01/caf\xe9.png\n' in f.read()  # stored as its bytes
    assert f'class01/{name}' in cache.image_names(str(c), 'folder', 41)  # read back to the same name
    assert 'reusing' in extract(small, c).stdout  # its fingerprint is stable
    index = str(tmp_path / 'index')
    run_script('search.py', f'--run={search_run}', '--bits=8', f'--images={small}', f'--index={index}')
    out = run_script('search.py', f'--index={index}', f'--item=class01/{name}', '--topk=1').stdout
    assert 'hit query=0 rank=1 distance=0 name=class01/caf\\xe9.png' in out


# -----------------------------------------------------------------------------
# weak cases
def test_case3_a_hand_edited_sidecar_is_refused_by_every_reader(tmp_path):
    import external
    write_feature_set(str(tmp_path), dim=32)
    feats = tmp_path / 'folder' / 'tiny-test-random' / 'images.npy'
    meta = json.load(open(str(feats) + '.json'))
    meta['settings']['backbone'] = 'ViT-B-16'
    json.dump(meta, open(str(feats) + '.json', 'w'))
    want = (f"stale or incomplete cache: {feats} was made with backbone='ViT-B-16', but this run has "
            f"backbone='tiny-test'. Rerun dataset_extract.py --dataset=folder --backbone=tiny-test "
            f"--backbone_pretrained=random with --force, or change CACHE_DIR")
    assert error(train(tmp_path, '--method=lsh', f'--results={tmp_path}/r.jsonl', f'--run_dir={tmp_path}/run',
                       check=False)) == f"error: {want}"
    cfg = dict(CACHE_DIR=str(tmp_path), DATASET='folder', CLIP_MODEL='tiny-test', CLIP_PRETRAINED='random',
               EXTERNAL='imgk', SPLIT_SEED=0, SPLIT_DIR='', VOCAB='wordnet', RELEASED=False)
    with pytest.raises(cache.CacheError) as e:  # the imgk vocabulary of train.py, eval_hash.py and search.py
        external.run_vocabulary(cfg)
    assert str(e.value) == want
    nouns = os.path.join(cache.vocab_dir(str(tmp_path), 'wordnet', 'tiny-test', 'random'), 'noun_feats.npy')
    cache.save_array(nouns, np.eye(4, 32, dtype=np.float32), dict(noun_settings(), clip_model='ViT-B-32'), 'test')
    with pytest.raises(cache.CacheError, match=r"was made with clip_model='ViT-B-32', but this run has "
                                               r"clip_model='tiny-test'"):
        external.run_vocabulary(dict(cfg, EXTERNAL='ek'))


def test_case4_hidden_folders_and_the_cache_are_not_classes_one_class_warns(small, tmp_path):
    os.makedirs(os.path.join(small, '.ipynb_checkpoints'))
    shutil.copy(os.path.join(small, 'class00', '000.png'), os.path.join(small, '.ipynb_checkpoints', '000.png'))
    with open(os.path.join(small, 'class00', '._000.png'), 'wb') as f:  # macOS's AppleDouble twin
        f.write(b'\x00\x05\x16\x07 not an image')
    inside = os.path.join(small, 'cache')
    assert 'images=40' in extract(small, inside).stdout
    out = extract(small, inside).stdout  # the cache inside the image folder is not a class
    assert f"note: {inside} is the cache (--cache_dir), not a class: left out" in out and 'images=40' in out
    one = tmp_path / 'one'
    shutil.copytree(os.path.join(small, 'class02'), one / 'class02')
    warning = ("warning: every image has the label 'class02' (one class): every retrieval item is relevant to every "
               "query, so MAP is 1.0 whatever the codes; give the dataset two or more classes to measure retrieval")
    assert warning in extract(one, tmp_path / 'c1', '--query=2', '--train=4').stdout.splitlines()
    out = train(tmp_path / 'c1', '--method=lsh', f'--results={tmp_path}/r.jsonl', f'--run_dir={tmp_path}/r').stdout
    assert warning in out.splitlines() and 'map@1000=1.0000' in out


def test_case5_split_labels_that_disagree_with_the_class_folders(small, tmp_path):
    split = tmp_path / 'split'
    split.mkdir()
    names = [f'class{c:02d}/{i:03d}.png' for c in range(4) for i in range(10)]
    lab = {n: ' '.join('1' if int(n[5:7]) == c else '0' for c in range(4)) for n in names}
    query, rest = [n for n in names if n.endswith(('000.png', '001.png'))], [n for n in names if n[-7:-4] > '001']
    (split / 'query.txt').write_text(''.join(f'{n} {lab[n]}\n' for n in query))
    (split / 'retrieval.txt').write_text(''.join(f'{n} {lab[n]}\n' for n in rest))
    wrong = rest[::4][2]
    assert wrong.startswith('class01/')
    lab[wrong] = '0 0 1 0'  # a wrong label on line 3 of train.txt
    (split / 'train.txt').write_text(''.join(f'{n} {lab[n]}\n' for n in rest[::4]))
    assert error(extract(small, tmp_path / 'c', f'--split_dir={split}', check=False)) == (
        f"error: {split}/train.txt:3: the labels of {wrong} (0 0 1 0) disagree with the dataset's own "
        f"(0 1 0 0, from its class folders or list file): correct them in {split}/train.txt (training and MAP use "
        f"the dataset's labels)")


def _nouns(cache_dir, words, *args, check=True):
    return run_script('nouns_embed.py', *TINY, f'--vocab={words}', '--n_k=3', f'--cache_dir={cache_dir}',
                      '--threads=1', *args, check=check)


def test_case6_a_byte_order_mark_is_not_part_of_the_first_word(tmp_path):
    words = tmp_path / 'bom.txt'
    words.write_bytes(b'\xef\xbb\xbfcat\ndog\nbird\nfish\n')
    assert 'read=4 unique=4' in _nouns(tmp_path, words).stdout
    vdir = cache.vocab_dir(str(tmp_path), str(words), 'tiny-test', 'random')
    with open(os.path.join(vdir, 'noun_words.txt'), 'rb') as f:
        assert f.read() == b'cat\ndog\nbird\nfish\n'


def test_case7_a_product_with_a_missing_part_is_rebuilt(tmp_path):
    words = tmp_path / 'words.txt'
    words.write_text(''.join(f'thing{i}\n' for i in range(20)))
    _nouns(tmp_path, words)
    sdir = cache.selection_dir(str(tmp_path), str(words), 'tiny-test', 'random', 3, 0.9)
    listed = os.path.join(sdir, 'selected_words.txt')
    before = open(listed, 'rb').read()
    os.remove(listed)
    out = _nouns(tmp_path, words).stdout
    assert (f"rebuilding {sdir}/selected_feats.npy: {listed}, written with selected_feats.npy, is missing (deleted?)"
            in out.splitlines())
    assert open(listed, 'rb').read() == before


def test_case8_a_second_extraction_into_the_same_cache_stops(small, tmp_path):
    d = tmp_path / 'c' / 'folder'
    os.makedirs(d)
    with open(d / '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running dataset_extract.py holds it
        proc = extract(small, tmp_path / 'c', check=False)
    assert error(proc) == (f"error: another dataset_extract.py is extracting into {d}: wait for it to finish, then "
                           f"run this again (it reuses what that one made), or give another --cache_dir")
    assert os.listdir(d) == ['.lock']  # it wrote nothing


def test_case9_a_step_with_nothing_to_build_writes_nothing(small, tmp_path):
    """What lets a read-only cache whose products all exist be read (root, who runs the tests here,
    may write anywhere, so the cache is watched instead of made read-only)."""
    c = tmp_path / 'c'
    extract(small, c)

    def files():  # every file and folder, hidden ones too
        found = [os.path.join(d, n) for d, dirs, names in os.walk(c) for n in dirs + names]
        return {p: (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in found}
    before = files()
    out = extract(small, c).stdout
    assert 'reusing' in out and files() == before


def test_case10_a_full_disk_while_writing_results_names_results(tmp_path):
    """train.py's own error handler (its __main__), with the disk full only for the results file."""
    write_feature_set(str(tmp_path))
    results = tmp_path / 'out' / 'results.jsonl'
    code = (f"import errno, os, runpy, sys\nfsync = os.fsync\n"
            f"def full(fd):\n"
            f"    if 'results.jsonl' in os.readlink(f'/proc/self/fd/{{fd}}'):\n"
            f"        raise OSError(errno.ENOSPC, 'No space left on device')\n"
            f"    fsync(fd)\n"
            f"os.fsync = full\nsys.argv = ['train.py'] + sys.argv[1:]\n"
            f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, '-c', code, '--dataset=folder', *MODELS, f'--cache_dir={tmp_path}',
                           '--method=lsh', '--bits=8', f'--results={results}', f'--run_dir={tmp_path}/run'],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert error(proc) == (f"error: no space left on the device while writing {results} (the disk is full): free "
                           f"some space (or choose another --results) and run the same command again; nothing "
                           f"half-written is kept, and an extraction resumes where it stopped")
    assert not results.exists()


def test_case11_eval_hash_names_the_folder_and_the_file(tmp_path):
    a = tmp_path / 'a'
    fake_run(a, 'folder')
    codes = a / '16bits' / 'codes.npz'

    def ev(*args):
        return error(run_script('eval_hash.py', *args, f'--out={tmp_path}/cmp', '--examples=0', check=False))
    assert ev(f'--runs={a},{tmp_path}/typo', '--bits=16') == (
        f"error: {tmp_path}/typo is not a train.py run folder (it holds no <L>bits/codes.npz): give --runs the "
        f"folders train.py wrote, e.g. runs/<dataset>/<name>_<key>")
    os.makedirs(a / '32bits')  # a code length whose training did not finish
    assert ev(f'--runs={a}', '--bits=32') == (
        f"error: {a} has no 32-bit codes ({a}/32bits/codes.npz); its code lengths: [16]; choose --bits from those, "
        f"or train 32 bits")
    z = dict(np.load(codes))
    np.savez(codes, **dict(z, query_h=np.where(np.arange(16) == 3, np.nan, z['query_h'])))
    assert ev(f'--run={a}') == (f"error: {codes}: hash outputs hold NaN or infinite values: it is damaged or "
                                f"hand-made; rerun train.py for that code length")
    np.savez(codes, **dict(z, query_labels=z['query_labels'][:9]))
    assert ev(f'--run={a}') == (f"error: {codes}: labels (9, 4) / (50, 4) do not match 10 queries / 50 retrieval "
                                f"items: it is damaged or hand-made; rerun train.py for that code length")


def test_case12_ctrl_c_while_indexing_keeps_what_was_encoded_and_resumes(small, search_run, tmp_path):
    """A named pipe among the images holds the indexing at a known place (after two batches of four):
    Ctrl-C there stops it with one line; the same command then encodes only the rest."""
    images = tmp_path / 'images'
    shutil.copytree(os.path.join(small, 'class00'), images)  # ten images, then the pipe
    os.mkfifo(images / 'zz.png')
    index = tmp_path / 'index'
    cmd = [sys.executable, os.path.join(ROOT, 'search.py'), f'--run={search_run}', '--bits=8', f'--images={images}',
           f'--index={index}', '--batch_size=4']
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while True:  # the pipe opens for writing once search.py waits to read it
        try:
            fd = os.open(images / 'zz.png', os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            assert e.errno == errno.ENXIO and proc.poll() is None, proc.stderr
            time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # the signal reached another of its threads: the read waits for the pipe's end
        os.close(fd)  # EOF: the read returns and Python raises the KeyboardInterrupt it holds
        fd = None
        out, err = proc.communicate(timeout=300)
    if fd is not None:
        os.close(fd)
    assert error(subprocess.CompletedProcess(cmd, proc.returncode, out, err)) == (
        f"error: interrupted (Ctrl-C) after 8 of the 11 images to encode: the index {index} keeps them; run the "
        f"same command again to encode the other 3")
    assert [e['name'] for e in json.load(open(index / 'index.json'))['images']] == [f'{i:03d}.png' for i in range(8)]
    first = np.load(index / 'codes.npy')
    os.remove(images / 'zz.png')
    out = run_script('search.py', *cmd[2:]).stdout
    assert f"index {index}: 2 images encoded, 8 kept from before, 0 dropped" in out
    assert len(np.load(index / 'codes.npy')) == 10 and np.array_equal(np.load(index / 'codes.npy')[:8], first)


def test_case13_a_copied_cache_and_run_are_the_same_run(small, search_run, tmp_path):
    import reproduce
    a, moved = tmp_path / 'a', tmp_path / 'moved'
    write_feature_set(str(a / 'c'))
    results = tmp_path / 'r.jsonl'
    train(a / 'c', '--method=lsh', f'--run_dir={a}/run', f'--results={results}')
    shutil.copytree(a, moved)
    line = json.loads(results.read_text())  # reproduce.py finds it for a cell on the copy, its inputs unchanged
    cfg = dict(line['config'], CACHE_DIR=str(moved / 'c'))
    assert reproduce.matches(line, cfg, reproduce.train_defaults()) and reproduce.changed_inputs(line, cfg) == []
    out = train(moved / 'c', '--method=lsh', f'--run_dir={moved}/run', f'--results={results}').stdout
    assert f"note: {results} held this run already (1 line); replaced" in out  # the same run: not refused
    import runs  # a run.json an older train.py wrote, its key holding CACHE_DIR, is the same run too
    held = json.load(open(moved / 'run' / 'run.json'))
    older = dict(held, key=dict(held['key'], config=dict(held['key']['config'], CACHE_DIR=str(a / 'c'))))
    (moved / 'run' / 'run.json').write_text(json.dumps(older))
    runs.claim_run_dir(str(moved / 'run'), held['sha256'], held['key'])
    assert json.load(open(moved / 'run' / 'run.json')) == held
    # indexed images that moved: drawn grey, and said
    images, index = tmp_path / 'images', tmp_path / 'index'
    shutil.copytree(os.path.join(small, 'class00'), images)
    run_script('search.py', f'--run={search_run}', '--bits=8', f'--images={images}', f'--index={index}')
    os.rename(images, tmp_path / 'elsewhere')
    out = run_script('search.py', f'--index={index}', '--item=000.png', '--topk=2').stdout
    gone = images / '000.png'
    assert (f"note: cannot draw {gone} (it does not exist): drawn grey, as is any other image that cannot be read; "
            f"if the indexed images moved, index their new folder with --run and --images") in out.splitlines()


def test_case14_a_truncated_index_is_named_and_built_anew(small, search_run, tmp_path):
    index = tmp_path / 'index'
    build = ['search.py', f'--run={search_run}', '--bits=8', f'--images={small}', f'--index={index}']
    run_script(*build)
    meta = index / 'index.json'
    meta.write_bytes(meta.read_bytes()[:200])
    line = error(run_script('search.py', f'--index={index}', '--item=class00/000.png', check=False))
    assert line.startswith(f"error: {meta} is not whole JSON (") and line.endswith(
        "; a killed write, or an edit): index again with --run and --images (the index is built anew)")
    out = run_script(*build).stdout
    assert f"note: {meta} is not whole JSON (" in out and ': building the index anew' in out
    assert f"index {index}: 40 images encoded, 0 kept from before" in out


def test_case15_a_kill_while_embedding_resumes_to_the_same_bytes(tmp_path):
    words = tmp_path / 'words.txt'
    words.write_text(''.join(f'word{i}\n' for i in range(300)))
    args = ['--batch_size=16', '--chunk_prompts=100']
    _nouns(tmp_path / 'whole', words, *args)
    cut = tmp_path / 'cut'
    vdir = cache.vocab_dir(str(cut), str(words), 'tiny-test', 'random')
    saved = os.path.join(vdir, '.progress', 'eq2_sums.npy.json')
    cmd = [sys.executable, os.path.join(ROOT, 'nouns_embed.py'), *TINY, f'--vocab={words}', '--n_k=3',
           f'--cache_dir={cut}', '--threads=1', *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not os.path.exists(saved):
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)  # frozen: what it saved can be read before it is killed
    done = json.load(open(saved))['settings']['prompts_done']
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 100 <= done < 2100 and not os.path.exists(os.path.join(vdir, 'noun_feats.npy.json'))
    out = _nouns(cut, words, *args).stdout
    assert f"resuming Eq. 2 after {done} prompts (saved by a stopped run in {saved[:-5]})" in out.splitlines()
    assert not os.path.exists(os.path.dirname(saved))  # what it saved is in noun_feats.npy now
    whole = cache.vocab_dir(str(tmp_path / 'whole'), str(words), 'tiny-test', 'random')
    ours = sorted(os.path.relpath(p, vdir) for p in glob.glob(f'{vdir}/**/*', recursive=True) if os.path.isfile(p))
    assert ours == sorted(os.path.relpath(p, whole) for p in glob.glob(f'{whole}/**/*', recursive=True)
                          if os.path.isfile(p))
    for f in ours:
        if not f.endswith('.json'):  # the sidecars also hold times
            assert open(os.path.join(vdir, f), 'rb').read() == open(os.path.join(whole, f), 'rb').read(), f
