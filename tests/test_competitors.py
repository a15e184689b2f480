"""Table 1's competitors (HHCH, MeCoQ, CGHash) on train.py's protocol: each, trained through the command line on
a generated feature set, beats chance by a clear margin; a run records the schedule and the settings it trained
with (they key it); its saved head is what search.py and eval_hash.py read back; the competitors' loop, spied on,
feeds each module what its interface says; bad settings stop with one line."""
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

import baselines
import eval_hash
import reproduce
import runs
import search_index
import train
from conftest import run_script, write_feature_set
from dataset import DataError

MODEL = ['--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', '--clip_model=tiny-test',
         '--clip_pretrained=random', '--bits=16', '--threads=1']
SHORT = {  # a few seconds each: short schedules, HHCH's hierarchy sized for 240 training items
    'hhch': ['--epochs=20', '--method_args=--clusters=16,8'],
    'mecoq': ['--epochs=40', '--batch_size=64'],
    'cghash': ['--epochs=100', '--batch_size=64', '--method_args=--scan_epochs=90'],  # 90 + 10 self-labelling
}
MARGIN = 0.25  # MAP@1000 above chance (1/8); measured: HHCH 0.576, MeCoQ 0.937, CGHash 0.617


@pytest.fixture(scope='module')
def competitor_runs(tmp_path_factory):
    """Each competitor trained by train.py on an 8-class feature set with 4 stored views of each training item:
    (the cache, its split, {method: (MAP@1000 printed, the result line, the run folder)})."""
    tmp = tmp_path_factory.mktemp('competitors')
    cache = str(tmp / 'cache')
    labels, split = write_feature_set(cache, views=4)
    out = {}
    for method, extra in SHORT.items():
        proc = run_script('train.py', *MODEL, f'--method={method}', *extra, f'--cache_dir={cache}',
                          f'--results={tmp}/r.jsonl', f'--run_dir={tmp}/{method}', env=dict(OMP_NUM_THREADS='1'))
        line = re.search(rf'^result dataset=folder method={method} bits=16 map@1000=([\d.]+).*$', proc.stdout, re.M)
        out[method] = float(line.group(1)), line.group(0), str(tmp / method)
    print(' '.join(f'{m}={v[0]:.4f}' for m, v in out.items()))  # the figures the README quotes
    return cache, labels, split, out


def test_competitors_beat_chance(competitor_runs):
    _, labels, (query, retrieval, _), out = competitor_runs
    chance = ((labels[query] @ labels[retrieval].T) > 0).mean()
    assert chance == pytest.approx(1 / 8)
    for method, (m, line, _) in out.items():
        assert m > chance + MARGIN, (method, m)
        assert ('AQD ranking' in line) == (method == 'mecoq'), line  # MeCoQ ranks its product-quantized codes


def test_runs_record_their_schedule_and_settings(competitor_runs):
    """EPOCHS and BATCH_SIZE as typed, else the authors'; the module's settings with --method_args applied."""
    *_, out = competitor_runs
    cfg = {m: runs.read_results(os.path.join(os.path.dirname(d), 'r.jsonl')) for m, (_, _, d) in out.items()}
    cfg = {m: [r for r in lines if r['method'] == m][0]['config'] for m, lines in cfg.items()}
    assert (cfg['hhch']['EPOCHS'], cfg['hhch']['BATCH_SIZE']) == (20, 64)  # batch: HHCH's own (options.py:20)
    assert cfg['hhch']['METHOD_SETTINGS']['CLUSTERS'] == [16, 8] and cfg['hhch']['METHOD_SETTINGS']['TAU'] == 0.3
    assert (cfg['mecoq']['EPOCHS'], cfg['mecoq']['BATCH_SIZE']) == (40, 64)
    assert cfg['mecoq']['METHOD_SETTINGS']['TRAIN_CODEBOOKS'] is True  # the paper's MeCoQ by default
    assert cfg['cghash']['METHOD_SETTINGS']['SCAN_EPOCHS'] == 90 and cfg['cghash']['EPOCHS'] == 100


def test_saved_heads_give_the_saved_codes(competitor_runs):
    """heads.pt holds each competitor's own head: search.py rebuilds it under the run's settings and hashes the
    retrieval features to the codes train.py saved; MeCoQ's saved codes give the MAP train.py printed, by AQD."""
    cache, _, (query, retrieval, _), out = competitor_runs
    x = np.load(os.path.join(cache, 'folder', 'tiny-test-random', 'images.npy'))
    for method in ('hhch', 'cghash'):
        z = np.load(os.path.join(out[method][2], '16bits', 'codes.npz'))
        cfg, hv, he, _ = search_index.load_run(out[method][2], 16)
        assert he is None and type(hv).__module__ == f'methods.{method}'
        codes = search_index.hash_features(x[retrieval], hv, cfg)
        np.testing.assert_array_equal(codes, eval_hash.pack(z['retrieval_h']))
    z = np.load(os.path.join(out['mecoq'][2], '16bits', 'codes.npz'))
    assert z['retrieval_codes'].dtype == np.uint8 and z['codebooks'].shape == (2, 256, 16) and str(z['aqd']) == 'ip'
    aqd = eval_hash.map_aqd(z['query_h'], z['retrieval_codes'], z['codebooks'], z['query_labels'],
                            z['retrieval_labels'], 1000, 'ip')
    assert aqd == pytest.approx(out['mecoq'][0], abs=1e-4)
    with pytest.raises(DataError, match='product-quantized codes'):  # search.py indexes binary codes only
        search_index.load_run(out['mecoq'][2], 16)


def test_reproduce_trains_a_competitor_cell_once(competitor_runs, tmp_path):
    """reproduce.py predicts the config train.py records for a competitor's cell (its schedule, its settings), so a
    second run finds the cell done and trains nothing."""
    cache = competitor_runs[0]
    args = ['--table=baselines', '--rows=mecoq', '--datasets=folder', '--bits=16', '--competitor_epochs=5',
            '--train_args=--batch_size=64 --threads=1', f'--cache_dir={cache}', f'--out_dir={tmp_path}',
            '--clip_model=tiny-test', '--clip_pretrained=random']
    first = run_script('reproduce.py', *args)
    assert 'status=trained' in first.stdout and '--epochs=5' in first.stdout, first.stdout[-2000:]
    again = run_script('reproduce.py', *args)
    assert 'status=skipped' in again.stdout and 'train: python' not in again.stdout, again.stdout[-2000:]


def test_method_config_authors_schedule_unless_given():
    cfg = dict(reproduce.train_defaults(), METHOD='hhch')
    got = train.method_config(cfg, set())
    assert (got['EPOCHS'], got['BATCH_SIZE']) == (80, 64) and got['METHOD_SETTINGS']['CLUSTERS'] == (150, 120, 80)
    assert train.method_config(cfg, {'EPOCHS'})['EPOCHS'] == 60 == cfg['EPOCHS']  # typed: train.py's value
    other = train.method_config(dict(cfg, METHOD_ARGS='--clusters=20,10'), set())
    key = lambda c: runs.run_key(dict(cfg, **c), {})[0]
    assert key(got) != key(other)  # a changed setting of the method's file changes the run key
    assert train.method_config(dict(cfg, METHOD='duheg'), set()) == {}
    assert train.method_config(dict(cfg, METHOD='mecoq'), set())['EPOCHS'] == 50
    assert train.method_config(dict(cfg, METHOD='cghash'), set())['BATCH_SIZE'] == 1024


def test_bad_settings_stop_with_one_line(monkeypatch, tmp_path):
    for k, v in dict(METHOD='mecoq', DATASET='folder', BITS=(16,), METHOD_ARGS='', EPOCHS=60, BATCH_SIZE=512).items():
        monkeypatch.setattr(train, k, v)
    cfg = dict(reproduce.train_defaults(), METHOD='mecoq', BATCH_SIZE=256)
    monkeypatch.setattr(sys, 'argv', ['train.py', '--method=mecoq', '--batch_size=256'])
    with pytest.raises(SystemExit, match="MeCoQ's code memory takes batches of at most its BATCH_SIZE, 128"):
        train.check_method(dict(cfg))
    monkeypatch.setattr(train, 'BITS', (16, 12))
    monkeypatch.setattr(sys, 'argv', ['train.py', '--method=mecoq'])
    with pytest.raises(SystemExit, match='--bits=12: MeCoQ needs a code length that is a multiple of 8'):
        train.check_method(dict(cfg))
    with pytest.raises(SystemExit, match=r"methods/hhch.py\): unknown setting --clusterz; did you mean --clusters"):
        baselines.method_settings('hhch', '--clusterz=3')
    with pytest.raises(SystemExit, match='--method=dch has no settings of its own'):
        baselines.method_settings('dch', '--tau=1')
    write_feature_set(str(tmp_path), views=2)
    proc = run_script('train.py', *MODEL, '--method=hhch', '--aug=false', f'--cache_dir={tmp_path}', check=False)
    assert proc.returncode == 1 and 'trains on two augmented views' in proc.stderr and 'Traceback' not in proc.stderr


# -----------------------------------------------------------------------------
# the competitors' loop, spied on through a module that records what it is given
def spy_module(seen):
    """A competitor module with the interface train.train_competitor calls: two phases (a new optimiser at epoch
    2), a distinct rate per step, and records of every call."""
    class Head(torch.nn.Module):
        def __init__(self, in_dim, bits):
            super().__init__()
            self.lin = torch.nn.Linear(in_dim, bits)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    class SGD(torch.optim.SGD):
        def step(self, *a, **k):
            seen['lr'].append(self.param_groups[0]['lr'])
            return super().step(*a, **k)

    def optimizer(head, epoch=0):
        seen['opt'].append(epoch)
        return SGD(head.parameters(), lr=0.5)

    def epoch_start(head, x_train, aug, epoch, gen, device):
        seen['start'].append((epoch, len(seen['batch'])))
        return dict(epoch=epoch)

    def batch_loss(head, x, v1, v2, idx, state, epoch, gen):
        seen['batch'].append(dict(x=x, v1=v1, v2=v2, idx=idx.clone(), epoch=epoch, state=state))
        return (head(v1) - head(v2)).pow(2).sum() + head(x).sum()

    return types.SimpleNamespace(build_head=lambda in_dim, bits, dataset, n_classes: Head(in_dim, bits),
                                 starts_phase=lambda epoch: epoch in (0, 2), optimizer=optimizer,
                                 step_lr=lambda epoch, step, steps, epochs: 1e-3 * (step + 1) + epochs,
                                 epoch_start=epoch_start, batch_loss=batch_loss)


def test_competitor_loop_feeds_each_module_what_its_interface_says(monkeypatch, one_thread):
    seen = dict(lr=[], opt=[], start=[], batch=[])
    monkeypatch.setitem(baselines.COMPETITORS, 'spy', spy_module(seen))
    for k, v in dict(METHOD='spy', EPOCHS=3, BATCH_SIZE=4, SEED=0, RELEASED=False, DATASET='folder').items():
        monkeypatch.setattr(train, k, v)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g)
    aug = torch.randn(10, 6, 4, generator=g)  # 6 = 2 x EPOCHS views: views 2t and 2t+1 at epoch t
    aug[:, :, 0] = 10 * torch.arange(10)[:, None] + torch.arange(6)  # entry 0 names (item, view)
    head, he, opt, codebooks = train.train_competitor(8, x.numpy(), aug.numpy().astype(np.float16), 'cpu', 3)
    assert he is None and codebooks is None and seen['opt'] == [0, 2]  # a fresh optimiser where a phase starts
    assert seen['start'] == [(0, 0), (1, 3), (2, 6)]  # each epoch's state, before its 3 batches (4, 4, 2 items)
    assert [len(b['idx']) for b in seen['batch']] == [4, 4, 2] * 3
    assert seen['lr'] == pytest.approx([1e-3 * (s + 1) + 3 for s in range(9)])  # step_lr(epoch, step, 3, EPOCHS)
    for k, b in enumerate(seen['batch']):
        t, idx = k // 3, b['idx']
        assert b['epoch'] == t and b['state'] == dict(epoch=t)
        assert sorted(set(idx.tolist())) == idx.sort().values.tolist()  # distinct items
        assert torch.equal(b['x'], x[idx])  # the plain features of the batch's items
        assert torch.equal(b['v1'][:, 0], 10.0 * idx + 2 * t) and torch.equal(b['v2'][:, 0], 10.0 * idx + 2 * t + 1)
    assert sorted(torch.cat([b['idx'] for b in seen['batch'][:3]]).tolist()) == list(range(10))  # every item once
