"""MeCoQ (methods/mecoq.py) checked against the authors' code, not against itself.

(a) live: their loss.py, network.py, engine.py and two pieces of utils.py, imported from
    $DUHEG_REFS/AAAI22-MeCoQ (default /work/refs; skipped when absent), run on the same seeded float64 inputs
    as the port: the loss and its gradients, the soft and hard quantization, whole training runs through their
    engine.train (losses, gradients, code memory and pointer after every step, final weights) for each
    setting of the two paper-or-release switches (their code made to follow the paper by the smallest edits:
    PQLayer's flag, `codebooks` without `.data`, one `.squeeze(-1)` in loss.py for the per-row loss), the
    learning-rate schedule, their Evaluator's MAP against eval_hash.map_aqd, and their scripts against the
    port's settings table;
(b) golden: tests/golden/mecoq.npz, written by their code (DUHEG_WRITE_GOLDEN=1 with the references present),
    replayed by the port without their code (this runs in CI);
(c) by hand: the debiased NT-Xent of a 2 x 2 batch, soft assignment over one codebook of two words, the
    entropy and word-correlation terms, the memory pointer, the learning-rate schedule.
"""
import ast
import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_hash
from methods import mecoq
from methods.pq import pq_encode

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: tiny tensors run on one thread

REFS = os.path.join(os.environ.get('DUHEG_REFS', '/work/refs'), 'AAAI22-MeCoQ')
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'mecoq.npz')
TOL = 1e-6
# a small run: 16 bits (M = 2 codebooks of 256 words), batches 8, 8 and 5, a memory of three batches
LIVE = dict(in_dim=10, feat_dim=8, sizes=(8, 8, 5), queue=24, epochs=3,
            s=dict(T=0.3, rho=0.15, lam=0.5, gamma=0.5, weight_decay=0.1, queue_begin_epoch=1))
# the golden run, smaller so that the file stays small (two memories of 12 x 2 x 256 codes)
SMALL = dict(in_dim=6, feat_dim=4, sizes=(4, 4, 3), queue=12, epochs=3,
             s=dict(T=0.4, rho=0.15, lam=0.5, gamma=0.5, weight_decay=0.1, queue_begin_epoch=1))


# -----------------------------------------------------------------------------
# the authors' code
def _exec_file(name):
    spec = importlib.util.spec_from_file_location(f'_mecoq_ref_{name}', os.path.join(REFS, f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _ContiguousEinsum:
    """torch for their network.py, whose einsum results are .view()ed (network.py:140, 179): torch 2.14 may
    return them non-contiguous, where view() fails; .contiguous() changes no value."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def einsum(*args):
        return torch.einsum(*args).contiguous()


ROW_PATCH = ('pos_probs = pos_logits.exp()', 'pos_probs = pos_logits.exp().squeeze(-1)')


def _exec_loss_per_row():
    """Their loss.py with its positives a vector [2B] instead of a column [2B, 1]: Ng and the loss stay per row
    (the paper's loss) instead of broadcasting to 2B x 2B. The one edit."""
    path = os.path.join(REFS, 'loss.py')
    src = open(path).read()
    assert src.count(ROW_PATCH[0]) == 1, "loss.py changed: the per-row edit no longer applies"
    mod = types.ModuleType('_mecoq_ref_loss_rows')
    exec(compile(src.replace(*ROW_PATCH), path, 'exec'), mod.__dict__)
    return mod


@pytest.fixture(scope='module')
def ref():
    """Their loss, network and engine modules, and from utils.py (which imports tensorboard, absent here) the
    scheduler, the Evaluator and get_db_codes_and_targets, taken out of its syntax tree unchanged."""
    if not os.path.isfile(os.path.join(REFS, 'loss.py')):
        pytest.skip(f"the authors' code is not at {REFS} (set DUHEG_REFS to the folder holding AAAI22-MeCoQ)")
    from tqdm import tqdm
    path = os.path.join(REFS, 'utils.py')
    tree = ast.parse(open(path).read())
    keep = {'WarmUpAndCosineDecayScheduler', 'Evaluator', 'get_db_codes_and_targets'}
    ns = dict(np=np, torch=torch, math=math, tqdm=tqdm, read_tensor=None)
    exec(compile(ast.Module([n for n in tree.body if getattr(n, 'name', None) in keep], []), path, 'exec'), ns)
    stub = types.ModuleType('utils')  # the names network.py and engine.py import from their utils.py
    stub.save_tensor = stub.read_tensor = lambda *a, **k: None
    stub.get_db_codes_and_targets = ns['get_db_codes_and_targets']
    saved = sys.modules.get('utils')
    sys.modules['utils'] = stub
    try:
        mods = {name: _exec_file(name) for name in ('loss', 'network', 'engine')}
    finally:
        del sys.modules['utils']
        if saved is not None:
            sys.modules['utils'] = saved
    mods['network'].torch = _ContiguousEinsum()
    mods['loss_rows'] = _exec_loss_per_row()
    return types.SimpleNamespace(**mods, Scheduler=ns['WarmUpAndCosineDecayScheduler'], Evaluator=ns['Evaluator'],
                                 db_codes=ns['get_db_codes_and_targets'])


def _ref_model(ref, head, train_codebooks, queue_size, rec):
    """Their MeCoQ with the VGG replaced by identities (the project's features go straight to the projection),
    the head's weights copied in, float64. train_codebooks: the codebook trains (PQLayer flag=True) and the
    gamma term reads the words with their gradient (the `codebooks` property without `.data`)."""
    class RefModel(ref.network.MeCoQ):
        if train_codebooks:
            codebooks = property(lambda self: F.normalize(self.pq_layer._C, dim=-1))

        def register_queue(self, enqueue_size, device='cpu'):
            super().register_queue(enqueue_size, device)
            self.soft_code_queue = self.soft_code_queue.double()  # their zeros are float32; this run is float64

        def dequeue_enqueue(self, enqueue_batch):
            super().dequeue_enqueue(enqueue_batch)
            rec['queue'].append(self.soft_code_queue.clone())
            rec['ptr'].append(self.start_ptr)

    model = RefModel.__new__(RefModel)
    nn.Module.__init__(model)
    model.vgg = nn.Module()
    model.vgg.features, model.vgg.classifier = nn.Identity(), nn.Identity()
    feat_dim = head.projection.out_features
    model.projection = nn.Linear(head.projection.in_features, feat_dim)
    model.feat_dim, model.M, model.K, model.D = feat_dim, head.M, 256, feat_dim // head.M
    model.pq_layer = ref.network.PQLayer(feat_dim, head.M, 256, alpha=10, flag=train_codebooks)
    model.queue_size = queue_size
    model.double()
    with torch.no_grad():
        model.projection.weight.copy_(head.projection.weight)
        model.projection.bias.copy_(head.projection.bias)
        model.pq_layer._C.copy_(head.C)
    return model


def _their_run(ref, head, views, cfg, mode):
    """engine.train on the views, with main.py's loss, SGD (without the VGG group) and scheduler; records the
    loss, the gradients of (W, b, C) and the memory after every step. mode: (train_codebooks, per_row)."""
    rec = dict(loss=[], grads=[], queue=[], ptr=[])
    model = _ref_model(ref, head, mode[0], cfg['queue'], rec)
    s = cfg['s']
    loss_fn = (ref.loss_rows if mode[1] else ref.loss).MeCoQLoss(T=s['T'], mode='debias', pos_prior=s['rho'],
                                                                 hp_lambda=s['lam'], hp_gamma=s['gamma'])

    def recording_loss(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        rec['loss'].append(loss.item())
        return loss
    params = (model.projection.weight, model.projection.bias, model.pq_layer._C)
    opt = torch.optim.SGD([{'params': model.projection.parameters(), 'lr': mecoq.LR},
                           {'params': model.pq_layer.parameters(), 'lr': mecoq.LR}],
                          lr=mecoq.LR, momentum=mecoq.MOMENTUM, weight_decay=s['weight_decay'])
    step = opt.step

    def recording_step(*args, **kwargs):
        rec['grads'].append([None if p.grad is None else p.grad.clone() for p in params])
        return step(*args, **kwargs)
    opt.step = recording_step
    batches = _batches(views, cfg['sizes'])
    sched = ref.Scheduler(opt, mecoq.START_LR, mecoq.LR, mecoq.FINAL_LR, cfg['epochs'], len(batches), 1)
    config = types.SimpleNamespace(device='cpu', queue_begin_epoch=s['queue_begin_epoch'], batch_size=cfg['sizes'][0],
                                   epoch_num=cfg['epochs'])
    ref.engine.train(types.SimpleNamespace(train_loader=[([a, b], None) for a, b in batches]), model, recording_loss,
                     opt, sched, config)
    rec['queue'], rec['ptr'] = rec['queue'][1::2], rec['ptr'][1::2]  # after both views of a step
    rec['params'] = [p.detach().clone() for p in params]
    return rec, model


# -----------------------------------------------------------------------------
# the port, driven as train.py's loop will drive it
def _batches(views, sizes):
    v1, v2 = views
    ends = np.cumsum((0,) + tuple(sizes))
    return [(v1[a:b], v2[a:b]) for a, b in zip(ends[:-1], ends[1:])]


MODES = {'paper': (True, True), 'release': (False, False)}  # (TRAIN_CODEBOOKS, PER_ROW_LOSS)


def _head(cfg, mode, monkeypatch, init=None, seed=0):
    monkeypatch.setattr(mecoq, 'TRAIN_CODEBOOKS', mode[0])
    monkeypatch.setattr(mecoq, 'PER_ROW_LOSS', mode[1])
    monkeypatch.setattr(mecoq, 'INPUT_DROPOUT', 0.0)  # their VGG is replaced by identities: no dropout to match
    monkeypatch.setattr(mecoq, 'QUEUE_SIZE', cfg['queue'])
    monkeypatch.setattr(mecoq, 'BATCH_SIZE', cfg['sizes'][0])
    torch.manual_seed(seed)
    head = mecoq.Head(cfg['in_dim'], 16, 'flickr25k', feat_dim=cfg['feat_dim'], **cfg['s']).double()
    if init is not None:
        with torch.no_grad():
            for p, v in zip((head.projection.weight, head.projection.bias, head.C), init):
                p.copy_(torch.as_tensor(v))
    return head


def _our_run(head, views, cfg):
    rec = dict(loss=[], grads=[], queue=[], ptr=[])
    opt = mecoq.optimizer(head)
    params = (head.projection.weight, head.projection.bias, head.C)
    batches = _batches(views, cfg['sizes'])
    for epoch in range(cfg['epochs']):
        state = mecoq.epoch_start(head, None, None, epoch, None, 'cpu')
        for i, (v1, v2) in enumerate(batches):
            for g in opt.param_groups:
                g['lr'] = mecoq.lr_at(epoch * len(batches) + i, len(batches), cfg['epochs'])
            opt.zero_grad()
            loss = mecoq.batch_loss(head, None, v1, v2, None, state, epoch, None)
            loss.backward()
            rec['loss'].append(loss.item())
            rec['grads'].append([None if p.grad is None else p.grad.clone() for p in params])
            opt.step()
            rec['queue'].append(state['memory']['codes'].clone())
            rec['ptr'].append(state['memory']['ptr'])
    rec['params'] = [p.detach().clone() for p in params]
    return rec


def _views(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(cfg['sizes'])
    return [torch.randn(n, cfg['in_dim'], generator=g, dtype=torch.float64) for _ in range(2)]


def _maxdiff(a, b):
    if a is None or b is None:
        assert a is None and b is None, 'one side has a gradient, the other none'
        return 0.0
    return float((torch.as_tensor(a).detach() - torch.as_tensor(b).detach()).abs().max())


def _compare_runs(ours, theirs, train_codebooks):
    """Max absolute differences per recorded quantity; the codebook has a gradient only when trained."""
    assert len(ours['loss']) == len(theirs['loss']) and ours['ptr'] == theirs['ptr']
    diffs = dict(loss=max(abs(a - b) for a, b in zip(ours['loss'], theirs['loss'])),
                 grads=max(_maxdiff(a, b) for ga, gb in zip(ours['grads'], theirs['grads']) for a, b in zip(ga, gb)),
                 queue=max(_maxdiff(a, b) for a, b in zip(ours['queue'], theirs['queue'])),
                 params=max(_maxdiff(a, b) for a, b in zip(ours['params'], theirs['params'])))
    assert (ours['grads'][0][2] is not None) == train_codebooks == (theirs['grads'][0][2] is not None)
    return diffs


# -----------------------------------------------------------------------------
# (a) live, against their code
def _component_inputs(seed=0, b=5, m=2, d=4, nq=7):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    f1, f2, queue = r(b, m * d), r(b, m * d), 0.3 * r(nq, m * d)
    p1, p2 = F.softmax(3 * r(b, m, 256), -1), F.softmax(3 * r(b, m, 256), -1)
    c = r(m, 256, d)
    return [t.requires_grad_() for t in (f1, f2, queue, p1, p2, c)]


@pytest.mark.parametrize('per_row', [True, False], ids=['per_row', 'release_broadcast'])
@pytest.mark.parametrize('rho, with_queue', [(0.15, True), (0.1, False), (0.9, True)])
def test_live_loss_and_gradients(ref, rho, with_queue, per_row, monkeypatch):
    # rho 0.9 drives (sum_neg - rho N pos) / (1 - rho) below zero for some rows: the clamp at e^{-N/T} acts
    monkeypatch.setattr(mecoq, 'PER_ROW_LOSS', per_row)
    theirs_in, ours_in = _component_inputs(), _component_inputs()
    s = dict(T=0.3, rho=rho, lam=0.7, gamma=0.5)
    f1, f2, q, p1, p2, c = theirs_in
    fn = (ref.loss_rows if per_row else ref.loss).MeCoQLoss(T=s['T'], mode='debias', pos_prior=rho,
                                                            hp_lambda=s['lam'], hp_gamma=s['gamma'])
    theirs = fn(f1, f2, q if with_queue else None, p1, p2, F.normalize(c, dim=-1))  # words with their gradient
    f1, f2, q, p1, p2, c = ours_in
    ours = mecoq.mecoq_loss(f1, f2, p1, p2, q if with_queue else None, c, s)
    assert abs(ours.item() - theirs.item()) < TOL
    theirs.backward()
    ours.backward()
    for a, b in zip(ours_in, theirs_in):
        if a is q and not with_queue:
            continue
        assert _maxdiff(a.grad, b.grad) < TOL


def test_live_quantization(ref):
    g = torch.Generator().manual_seed(1)
    pq = ref.network.PQLayer(12, 3, 256, alpha=10, flag=True).double()
    z = torch.randn(9, 12, generator=g, dtype=torch.float64, requires_grad=True)
    z_hat, codes = pq(z)
    ours_z = z.detach().clone().requires_grad_()
    c = pq._C.detach().clone().requires_grad_()
    our_hat, our_p = mecoq.soft_quantize(ours_z, c)
    assert _maxdiff(our_hat, z_hat) < TOL and _maxdiff(our_p, codes) < TOL
    (z_hat * torch.arange(12.)).sum().backward()
    (our_hat * torch.arange(12.)).sum().backward()
    assert _maxdiff(ours_z.grad, z.grad) < TOL and _maxdiff(c.grad, pq._C.grad) < TOL
    _, hard = pq(z, hard_quant=True)
    assert torch.equal(mecoq.hard_codes(z.detach(), c.detach()), hard)
    assert _maxdiff(mecoq.reconstruct(our_p, c), pq.reconstruct(codes)) < TOL


@pytest.mark.parametrize('mode', [(True, True), (False, False), (True, False), (False, True)],
                         ids=['paper', 'release', 'trained_codebooks_release_loss', 'frozen_codebooks_per_row'])
def test_live_training_run(ref, mode, monkeypatch):
    cfg = LIVE
    head = _head(cfg, mode, monkeypatch)
    views = _views(cfg, 2)
    theirs, _ = _their_run(ref, head, views, cfg, mode)
    ours = _our_run(head, views, cfg)
    diffs = _compare_runs(ours, theirs, mode[0])
    assert max(diffs.values()) < TOL, diffs
    assert len(ours['loss']) == 9 and ours['ptr'][:3] == [16, 8, 0]  # 2 x 8 per step, mod 24


def test_live_lr_schedule(ref):
    for spe, epochs in ((3, 4), (1, 5), (40, 50)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = ref.Scheduler(opt, mecoq.START_LR, mecoq.LR, mecoq.FINAL_LR, epochs, spe, mecoq.WARMUP_EPOCHS)
        for step in range(spe * epochs):
            assert abs(sched.step() - mecoq.lr_at(step, spe, epochs)) < 1e-12


def _distinct_codes(codes):
    """The first item of each distinct code, in index order."""
    return np.sort(np.unique(codes, axis=0, return_index=True)[1])


def test_live_ranking(ref, monkeypatch):
    """Their db codes and Evaluator.MAP (asymmetric distance) against encode_codes and eval_hash.map_aqd."""
    cfg = LIVE
    head = _head(cfg, MODES['paper'], monkeypatch, seed=3)
    model = _ref_model(ref, head, True, cfg['queue'], dict(queue=[], ptr=[]))
    g = torch.Generator().manual_seed(4)
    x_r, x_q = (torch.randn(n, cfg['in_dim'], generator=g, dtype=torch.float64) for n in (300, 20))
    y_r, y_q = ((torch.rand(n, 5, generator=g) < 0.3).long() for n in (300, 20))
    db_codes, _ = ref.db_codes([(x_r, y_r)], model)
    codes = mecoq.encode_codes(head, x_r)
    assert codes.dtype == np.uint8 and np.array_equal(codes, db_codes.numpy())
    keep = _distinct_codes(codes)  # items sharing a code tie: torch.argsort orders them arbitrarily, we by index
    x_r, y_r, db_codes, codes = x_r[keep], y_r[keep], db_codes[keep], codes[keep]
    ev = ref.Evaluator(feat_dim=cfg['feat_dim'], M=head.M, K=256, is_asym_dist=True)
    ev.set_codebooks(model.pq_layer.codebooks)
    ev.set_db_codes(db_codes)
    ev.set_db_targets(y_r)
    with torch.no_grad():
        q_z = head.eval()(x_q).numpy()
    assert len(keep) > 150
    for topk in (50, len(keep)):
        theirs = ev.MAP([(x_q, y_q)], model, topK=topk)
        ours = eval_hash.map_aqd(q_z, codes, mecoq.codebooks(head).numpy(), y_q.numpy(), y_r.numpy(), topk, mecoq.AQD)
        assert abs(ours - theirs) < TOL


def test_live_scripts_match_settings(ref):
    """Every per-dataset script's flags against the port's SCRIPTS table (and the shared ones against the
    module's constants)."""
    import glob
    import re
    names = {'Flickr': 'flickr25k', 'Nuswide': 'nuswide', 'CifarII': 'cifar10', 'CifarI': 'cifar10-I'}
    seen = set()
    for path in sorted(glob.glob(os.path.join(REFS, 'scripts', 'run*.sh'))):
        flags = dict(re.findall(r'--(\w+) (\S+)', open(path).read()))
        note = re.match(r'(CifarII|CifarI|Flickr|Nuswide)(\d+)bits', flags['notes'])
        key = (names[note.group(1)], int(note.group(2)))
        want = (int(flags['feat_dim']), float(flags['T']), float(flags['hp_beta']), float(flags['hp_lambda']),
                float(flags['pos_prior']), int(flags['queue_begin_epoch']))
        assert mecoq.SCRIPTS[key] == want, path
        assert int(flags['M']) == key[1] // 8 and flags['mode'] == 'debias'
        seen.add(key)
    assert seen == set(mecoq.SCRIPTS)


# -----------------------------------------------------------------------------
# (b) the golden file, written by their code, replayed without it
@pytest.mark.skipif(os.environ.get('DUHEG_WRITE_GOLDEN') != '1', reason='set DUHEG_WRITE_GOLDEN=1 to rewrite it')
def test_write_golden(ref, monkeypatch):
    cfg, out = SMALL, {}
    views = _views(cfg, 5)
    head = _head(cfg, MODES['paper'], monkeypatch, seed=6)
    out.update(v1=views[0].numpy(), v2=views[1].numpy(), W0=head.projection.weight.detach().numpy().copy(),
               b0=head.projection.bias.detach().numpy().copy(), C0=head.C.detach().numpy().copy())
    for mode in ('paper', 'release'):
        head = _head(cfg, MODES[mode], monkeypatch, init=(out['W0'], out['b0'], out['C0']))
        rec, model = _their_run(ref, head, views, cfg, MODES[mode])
        g0 = rec['grads'][0]
        out.update({f'{mode}_loss': np.array(rec['loss']), f'{mode}_ptr': np.array(rec['ptr']),
                    f'{mode}_queue_end': rec['queue'][-1].numpy(), f'{mode}_grad0_W': g0[0].numpy(),
                    f'{mode}_grad0_b': g0[1].numpy(), f'{mode}_W_end': rec['params'][0].numpy(),
                    f'{mode}_b_end': rec['params'][1].numpy(), f'{mode}_C_end': rec['params'][2].numpy()})
        if mode == 'paper':
            out['paper_grad0_C'] = g0[2].numpy()
    g = torch.Generator().manual_seed(7)  # their ranking of the paper run's model
    x_r, x_q = (torch.randn(n, cfg['in_dim'], generator=g, dtype=torch.float64) for n in (60, 6))
    y_r, y_q = ((torch.rand(n, 4, generator=g) < 0.35).long() for n in (60, 6))
    head = _head(cfg, MODES['paper'], monkeypatch, init=[out[f'paper_{k}_end'] for k in 'WbC'])
    model = _ref_model(ref, head, True, cfg['queue'], dict(queue=[], ptr=[]))
    db_codes, _ = ref.db_codes([(x_r, y_r)], model)
    keep = _distinct_codes(db_codes.numpy())  # no ties (see test_live_ranking)
    x_r, y_r, db_codes = x_r[keep], y_r[keep], db_codes[keep]
    ev = ref.Evaluator(feat_dim=cfg['feat_dim'], M=head.M, K=256, is_asym_dist=True)
    ev.set_codebooks(model.pq_layer.codebooks)
    ev.set_db_codes(db_codes)
    ev.set_db_targets(y_r)
    out.update(x_r=x_r.numpy(), x_q=x_q.numpy(), y_r=y_r.numpy(), y_q=y_q.numpy(), db_codes=db_codes.numpy(),
               map30=ev.MAP([(x_q, y_q)], model, topK=30))
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    np.savez_compressed(GOLDEN, **out)
    assert os.path.getsize(GOLDEN) < 200_000


@pytest.mark.parametrize('mode', ['paper', 'release'])
def test_golden(mode, monkeypatch):
    gold = np.load(GOLDEN)
    cfg = SMALL
    head = _head(cfg, MODES[mode], monkeypatch, init=(gold['W0'], gold['b0'], gold['C0']))
    ours = _our_run(head, [torch.as_tensor(gold['v1']), torch.as_tensor(gold['v2'])], cfg)
    assert np.abs(np.array(ours['loss']) - gold[f'{mode}_loss']).max() < TOL
    assert ours['ptr'] == gold[f'{mode}_ptr'].tolist()
    assert _maxdiff(ours['queue'][-1], gold[f'{mode}_queue_end']) < TOL
    for k, got in zip('Wb', ours['grads'][0]):
        assert _maxdiff(got, gold[f'{mode}_grad0_{k}']) < TOL
    assert (ours['grads'][0][2] is None) == (mode == 'release')
    if mode == 'paper':
        assert _maxdiff(ours['grads'][0][2], gold['paper_grad0_C']) < TOL
    for k, got in zip('WbC', ours['params']):
        assert _maxdiff(got, gold[f'{mode}_{k}_end']) < TOL
    if mode == 'paper':  # their codes and MAP@30 of the trained model
        codes = mecoq.encode_codes(head, gold['x_r'])
        assert np.array_equal(codes, gold['db_codes'])
        with torch.no_grad():
            q_z = head(torch.as_tensor(gold['x_q'])).numpy()
        got = eval_hash.map_aqd(q_z, codes, mecoq.codebooks(head).numpy(), gold['y_q'], gold['y_r'], 30, mecoq.AQD)
        assert abs(got - float(gold['map30'])) < TOL


# -----------------------------------------------------------------------------
# (c) by hand
def test_debiased_nt_xent_two_by_two():
    # views e1, e2 and again e1, e2: each row's positive has cosine 1, its two negatives cosine 0. T = 0.5:
    # pos = e^2, sum_neg = 2; N = 2B - 2 = 2; rho = 0.1: Ng = (2 - 0.1 * 2 * e^2) / 0.9 = 0.58024 > e^{-4};
    # every row: -log(e^2 / (e^2 + Ng)) = log(1 + Ng e^{-2}) = 0.075592
    v = torch.tensor([[1., 0.], [0., 1.]])
    ng = (2 - 0.1 * 2 * math.e ** 2) / 0.9
    assert mecoq.debiased_nt_xent(v, v, None, 0.5, 0.1).item() == pytest.approx(math.log1p(ng / math.e ** 2),
                                                                                abs=1e-6)
    assert math.log1p(ng / math.e ** 2) == pytest.approx(0.075592, abs=1e-6)
    # rho = 0.5: (2 - e^2) / 0.5 < 0, clamped to e^{-N/T} = e^{-4}: log(1 + e^{-6})
    assert mecoq.debiased_nt_xent(v, v, None, 0.5, 0.5).item() == pytest.approx(math.log1p(math.exp(-6)), abs=1e-7)
    # a memory of one feature (2, 0), not normalised: logit 2 / 0.5 = 4 for the e1 rows, 0 for the e2 rows;
    # rho = 0: Ng = 2 + e^4 and 2 + 1
    q = torch.tensor([[2., 0.]])
    want = (2 * math.log1p((2 + math.e ** 4) / math.e ** 2) + 2 * math.log1p(3 / math.e ** 2)) / 4
    assert mecoq.debiased_nt_xent(v, v, q, 0.5, 0.0).item() == pytest.approx(want, abs=1e-6)


def test_release_broadcast_by_hand():
    # v1 = (e1, e2), v2 = (e1, (e1 + e2)/sqrt 2), T = 1, rho = 0, r = 1/sqrt 2. Rows (a, b, c, d):
    # positives e^1, e^r, e^1, e^r; negative sums 1 + e^r, 2, 1 + e^r, 2 e^r (cosines 0 or r).
    # per row: mean_i log(1 + neg_i / pos_i); the release: mean over all (i, j) of log(1 + neg_j / pos_i)
    r = 1 / math.sqrt(2)
    pos = [math.e, math.exp(r), math.e, math.exp(r)]
    neg = [1 + math.exp(r), 2, 1 + math.exp(r), 2 * math.exp(r)]
    v1, v2 = torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[1., 0.], [1., 1.]])
    rows = sum(math.log1p(n / p) for p, n in zip(pos, neg)) / 4
    pairs = sum(math.log1p(n / p) for p in pos for n in neg) / 16
    assert mecoq.debiased_nt_xent(v1, v2, None, 1.0, 0.0).item() == pytest.approx(rows, abs=1e-6)
    assert mecoq.debiased_nt_xent(v1, v2, None, 1.0, 0.0, per_row=False).item() == pytest.approx(pairs, abs=1e-6)
    assert abs(rows - pairs) > 1e-3  # 0.0012: the two differ


def test_soft_assignment_one_codebook_two_words():
    # words (1, 0) and (0, 1); z = (3, 0) -> unit (1, 0): inner products (1, 0), p = softmax(10, 0)
    c = torch.tensor([[[1., 0.], [0., 1.]]])
    z_hat, p = mecoq.soft_quantize(torch.tensor([[3., 0.], [1., 1.]]), c)
    p0 = 1 / (1 + math.exp(-10))
    assert p[0, 0].tolist() == pytest.approx([p0, 1 - p0], abs=1e-7)
    assert z_hat[0].tolist() == pytest.approx([p0, 1 - p0], abs=1e-7)
    # z = (1, 1): both words at 1/sqrt(2): p = (1/2, 1/2), z_hat = (1/2, 1/2)
    assert p[1, 0].tolist() == pytest.approx([0.5, 0.5]) and z_hat[1].tolist() == pytest.approx([0.5, 0.5])
    assert mecoq.hard_codes(torch.tensor([[3., 0.], [-1., 2.]]), c).tolist() == [[0], [1]]


def test_entropy_and_word_correlation():
    # p = (1/2, 1/2) in one codebook, (1, 0)-ish in the other: entropies ln 2 and ~0, mean ln2 / 2
    p = torch.tensor([[[0.5, 0.5], [1 - 1e-12, 1e-12]]])
    assert mecoq.code_entropy(p).item() == pytest.approx(math.log(2) / 2, abs=1e-9)
    # orthonormal words: C C^T = I, mean over the 2 x 2 entries = 1/2; two equal words: all ones, mean 1
    assert mecoq.codeword_correlation(torch.tensor([[[1., 0.], [0., 1.]]])).item() == pytest.approx(0.5)
    assert mecoq.codeword_correlation(torch.tensor([[[0., 1.], [0., 1.]]])).item() == pytest.approx(1.0)


def test_memory_pointer():
    # 4 slots, enqueue size 2: two rows at 0-1 (pointer 2), a short batch of one at 2 (pointer 0: it moves by 2)
    mem = mecoq.new_memory(1, torch.float64, 'cpu', queue_size=4, enqueue_size=2)
    a = torch.full((2, 1, 256), 1.0, dtype=torch.float64)
    mecoq.push(mem, a)
    old = mem['codes']
    mecoq.push(mem, torch.full((1, 1, 256), 2.0, dtype=torch.float64))
    assert mem['ptr'] == 0 and mem['codes'][:, 0, 0].tolist() == [1, 1, 2, 0]
    assert old[:, 0, 0].tolist() == [1, 1, 0, 0]  # out of place: a rebuilt memory's saved codes stay intact
    with pytest.raises(ValueError, match='BATCH_SIZE'):
        mecoq.push(mem, torch.zeros((3, 1, 256), dtype=torch.float64))


def test_lr_at_by_hand():
    # 2 steps an epoch, 3 epochs: warm-up [1e-5, 0.01], then 4 cosine steps from 0.01 towards 1e-5
    half = 0.5 * (0.01 - 1e-5)
    want = [1e-5, 0.01, 0.01, 1e-5 + half * (1 + math.cos(math.pi / 4)), 1e-5 + half,
            1e-5 + half * (1 + math.cos(3 * math.pi / 4))]
    assert [mecoq.lr_at(s, 2, 3) for s in range(6)] == pytest.approx(want, abs=1e-15)
    assert mecoq.lr_at(99, 2, 3) == pytest.approx(want[-1])


def test_settings():
    s = mecoq.settings_for('flickr25k', 16)
    assert (s['feat_dim'], s['T'], s['lam'], s['rho'], s['weight_decay'], s['queue_begin_epoch'], s['M']) == \
        (32, 0.4, 0.5, 0.15, 0.1, 5, 2)
    assert (mecoq.settings_for('nuswide', 16)['T'], mecoq.settings_for('nuswide', 16)['lam']) == (0.2, 1.0)
    assert mecoq.settings_for('cifar10', 16)['T'] == 0.35  # the project's split is their protocol II
    coco = mecoq.settings_for('mscoco', 32)
    assert coco['T'] == 0.45 and coco['script'] == 'flickr25k 32 bits, for mscoco 32 bits'
    odd = mecoq.settings_for('nuswide', 24)  # nearest scripted length 16 (tie with 32: the shorter), 16 / codebook
    assert odd['T'] == 0.2 and odd['feat_dim'] == 48 and odd['M'] == 3
    with pytest.raises(ValueError, match='multiple of 8'):
        mecoq.settings_for('flickr25k', 12)
    with pytest.raises(ValueError, match='unknown MeCoQ setting'):
        mecoq.Head(8, 16, 'flickr25k', tau=1.0)


def test_head_codes_and_ranking(monkeypatch):
    monkeypatch.setattr(mecoq, 'TRAIN_CODEBOOKS', True)
    torch.manual_seed(0)
    head = mecoq.Head(20, 32, 'flickr25k')
    assert head.C.shape == (4, 256, 16) and head.projection.out_features == 64 and head.C.requires_grad
    x = torch.randn(50, 20)
    head.train()
    assert not torch.equal(head(x), head(x))  # the release's input dropout, in training only
    head.eval()
    assert torch.equal(head(x), head(x))
    mecoq.normalize_codebooks(head)
    codes = mecoq.encode_codes(head, x.numpy())
    with torch.no_grad():
        z = head(x)
    # unit words: the L2-nearest word of the raw z (pq_encode) is the inner-product argmax
    assert np.array_equal(codes, pq_encode(z, mecoq.codebooks(head)).numpy())
    # AQD 'ip': eval_hash's tables are minus the inner products of the raw query with the item's words
    c = mecoq.codebooks(head).numpy().astype(np.float64)
    score = sum(z.numpy()[:3, m * 16:(m + 1) * 16].astype(np.float64) @ c[m][codes[:, m]].T for m in range(4))
    t = eval_hash.aqd_tables(z.numpy()[:3], c, mecoq.AQD)
    assert np.allclose(-t[:, np.arange(4), codes].sum(-1), score)


def test_paper_or_release_switch(monkeypatch):
    """Same weights, same batch: the same loss in both settings (the word term is there, as a constant in the
    release), a codebook gradient only when trained; the optimizer then leaves the release's words alone."""
    losses, grads = {}, {}
    for paper in (True, False):
        head = _head(SMALL, (paper, True), monkeypatch, seed=8)
        v1, v2 = _views(SMALL, 9)
        opt = mecoq.optimizer(head)
        state = mecoq.epoch_start(head, None, None, 1, None, 'cpu')
        loss = mecoq.batch_loss(head, None, v1[:4], v2[:4], None, state, 1, None)
        loss.backward()
        words = head.C.detach().clone()
        opt.step()
        losses[paper], grads[paper] = loss.item(), head.C.grad
        assert torch.equal(head.C.detach(), words) != paper
        assert state['use_queue'] and state['memory']['ptr'] == 8  # two pushes of 4 into 12 slots
    assert losses[True] == pytest.approx(losses[False], abs=1e-12)
    assert grads[False] is None and grads[True].abs().max() > 0
