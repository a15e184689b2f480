"""The method's wiring, not only its maths: on a generated set where its ingredients matter, the full
method beats each ablation of the paper's Tables 2-3 by a stated margin; one training step, spied
on, feeds the loss what Algorithm 2 says; the external features come from the selected vocabulary."""
import glob
import os
import re

import numpy as np
import pytest
import torch

import external
import train
from conftest import METHOD_SET, run_script, write_method_set

ARGS = ['--dataset=folder', '--backbone=tiny-test', '--backbone_pretrained=random', '--clip_model=tiny-test',
        '--clip_pretrained=random', '--bits=16', '--epochs=30', '--warmup=3', '--lr_max=0.003', '--lr_min=0.0003',
        '--batch_size=80', f'--n_k={METHOD_SET["n_k"]}', f'--t1={METHOD_SET["t1"]}', '--threads=1']
ABLATIONS = {'full': [], 'SIM off': ['--sim=false'], 'AUG off': ['--aug=false'], 'IMGAUG': ['--external=none'],
             'EK': ['--external=ek']}
MARGIN = {'SIM off': 0.15, 'AUG off': 0.1, 'IMGAUG': 0.3, 'EK': 0.1}  # full - ablation, MAP@1000 at 16 bits


@pytest.fixture(scope='module')
def method_runs(tmp_path_factory):
    """train.py through its command line, the full method and each ablation, on the method's set (seed 0)."""
    tmp = tmp_path_factory.mktemp('method')
    cache = str(tmp / 'cache')
    labels, split, nouns, com = write_method_set(cache)
    maps = {}
    for name, extra in ABLATIONS.items():
        proc = run_script('train.py', *ARGS, f'--cache_dir={cache}', f'--results={tmp}/r.jsonl',
                          f'--run_dir={tmp}/{name.replace(" ", "_")}', *extra)
        maps[name] = float(re.search(r'^result dataset=folder method=duheg bits=16 map@1000=([\d.]+)',
                                     proc.stdout, re.M).group(1))
    print('ablations on the method set (MAP@1000, 16 bits): ' + ', '.join(f'{k} {v:.3f}' for k, v in maps.items()))
    return cache, labels, split, nouns, com, maps


def test_ingredients_matter_as_in_tables_2_and_3(method_runs):
    """Table 2: SIM, AUG and the external feature each help; Table 3: the selected nouns (EFC) beat
    every noun (EK). A broken ingredient loses its margin."""
    *_, maps = method_runs
    chance = 1 / 8
    assert maps['full'] > chance + 0.5, maps
    for name, margin in MARGIN.items():
        assert maps['full'] - maps[name] >= margin, (name, maps)


def test_external_features_come_from_the_selected_nouns(method_runs):
    """EFC's e_i (Eq. 5-6) are built from t_com, the selection nouns_embed.py saved, and EK's from
    every noun: the cached external features equal Eq. 5-6 computed here on each vocabulary."""
    cache, labels, (query, retrieval, train_idx), nouns, com, _ = method_runs
    x = np.load(os.path.join(cache, 'folder', 'tiny-test-random', 'images.npy'))[train_idx]
    assert 0 < len(com) < len(nouns) / 10  # the crowds are thinned
    for kind, vocab in (('efc', nouns[com]), ('ek', nouns)):
        path, = glob.glob(os.path.join(cache, 'folder', 'tiny-test-random', f'external_{kind}_*.npy'))
        e = np.load(path)
        np.testing.assert_allclose(e, external.external_features(x, vocab, train.TAU1).numpy(), atol=1e-5)
    efc, ek = (np.load(glob.glob(os.path.join(cache, 'folder', 'tiny-test-random', f'external_{k}_*.npy'))[0])
               for k in ('efc', 'ek'))
    assert np.abs(efc - ek).max() > 0.1  # the two vocabularies give different guidance on this set


# -----------------------------------------------------------------------------
# one training run of a hand-sized case, spied on: what reaches the loss at each epoch
GROUPS = [0, 0, 0, 1, 1, 2]  # the items' e: three directions, so Eq. 8's positives are these groups


def hand_case():
    """6 items, 4-d plain features, 6 views (2 x 3 epochs) whose first entry names (item, view) as
    10 item + view, and external features e in three tight groups. The plain features pair items
    across the groups (0 with 3, 1 with 5), so positives from the images would differ from Eq. 8's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    x[3], x[5] = x[0], x[1]
    aug = torch.randn(6, 6, 4, generator=g)
    aug[:, :, 0] = 10 * torch.arange(6)[:, None] + torch.arange(6)
    e = torch.eye(3)[GROUPS] + 0.02 * torch.randn(6, 3, generator=g)
    return x.numpy(), aug.numpy().astype(np.float16), e.numpy()


@pytest.fixture
def spied(monkeypatch):
    """Settings of a 3-epoch run with one batch an epoch, and spies on Eq. 1's inputs, each head's
    input, and the learning rate of every optimiser step."""
    for k, v in dict(EPOCHS=3, WARMUP=1, LR_MIN=1e-5, LR_MAX=1e-3, BATCH_SIZE=6, SEED=0, METHOD='duheg', SIM=True,
                     RELEASED=False).items():
        monkeypatch.setattr(train, k, v)
    seen = dict(loss=[], heads={}, lr=[])
    bcl_loss = train.bcl_loss

    def loss_spy(hv1, hv2, he, pos, tau2, clamp=False):
        out = bcl_loss(hv1, hv2, he, pos, tau2, clamp)
        seen['loss'].append(dict(hv1=hv1, hv2=hv2, he=he, pos=pos.clone(), tau2=tau2, clamp=clamp, value=out.item()))
        return out

    class Head(train.HashHead):
        def forward(self, x):
            seen['heads'].setdefault(self.net[0].in_features, []).append(x.detach().clone())
            return super().forward(x)

    class Adam(torch.optim.Adam):
        def step(self, *a, **k):
            seen['lr'].append(self.param_groups[0]['lr'])
            return super().step(*a, **k)
    monkeypatch.setattr(train, 'bcl_loss', loss_spy)
    monkeypatch.setattr(train, 'HashHead', Head)
    monkeypatch.setattr(torch.optim, 'Adam', Adam)
    return seen


def test_one_step_feeds_eq1_what_algorithm2_says(spied, one_thread):
    x, aug, e = hand_case()
    train.train_heads(8, x, aug, e, 'cpu', tau2=0.8, t2=0.97)
    assert len(spied['loss']) == 3 and len(spied['lr']) == 3  # one step an epoch
    for t, call in enumerate(spied['loss']):
        # He sees each item's own e: its input rows are rows of e, which name the batch's items
        he_in = spied['heads'][3][t]
        idx = [int(np.flatnonzero(np.all(np.isclose(e, row.numpy()), axis=1))[0]) for row in he_in]
        assert sorted(idx) == list(range(6))
        # Hv sees views 2t and 2t+1 of the same items (Algorithm 2, line 10)
        hv1_in, hv2_in = spied['heads'][4][2 * t], spied['heads'][4][2 * t + 1]
        assert (hv1_in[:, 0] == torch.tensor([10.0 * i + 2 * t for i in idx])).all()
        assert (hv2_in[:, 0] == torch.tensor([10.0 * i + 2 * t + 1 for i in idx])).all()
        # Eq. 8: the positives are e's groups, not the images' neighbours
        group = np.array(GROUPS)[idx]
        assert call['pos'].numpy().tolist() == (group[:, None] == group[None, :]).tolist()
        # Eq. 1: all three terms, at Eq. 9's temperature
        assert call['tau2'] == 0.8 and not call['clamp'] and all(call[k] is not None for k in ('hv1', 'hv2', 'he'))
        terms = sum(train.bcl_term(a, b, call['pos'], 0.8).item()
                    for a, b in ((call['hv1'], call['hv2']), (call['hv1'], call['he']), (call['hv2'], call['he'])))
        assert call['value'] == pytest.approx(terms, rel=1e-6)
        # Eq. 10-11: this epoch's learning rate
        assert spied['lr'][t] == pytest.approx(train.lr_at(t, 1e-5, 1e-3, 1, 3), rel=1e-12)
    assert spied['lr'] == pytest.approx([1e-5, 1e-3, 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi / 2))])


def test_ablations_reach_the_loss(spied, monkeypatch, one_thread):
    """SIM off: only i itself is a positive; AUG off: one plain view and L_b(hv, he) alone; no
    external feature (IMGAUG): L_b(hv1, hv2) alone, positives i itself."""
    x, aug, e = hand_case()
    monkeypatch.setattr(train, 'SIM', False)
    train.train_heads(8, x, aug, e, 'cpu', tau2=0.8, t2=0.97)
    assert all(c['pos'].equal(torch.eye(6, dtype=torch.bool)) for c in spied['loss'])
    monkeypatch.setattr(train, 'SIM', True)
    spied['loss'].clear()
    spied['heads'].clear()
    train.train_heads(8, x, None, e, 'cpu', tau2=0.8, t2=0.97)  # AUG off
    for t, call in enumerate(spied['loss']):
        idx = [int(np.flatnonzero(np.all(np.isclose(e, row.numpy()), axis=1))[0]) for row in spied['heads'][3][t]]
        assert call['hv2'] is None and call['he'] is not None
        assert torch.equal(spied['heads'][4][t], torch.as_tensor(x)[idx])  # the plain view of the same items
    spied['loss'].clear()
    train.train_heads(8, x, aug, None, 'cpu', tau2=0.8, t2=0.97)  # IMGAUG
    assert all(c['he'] is None and c['hv2'] is not None and c['pos'].equal(torch.eye(6, dtype=torch.bool))
               for c in spied['loss'])
