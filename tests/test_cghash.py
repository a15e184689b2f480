"""CGHash's port (methods/cghash.py) checked against the authors' code, github.com/KARLSZP/CGHash at e5bf6b1:
live, against their losses, model, one step of each of their training loops, their neighbour mining and their
configs, when their code is at $DUHEG_REFS/CGHash (skipped otherwise); against tests/golden/cghash.npz, written by
their code alone (DUHEG_WRITE_GOLDEN=1 rewrites it), which runs without it; and on cases small enough to check
by hand. The code noise u ~ U(0, 1) comes from one seeded torch.Generator on our side and from the default
generator, seeded the same, on theirs: both draw the same numbers, in the same order."""
import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from methods import cghash

REF = os.path.join(os.environ.get('DUHEG_REFS', '/work/refs'), 'CGHash')
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'cghash.npz')
HAVE_REF = os.path.isfile(os.path.join(REF, 'losses', 'losses.py'))
needs_ref = pytest.mark.skipif(not HAVE_REF, reason=f'no authors\' code at {REF} (set DUHEG_REFS)')

# the seeded problem both sides solve: F features, L bits, C clusters, a batch of B, mining k of N
F, L, C, B, N, SEED = 32, 8, 4, 12, 48, 7
TOL = 1e-6


def _inputs():
    """Head weights and features, from numpy alone (no torch initialisation on either side)."""
    rng = np.random.default_rng(2023)
    w = {'projector.0.weight': rng.normal(0, 0.4, (F // 4, F)), 'projector.0.bias': rng.normal(0, 0.1, F // 4),
         'projector.2.weight': rng.normal(0, 0.8, (L, F // 4)), 'projector.2.bias': rng.normal(0, 0.1, L),
         'predictor.weight': rng.normal(0, 1.5, (C, L)), 'predictor.bias': rng.normal(0, 0.1, C)}
    x = {k: rng.normal(0, 1, (B, F)) for k in ('anchor', 'neighbour', 'weak', 'strong')}
    mine = rng.normal(0, 1, (N, 8)) * rng.uniform(0.5, 3, (N, 1))  # rows of many lengths: mining is by cosine
    return w, x, mine.astype(np.float32)


def _state(w, dtype):
    return {k: torch.tensor(v, dtype=dtype) for k, v in w.items()}


# -----------------------------------------------------------------------------
# their side
def _load(rel, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REF, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def ref(monkeypatch):
    """Their modules, loaded by path (their packages models/, utils/ would clash with ours), with .cuda() the
    identity: their code moves every tensor to the GPU."""
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)
    utils = types.ModuleType('utils')
    utils.__path__ = [os.path.join(REF, 'utils')]
    monkeypatch.setitem(sys.modules, 'utils', utils)
    monkeypatch.setitem(sys.modules, 'utils.utils', _load('utils/utils.py', 'utils.utils'))
    names = dict(losses='losses/losses.py', models='models/models.py', memory_bank='utils/memory_bank.py',
                 cghash_train='utils/cghash_train.py', selflabel_train='utils/selflabel_train.py',
                 custom_dataset='data/custom_dataset.py')
    return types.SimpleNamespace(**{k: _load(v, f'_cghash_ref_{k}') for k, v in names.items()})


class _Parallel(torch.nn.Module):
    """DataParallel's .module, which their loops reach through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


class _Mask:
    """Their proto_code casts the mask with .float() (losses.py:123): this one keeps float64."""

    def __init__(self, m):
        self.m = m

    def float(self):
        return self.m.double()

    def sum(self, dim):
        return self.m.sum(dim=dim)


def _their_model(ref, w, dtype):
    m = ref.models.CGHashModel({'backbone': torch.nn.Identity(), 'dim': F}, C, L, 1.0).to(dtype)
    m.load_state_dict(_state(w, dtype))
    return m


def _grads(m, prefix=''):
    return {f'{prefix}grad.{k}': p.grad.detach().numpy().copy() for k, p in m.named_parameters()}


def _params(m, prefix):
    return {f'{prefix}{k}': p.detach().numpy().copy() for k, p in m.named_parameters()}


def _their_terms(ref, w, x):
    """Their codes, logits, three loss terms (float64) and the gradients of their sum."""
    m = _their_model(ref, w, torch.float64)
    a, n = (torch.tensor(x[k]) for k in ('anchor', 'neighbour'))
    torch.manual_seed(SEED)
    z_a, logits_a = m(a, channel='head')
    z_n, logits_n = m(n, channel='head')
    pos = (logits_a.argmax(dim=1).unsqueeze(1) == logits_a.argmax(dim=1)).fill_diagonal_(False)  # cghash_train:54-56
    lo = ref.losses
    terms = [lo.ConsistentLoss(1.0)(logits_a, logits_n)[0], lo.EntropyLoss(5.0, 1.0)(logits_a)[0],
             lo.MaskedContLoss(0.1, 1.0, 0.5)(z_a, z_n, _Mask(pos))[0]]
    sum(terms).backward()
    r25 = lo.MaskedContLoss(0.1, 1.0, 0.25)(z_a, z_n, _Mask(pos))[0]  # the default 0.5 cannot tell r from 1 - r
    out = dict(z_a=z_a.detach().numpy(), z_n=z_n.detach().numpy(), logits_a=logits_a.detach().numpy(),
               logits_n=logits_n.detach().numpy(), consist=terms[0].item(), entropy=terms[1].item(),
               contrast=terms[2].item(), contrast_r25=r25.item())
    return {**out, **_grads(m, 'terms.')}


def _their_scan_step(ref, w, x):
    """One step of their first-stage loop (cghash_train, frozen backbone) in float32, Adam as configured."""
    m = _Parallel(_their_model(ref, w, torch.float32))
    opt = torch.optim.Adam(m.parameters(), lr=0.001, weight_decay=0.0001)  # cghash_cifar10_64.yml:34-35
    crit = ref.losses
    criterion = {'consist': crit.ConsistentLoss(1.0), 'MI': crit.EntropyLoss(5.0, 1.0),
                 'mcont': crit.MaskedContLoss(0.1, 1.0, 0.5)}
    batch = {'anchor': torch.tensor(x['anchor'], dtype=torch.float32),
             'neighbor': torch.tensor(x['neighbour'], dtype=torch.float32)}
    torch.manual_seed(SEED)
    ref.cghash_train.cghash_train([batch], m, criterion, dict(consist=True, MI=True, mcont=True), opt, 0, False)
    return {**_grads(m.module, 'scan.'), **_params(m.module, 'scan.after.')}


def _their_selflabel(ref, w, x):
    """Their self-labelling loss (float32), then one step of their loop (selflabel_train)."""
    m = _Parallel(_their_model(ref, w, torch.float32))
    weak, strong = (torch.tensor(x[k], dtype=torch.float32) for k in ('weak', 'strong'))
    ce = ref.losses.ConfidenceBasedCE(0.9, 0.9, True)  # selflabel_cifar10_64.yml:43-45
    torch.manual_seed(SEED)
    with torch.no_grad():
        _, out_weak = m(weak)
        _, out_strong = m(strong)
        loss = ce(out_weak, out_strong).item()
    confident = (torch.softmax(out_weak, 1).max(1)[0] > 0.9)
    assert 0 < confident.sum() < B and len(out_weak[confident].argmax(1).unique()) > 1, 'inputs test too little'
    opt = torch.optim.Adam(m.parameters(), lr=0.0001, weight_decay=0.0001)  # selflabel_cifar10_64.yml:34-35
    torch.manual_seed(SEED)
    ref.selflabel_train.selflabel_train([{'image': weak, 'image_augmented': strong}], m, {'confidenceCE': ce},
                                        dict(confidenceCE=True), opt, 0)
    return {'selflabel': loss, **_grads(m.module, 'self.'), **_params(m.module, 'self.after.')}


def _their_knn(ref, feats, k):
    """Their mining (memory_bank.py:22-34) on the L2-normalised features their SimCLR head gives."""
    bank = ref.memory_bank.MemoryBank(N, feats.shape[1], 10, 0.1)
    bank.features = torch.nn.functional.normalize(torch.tensor(feats), dim=1)
    return bank.mine_nearest_neighbors(k, calculate_accuracy=False).numpy()


def _their_config():
    """The settings their CIFAR-10 configs and losses.py hold, by our constants' names."""
    import yaml
    read = {s: yaml.safe_load(open(os.path.join(REF, 'configs', 'cifar-10', f'{s}_cifar10{t}.yml')))
            for s, t in (('mine', ''), ('cghash', '_64'), ('selflabel', '_64'))}
    c, s = read['cghash'], read['selflabel']
    k = c['criterion_kwargs']
    assert read['mine']['topk'] == c['num_neighbors'] and c['batch_size'] == s['batch_size'] and c['tau'] == s['tau']
    assert c['optimizer_kwargs']['weight_decay'] == s['optimizer_kwargs']['weight_decay']
    assert c['optimizer'] == s['optimizer'] == 'adam' and c['scheduler'] == s['scheduler'] == 'constant'
    conf = s['criterion_kwargs']['confidenceCE']
    assert conf['threshold'] == conf['threshold_max']  # a constant threshold: adjust_threshold is never called
    return dict(SCAN_EPOCHS=c['epochs'], SELFLABEL_EPOCHS=s['epochs'], BATCH_SIZE=c['batch_size'],
                NUM_NEIGHBORS=c['num_neighbors'], TAU=c['tau'], CONSISTENT_W=k['consistent']['consistent_w'],
                ENTROPY_W=k['entropy']['entropy_w'], SHARP_W=k['entropy']['sharp_w'], CONT_W=k['mcont']['w'],
                CONT_TAU=k['mcont']['tau'], POS_REWEIGHT=k['mcont']['pos_reweight'], CONFIDENCE=conf['threshold'],
                CLASS_BALANCING=float(conf['apply_class_balancing']), LR=c['optimizer_kwargs']['lr'],
                SELFLABEL_LR=s['optimizer_kwargs']['lr'], WEIGHT_DECAY=c['optimizer_kwargs']['weight_decay'],
                CIFAR10_CLUSTERS=c['num_classes'])


def _theirs(ref):
    """Everything their code gives on the seeded problem, as numpy (the golden file's contents)."""
    w, x, feats = _inputs()
    with torch.random.fork_rng(devices=[]):
        out = {**_their_terms(ref, w, x), **_their_scan_step(ref, w, x), **_their_selflabel(ref, w, x)}
    config = _their_config()
    out['knn'] = _their_knn(ref, feats, config['NUM_NEIGHBORS'])
    out['EPS'] = ref.losses.EPS
    out.update({f'cfg.{k}': v for k, v in config.items()})
    return {k: np.asarray(v) for k, v in out.items()}


# -----------------------------------------------------------------------------
# our side, on the same problem
def _our_head(w, dtype):
    head = cghash.Head(F, L, C).to(dtype)
    head.load_state_dict(_state(w, dtype))
    return head


def _ours():
    w, x, feats = _inputs()
    head, gen = _our_head(w, torch.float64), torch.Generator().manual_seed(SEED)
    a, n = (torch.tensor(x[k]) for k in ('anchor', 'neighbour'))
    z_a, logits_a = head.sample(a, gen)
    z_n, logits_n = head.sample(n, gen)
    gen.manual_seed(SEED)
    terms = cghash.scan_terms(head, a, n, gen)
    sum(terms).backward()
    r25 = cghash.masked_contrast_loss(z_a, z_n, cghash.pseudo_positives(logits_a), r=0.25)
    out = dict(z_a=z_a, z_n=z_n, logits_a=logits_a, logits_n=logits_n, consist=terms[0], entropy=terms[1],
               contrast=terms[2], contrast_r25=r25, **_grads(head, 'terms.'))
    head, gen = _our_head(w, torch.float32), torch.Generator().manual_seed(SEED)
    opt = cghash.optimizer(head, 0)
    sum(cghash.scan_terms(head, *(torch.tensor(x[k], dtype=torch.float32) for k in ('anchor', 'neighbour')),
                          gen)).backward()
    opt.step()
    out.update({**_grads(head, 'scan.'), **_params(head, 'scan.after.')})
    head, gen = _our_head(w, torch.float32), torch.Generator().manual_seed(SEED)
    opt = cghash.optimizer(head, cghash.SCAN_EPOCHS)
    loss = cghash.selflabel_step_loss(head, *(torch.tensor(x[k], dtype=torch.float32) for k in ('weak', 'strong')),
                                      gen)
    loss.backward()
    opt.step()
    out.update(selflabel=loss, **_grads(head, 'self.'), **_params(head, 'self.after.'))
    out['knn'] = cghash.mine_neighbours(torch.tensor(feats))
    out['EPS'] = cghash.EPS
    out.update({f'cfg.{k}': getattr(cghash, k) for k in (
        'SCAN_EPOCHS', 'SELFLABEL_EPOCHS', 'BATCH_SIZE', 'NUM_NEIGHBORS', 'TAU', 'CONSISTENT_W', 'ENTROPY_W',
        'SHARP_W', 'CONT_W', 'CONT_TAU', 'POS_REWEIGHT', 'CONFIDENCE', 'CLASS_BALANCING', 'LR', 'SELFLABEL_LR',
        'WEIGHT_DECAY')}, **{'cfg.CIFAR10_CLUSTERS': cghash.clusters_for('cifar10', 0)})
    return {k: np.asarray(v.detach() if torch.is_tensor(v) else v, dtype=np.float64) for k, v in out.items()}


def _compare(theirs):
    """Max absolute difference per key; fails on any above TOL, on codes or neighbours that differ at all, and on
    keys one side lacks."""
    ours = _ours()
    assert sorted(ours) == sorted(theirs)
    diff = {k: float(np.abs(ours[k] - theirs[k]).max()) for k in theirs}
    exact = [k for k in theirs if k in ('knn', 'z_a', 'z_n') or k.startswith('cfg.')]
    print(' '.join(f'{k}={v:.1e}' for k, v in sorted(diff.items())))
    assert all(diff[k] == 0 for k in exact), {k: diff[k] for k in exact if diff[k]}
    assert max(diff.values()) <= TOL, {k: v for k, v in diff.items() if v > TOL}
    return diff


@needs_ref
def test_live_against_their_code(ref, one_thread):
    """(a) Their losses, model, one step of each loop, mining and configs against ours, on one seeded problem."""
    _compare(_theirs(ref))


@needs_ref
def test_neighbour_sampling_matches_theirs(ref, one_thread):
    """Their NeighborsDataset draws a neighbour uniformly from the first k + 1 mined columns, itself included
    (custom_dataset.py:64, 76): ours draws from the same set, each member about as often."""
    knn = np.stack([np.roll(np.arange(30), -i)[:25] for i in range(30)])  # 25 columns: only k + 1 = 21 count
    data = type('D', (), {'transform': staticmethod(lambda v: v), '__len__': lambda s: 30,
                          '__getitem__': lambda s, i: {'image': i, 'target': 0}})()
    theirs = ref.custom_dataset.NeighborsDataset(data, knn, cghash.NUM_NEIGHBORS)
    np.random.seed(0)
    seen_theirs = {theirs[3]['index'][1] for _ in range(600)}
    aug = torch.arange(30, dtype=torch.float16)[:, None, None].expand(30, 2, 1)  # a view's feature = its image
    state = dict(knn=torch.tensor(knn[:, :cghash.NUM_NEIGHBORS + 1]), aug=aug, x=None)
    picks = cghash.pick_neighbours(torch.full((600,), 3), state, torch.Generator().manual_seed(0))[:, 0]
    counts = np.bincount(picks.long().numpy(), minlength=30)
    assert set(np.nonzero(counts)[0]) == seen_theirs == set(knn[3, :21])
    assert counts.max() < 3 * counts[counts > 0].min()


@pytest.mark.skipif(os.environ.get('DUHEG_WRITE_GOLDEN') != '1', reason='DUHEG_WRITE_GOLDEN=1 rewrites the file')
@needs_ref
def test_write_golden(ref, one_thread):
    """(b) Writes tests/golden/cghash.npz from their code alone."""
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    np.savez_compressed(GOLDEN, **_theirs(ref))


def test_against_golden(one_thread):
    """(b) Ours against what their code gave on the same problem (tests/golden/cghash.npz)."""
    with np.load(GOLDEN) as g:
        theirs = {k: g[k] for k in g.files}
    assert len(theirs) > 40
    _compare(theirs)


# -----------------------------------------------------------------------------
# (c) by hand
def test_consistency_two_items_by_hand():
    """p_a = (1/2, 1/2), (3/4, 1/4) and p_n = (1/2, 1/2), (1/4, 3/4): <p_a, p_n> = 1/2 and 3/8."""
    a = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    n = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    assert cghash.consistency_loss(a, n).item() == pytest.approx(-(math.log(1 / 2) + math.log(3 / 8)) / 2, abs=1e-6)


def test_entropy_by_hand():
    """Uniform predictions: -5 ln C + ln C. Two mirrored ones, (3/4, 1/4) and (1/4, 3/4): -5 ln 2 + H(3/4, 1/4)."""
    assert cghash.entropy_loss(torch.zeros(3, 4)).item() == pytest.approx(-4 * math.log(4), abs=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    logits = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]])
    assert cghash.entropy_loss(logits).item() == pytest.approx(-5 * math.log(2) + h, abs=1e-6)


def test_masked_contrast_two_items_by_hand():
    """a = (1, 1), (1, -1); n = (1, 1), (-1, -1); both share a pseudo-label, so each one's prototype is the
    other anchor. Item 1: pos = (e + 1) / 2, neg = 1; item 2: pos = (1 + 1/e) / 2, neg = 1."""
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    n = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    pos = torch.tensor([[False, True], [True, False]])
    p1, p2 = (math.e + 1) / 2, (1 + 1 / math.e) / 2
    want = 0.1 * -(math.log(p1 / (p1 + 1)) + math.log(p2 / (p2 + 1))) / 2
    assert cghash.masked_contrast_loss(a, n, pos).item() == pytest.approx(want, abs=1e-6)
    p1, p2 = 0.25 * math.e + 0.75, 0.25 + 0.75 / math.e  # r = 1/4 weighs the instance pair less
    want = 0.1 * -(math.log(p1 / (p1 + 1)) + math.log(p2 / (p2 + 1))) / 2
    assert cghash.masked_contrast_loss(a, n, pos, r=0.25).item() == pytest.approx(want, abs=1e-6)
    mask = cghash.pseudo_positives(torch.tensor([[2.0, 0.0], [3.0, 1.0], [0.0, 5.0]]))
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_selflabel_by_hand():
    """Confident targets 0, 0, 1 (weights 3/2, 3/2, 3); strong rows with -log p of ln 2, ln 3, ln 4; the fourth
    item is not confident. Weighted mean: (1.5 ln 2 + 1.5 ln 3 + 3 ln 4) / 6. None confident: zero."""
    weak = torch.tensor([[5.0, 0, 0], [6.0, 0, 0], [0, 7.0, 0], [1.0, 1.0, 0]])
    strong = torch.tensor([[math.log(2), 0, 0], [0.0, 0, 0], [0, 0.0, math.log(2)], [9.0, 0, 0]], requires_grad=True)
    want = (1.5 * math.log(2) + 1.5 * math.log(3) + 3 * math.log(4)) / 6
    assert cghash.selflabel_loss(weak, strong).item() == pytest.approx(want, abs=1e-6)
    none = cghash.selflabel_loss(torch.zeros(4, 3), strong)
    none.backward()
    assert none.item() == 0 and strong.grad.abs().max() == 0


def test_codes_and_straight_through():
    """sign(p - u) with u from gen, gradient straight through to p; evaluation codes sign(proj) and 2p - 1."""
    torch.manual_seed(0)
    head = cghash.Head(8, 6, 3)
    x = torch.randn(5, 8)
    gen = torch.Generator().manual_seed(1)
    u = torch.rand((5, 6), generator=torch.Generator().manual_seed(1))
    p = head.prob(x)
    z, logits = head.sample(x, gen)
    assert torch.equal(z, torch.sign(p - u)) and set(z.unique().tolist()) <= {-1.0, 1.0}
    assert torch.allclose(logits, head.predictor(z))
    g = torch.ones(3, requires_grad=True)
    out = cghash._Hash.apply(g * torch.tensor([-0.5, 0.0, 2.0]))
    out.sum().backward()
    assert out.tolist() == [-1.0, 0.0, 1.0] and g.grad.tolist() == [-0.5, 0.0, 2.0]
    proj = head.projector(x)
    assert torch.equal(torch.sign(head(x)), torch.sign(proj))
    assert torch.allclose(head(x), 2 * torch.sigmoid(proj) - 1)
    h = np.array([[0.1, -2.0], [0.3, 5.0], [0.2, 1.0]])
    assert cghash.median_codes(h).tolist() == [[-1, -1], [1, 1], [1, 1]]


def test_schedule_clusters_and_optimizer():
    assert cghash.EPOCHS == cghash.SCAN_EPOCHS + cghash.SELFLABEL_EPOCHS == 400 and cghash.BATCH_SIZE == 1024
    assert [cghash.clusters_for(d, 7) for d in ('cifar10', 'nuswide', 'flickr25k', 'mscoco', 'folder', 'x')] == \
        [10, 21, 24, 80, 7, 7]
    assert [cghash.phase(e) for e in (0, 199, 200, 399)] == ['scan', 'scan', 'selflabel', 'selflabel']
    assert [e for e in range(400) if cghash.starts_phase(e)] == [0, 200]
    head = cghash.Head(8, 4, 2)
    assert [cghash.optimizer(head, e).param_groups[0]['lr'] for e in (0, 200)] == [1e-3, 1e-4]
    assert cghash.optimizer(head).param_groups[0]['weight_decay'] == 1e-4


def test_neighbour_support_by_hand():
    """Each of the k + 1 mined columns (the item itself among them) is drawn, and nothing else, as their
    np.random.choice(indices[index]) over indices[:, :k + 1] (custom_dataset.py:64, 76)."""
    k = cghash.NUM_NEIGHBORS
    knn = torch.stack([torch.roll(torch.arange(30), -i)[:k + 1] for i in range(30)])
    aug = torch.arange(30, dtype=torch.float16)[:, None, None].expand(30, 3, 1)  # every view's feature: its image
    picks = cghash.pick_neighbours(torch.full((2000,), 3), dict(knn=knn, aug=aug, x=None),
                                   torch.Generator().manual_seed(0))[:, 0].long()
    assert set(picks.tolist()) == set(knn[3].tolist()) == set(range(3, 3 + k + 1))


def test_epoch_start_and_batch_loss_wiring(one_thread):
    """Neighbours mined at epoch 0 and kept; the first stage's neighbour is a stored view of a mined neighbour
    (here each item's only neighbour is itself and one view is stored) and its anchor v1; self-labelling's weak
    view is x and its strong view v1."""
    torch.manual_seed(0)
    x, aug = torch.randn(40, 16), torch.randn(40, 1, 16).half()
    head = cghash.Head(16, 8, 3)
    with torch.no_grad():
        head.predictor.weight.mul_(10)  # confident pseudo-labels, so that self-labelling has targets
    state = cghash.epoch_start(head, x, aug, 0, None, 'cpu')
    knn = state['knn']
    assert knn.shape == (40, cghash.NUM_NEIGHBORS + 1) and torch.equal(knn[:, 0], torch.arange(40))
    assert cghash.epoch_start(head, x + 1, aug, 5, None, 'cpu')['knn'] is knn
    assert cghash.epoch_start(head, x, aug, cghash.SCAN_EPOCHS, None, 'cpu')['phase'] == 'selflabel'
    idx = torch.tensor([3, 17, 9, 30])
    v1 = torch.randn(4, 16)
    self_state = dict(state, knn=torch.arange(40)[:, None].expand(40, 21))
    gen = torch.Generator().manual_seed(4)
    assert torch.equal(cghash.pick_neighbours(idx, self_state, gen), aug[idx, 0].float())
    got = cghash.batch_loss(head, x[idx], v1, None, idx, self_state, 0, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    torch.randint(21, (4,), generator=gen), torch.randint(1, (4,), generator=gen)  # the picks' draws
    want = sum(cghash.scan_terms(head, v1, aug[idx, 0].float(), gen))
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    sl = dict(state, phase='selflabel')
    got = cghash.batch_loss(head, x[idx], v1, None, idx, sl, 200, torch.Generator().manual_seed(5))
    want = cghash.selflabel_step_loss(head, x[idx], v1, torch.Generator().manual_seed(5))
    swapped = cghash.selflabel_step_loss(head, v1, x[idx], torch.Generator().manual_seed(5))
    assert got.item() == want.item() and got.item() > 0 and got.item() != swapped.item()
