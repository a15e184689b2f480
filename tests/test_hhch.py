"""HHCH's port (methods/hhch.py) against the authors' code, HUST-IDSM-AI/HHCH at 47eac18.

Three kinds of check:
- live: their src/Loss.py, hyptorch and hierarchical K-Means (from $DUHEG_REFS/HHCH, default /work/refs/HHCH;
  skipped when absent, or without pyclustering) and ours on the same seeded inputs: losses and gradients in
  float64 and float32, the ball map, the prototypes and assignments of the clustering. With
  DUHEG_WRITE_GOLDEN=1 the live test writes their outputs to tests/golden/hhch.npz:
      DUHEG_WRITE_GOLDEN=1 python -m pytest -q tests/test_hhch.py -k live
- golden: ours against those stored outputs of their code (runs without it, as in CI);
- by hand: cases small enough to work out on paper.
Their clustering draws its initial centres from an unseeded generator; both sides here use ours
(hhch.draw_centers), through a stand-in for pyclustering's random_center_initializer.
"""
import ast
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from methods import hhch  # noqa: E402

REFS = os.path.join(os.environ.get('DUHEG_REFS', '/work/refs'), 'HHCH')
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'hhch.npz')
THEIR_PACKAGES = ('Loss', 'models', 'hyptorch', 'utils', 'dataLoader', 'options', 'main')
LOSS_CASES = (('c0.01', 0.01, 'float64'), ('c0.1', 0.1, 'float64'), ('c0', 0.0, 'float64'),
              ('c1', 1.0, 'float64'), ('c0.01_f32', 0.01, 'float32'))
KMEANS_CASES = (('km_c0.01', 0.01, 0), ('km_c0.1', 0.1, 1), ('km_c0', 0.0, 2),
                ('km_dup', 0.1, 8))  # km_dup: each point three times; two equal initial centres empty one cluster
BALL_CASES = (('ball_c0.01', 0.01, 2.3), ('ball_c1', 1.0, 10.0))
GRADS = ('p1', 'p2', 'h1', 'h2')


# -----------------------------------------------------------------------------
# Inputs: seeded numpy draws, the same for their code and ours
def loss_inputs(seed, c, n=12, batch=8, dim=6, bits=8, clusters=(5, 4, 3)):
    """Two views' points p (inside the ball; near its edge when c = 1) and codes h of a batch of `batch`
    items (rows idx of n), and a random 3-level hierarchy: im2cluster per level and centroids."""
    rng = np.random.default_rng(seed)

    def points(rows):  # c = 1: norms in (0.99, 0.9999), where artanh's clamp is reached
        v = rng.normal(size=(rows, dim))
        return v * 0.5 if c != 1 else v / np.linalg.norm(v, axis=1, keepdims=True) * rng.uniform(0.99, 0.9999,
                                                                                               (rows, 1))
    case = {k: points(batch) for k in ('p1', 'p2')}
    case.update({k: np.tanh(rng.normal(size=(batch, bits))) for k in ('h1', 'h2')})
    case['idx'] = rng.permutation(n)[:batch]
    inputs = n
    for level, k in enumerate(clusters):
        case[f'im2cluster{level}'] = rng.integers(0, k, inputs).astype(np.float64)
        case[f'centroids{level}'] = points(k)
        inputs = k
    return case


def kmeans_points(name, seed, n=150, dim=6, blobs=6):
    """n points around `blobs` centres, well inside the ball of c = 0.1 (radius 3.16); for km_dup n / 3
    points, each three times."""
    rng = np.random.default_rng(100 + seed)
    m = n // 3 if name == 'km_dup' else n
    centres = rng.normal(size=(blobs, dim)) * 0.6
    points = centres[rng.integers(0, blobs, m)] + rng.normal(size=(m, dim)) * 0.2
    return np.repeat(points, n // m, axis=0)


def levels(case, key):
    return [case[f'{key}{level}'] for level in range(3)]


# -----------------------------------------------------------------------------
# Ours
def our_loss(case, c, dtype):
    """Our losses and the gradient of their sum on the case's inputs."""
    dtype = getattr(torch, str(dtype))
    t = {k: torch.tensor(case[k], dtype=dtype, requires_grad=True) for k in GRADS}
    labels = [torch.as_tensor(lab).long() for lab in levels(case, 'im2cluster')]
    index = hhch.proto_indices(labels)[torch.as_tensor(case['idx'])]
    prototypes = [torch.tensor(p, dtype=dtype) for p in levels(case, 'centroids')]
    out = dict(hic=hhch.hic_loss(t['p1'], t['p2'], index, hhch.TAU, c),
               hpc=hhch.hpc_loss(t['p1'], t['p2'], prototypes, index, hhch.TAU, c),
               q=hhch.quantization_loss(t['h1'], t['h2']),
               total=hhch.total_loss(t['h1'], t['p1'], t['h2'], t['p2'], index, prototypes, hhch.TAU,
                                     hhch.LAMBDA_Q, c))
    grads = torch.autograd.grad(out['total'], [t[k] for k in GRADS])
    out.update({f'grad_{k}': g for k, g in zip(GRADS, grads)})
    return {k: v.detach().double().numpy() for k, v in out.items()}


def our_kmeans(points, c, rows):
    """Our hierarchical K-Means from the given initial rows per level."""
    draws = iter(rows)
    prototypes, labels = hhch.hierarchical_kmeans(torch.as_tensor(points), (12, 6, 3), c,
                                                  lambda n, k: torch.as_tensor(next(draws)))
    return dict(centroids=[p.numpy() for p in prototypes], im2cluster=[lab.numpy() for lab in labels],
                center_index=hhch.proto_indices(labels).numpy())


def our_ball(u, c, clip_r, w):
    u = torch.tensor(u, requires_grad=True)
    out = hhch.ToBall(c, clip_r)(u)
    (grad,) = torch.autograd.grad((out * torch.as_tensor(w)).sum(), u)
    return out.detach().numpy(), grad.numpy()


# -----------------------------------------------------------------------------
# Theirs
class _Float64Torch(types.ModuleType):
    """torch, except that torch.float32 is float64: Loss.contrastive_proto casts the prototypes to float32
    (Loss.py:136, 144), which a float64 run of it cannot mix with float64 points."""
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _main_functions(loss):
    """main.py's computeQuantLoss, computeInstanceLoss, computeProtoLoss (main.py:141-176), compiled from their
    source alone: main.py's own imports need cv2 and their data loaders."""
    path = os.path.join(REFS, 'src', 'main.py')
    names = {'computeQuantLoss', 'computeInstanceLoss', 'computeProtoLoss'}
    tree = ast.parse(open(path).read())
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert len(body) == 3, 'main.py no longer defines the three loss functions'
    ns = dict(torch=torch, contrastive_loss=loss.contrastive_loss, contrastive_proto=loss.contrastive_proto,
              hierarchical_contrastive_loss=loss.hierarchical_contrastive_loss)
    exec(compile(ast.Module(body=body, type_ignores=[]), path, 'exec'), ns)
    return types.SimpleNamespace(**{n: ns[n] for n in names})


@pytest.fixture(scope='module')
def their_code():
    """Their Loss, hyptorch.nn and models.clustering, imported from $DUHEG_REFS/HHCH/src with their package
    names (models, utils) kept apart from ours in sys.modules."""
    src = os.path.join(REFS, 'src')
    if not os.path.isfile(os.path.join(src, 'Loss.py')):
        pytest.skip(f"the authors' code is not at {REFS}: fetch HUST-IDSM-AI/HHCH there or set DUHEG_REFS")
    for module in ('pyclustering', 'scipy', 'sklearn', 'matplotlib'):
        pytest.importorskip(module, reason=f"their clustering imports {module} (pip install pyclustering)")

    def theirs(name):
        return name.split('.')[0] in THEIR_PACKAGES
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if theirs(name)}
    sys.path.insert(0, src)
    try:
        import importlib
        loss = importlib.import_module('Loss')
        code = types.SimpleNamespace(loss=loss, main=_main_functions(loss),
                                     nn=importlib.import_module('hyptorch.nn'),
                                     clustering=importlib.import_module('models.clustering'))
    finally:
        sys.path.remove(src)
        for name in [name for name in sys.modules if theirs(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
    return code


@pytest.fixture
def theirs(their_code, monkeypatch):
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)  # their .cuda() calls, on the CPU
    return their_code


def their_loss(code, case, c, dtype, monkeypatch):
    """Their losses as train_step sums them (main.py:198-206), and the gradient of the sum."""
    with monkeypatch.context() as patch:
        if dtype == 'float64':
            patch.setattr(code.loss, 'torch', _Float64Torch('torch'))
        return _their_loss(code, case, c, dtype)


def _their_loss(code, case, c, dtype):
    t = {k: torch.tensor(case[k], dtype=getattr(torch, dtype), requires_grad=True) for k in GRADS}
    results = {'centroids': levels(case, 'centroids'), 'im2cluster': levels(case, 'im2cluster')}
    corresponding, center_index = code.loss.parse_proto(results, [len(p) for p in results['centroids']])
    option = types.SimpleNamespace(HIC=True, IC=False, HPC=True, tau=hhch.TAU, hyper_c=c, lambda_q=hhch.LAMBDA_Q)
    index = torch.as_tensor(case['idx'])
    out = dict(hic=code.main.computeInstanceLoss(t['p1'], t['p2'], option, center_index, index),
               hpc=code.main.computeProtoLoss(t['p1'], t['p2'], option, corresponding, center_index, index,
                                              results),
               q=code.main.computeQuantLoss(t['h1'], t['h2']))
    out['total'] = 1. * out['hic'] + option.lambda_q * out['q'] + out['hpc']  # main.py:206
    grads = torch.autograd.grad(out['total'], [t[k] for k in GRADS])
    out.update({f'grad_{k}': g for k, g in zip(GRADS, grads)})
    return {k: v.detach().double().numpy() for k, v in out.items()}


def their_kmeans(code, points, c, seed, monkeypatch):
    """Their hierarchical K-Means (clustering.py:41-69) and parse_proto, initial centres from our draw."""
    gen, rows = torch.Generator().manual_seed(seed), []

    class Initializer:  # in place of pyclustering's random_center_initializer (clustering.py:55)
        def __init__(self, data, amount_centers, **kwargs):
            self.data, self.k = np.asarray(data), amount_centers

        def initialize(self, **kwargs):
            rows.append(hhch.draw_centers(len(self.data), self.k, gen).numpy())
            return [self.data[i] for i in rows[-1]]
    with monkeypatch.context() as patch:
        patch.setattr(code.clustering, 'random_center_initializer', Initializer)
        results = code.clustering.hierarchical_clustering_K_Means(None, points, [12, 6, 3], c)
    _, center_index = code.loss.parse_proto(results, [12, 6, 3])
    return dict(centroids=results['centroids'], im2cluster=results['im2cluster'], center_index=center_index,
                rows=rows)


def their_ball(code, u, c, clip_r, w):
    u = torch.tensor(u, requires_grad=True)
    out = code.nn.ToPoincare(c=c, ball_dim=u.shape[1], riemannian=False, clip_r=clip_r)(u)
    (grad,) = torch.autograd.grad((out * torch.as_tensor(w)).sum(), u)
    return out.detach().numpy(), grad.numpy()


def ball_inputs(seed):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(6, 5)) * np.array([[0.1], [0.5], [1.0], [2.0], [4.0], [8.0]])  # some beyond clip_r
    return u, rng.normal(size=u.shape)


# -----------------------------------------------------------------------------
def _compare(ours, theirs, label, tol, diffs):
    for key, want in theirs.items():
        got = ours[key]
        if isinstance(want, list):
            assert len(got) == len(want), (label, key)
            for level, (g, w) in enumerate(zip(got, want)):
                _compare({key: g}, {key: np.asarray(w, dtype=np.float64)}, f'{label} level {level}', tol, diffs)
            continue
        want = np.asarray(want, dtype=np.float64)
        assert got.shape == want.shape, (label, key, got.shape, want.shape)
        diff = float(np.abs(got - want).max()) if want.size else 0.0
        diffs[f'{label} {key}'] = diff
        assert diff <= tol * max(1.0, float(np.abs(want).max())), (label, key, diff)


def check_kmeans(got, want, name, diffs):
    """The same clusters at every level (exactly), the same prototypes (to rounding)."""
    assert [len(p) for p in got['centroids']] == [len(p) for p in want['centroids']], name
    for level, (g, w) in enumerate(zip(got['im2cluster'], want['im2cluster'])):
        assert np.array_equal(g, np.asarray(w)), (name, level)
    assert np.array_equal(got['center_index'], want['center_index']), name
    _compare(got, {'centroids': want['centroids']}, name, 1e-12, diffs)


def _tolerance(dtype):
    return 1e-12 if dtype == 'float64' else 2e-5


def test_live_against_authors_code(theirs, monkeypatch, one_thread):
    """Ours and theirs on the same seeded inputs; with DUHEG_WRITE_GOLDEN=1, their outputs go to GOLDEN."""
    golden, diffs = {'commit': np.array('47eac18aedf3a2f8623002a702da28aec8aafd0b')}, {}
    for seed, (name, c, dtype) in enumerate(LOSS_CASES):
        case = loss_inputs(seed, c)
        want = their_loss(theirs, case, c, dtype, monkeypatch)
        _compare(our_loss(case, c, dtype), want, name, _tolerance(dtype), diffs)
        golden.update({f'{name}/{k}': v for k, v in {**case, **want}.items()})
    for name, c, seed in KMEANS_CASES:
        points = kmeans_points(name, seed)
        want = their_kmeans(theirs, points, c, seed, monkeypatch)
        rows = want.pop('rows')
        check_kmeans(our_kmeans(points, c, rows), want, name, diffs)
        golden[f'{name}/points'] = points
        golden.update({f'{name}/rows{level}': r for level, r in enumerate(rows)})
        golden.update({f'{name}/{key}{level}': np.asarray(v) for key in ('centroids', 'im2cluster')
                       for level, v in enumerate(want[key])})
        golden[f'{name}/center_index'] = want['center_index']
    for seed, (name, c, clip_r) in enumerate(BALL_CASES):
        u, w = ball_inputs(200 + seed)
        out, grad = their_ball(theirs, u, c, clip_r, w)
        _compare(dict(zip(('out', 'grad'), our_ball(u, c, clip_r, w))), {'out': out, 'grad': grad}, name, 1e-12,
                 diffs)
        golden.update({f'{name}/u': u, f'{name}/w': w, f'{name}/out': out, f'{name}/grad': grad})
    print('\n'.join(f'max |ours - theirs| {k}: {v:.3g}' for k, v in diffs.items()))
    if os.environ.get('DUHEG_WRITE_GOLDEN') == '1':
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        np.savez_compressed(GOLDEN, **golden)


# -----------------------------------------------------------------------------
def _golden():
    assert os.path.isfile(GOLDEN), f'{GOLDEN} is missing: DUHEG_WRITE_GOLDEN=1 pytest tests/test_hhch.py -k live'
    with np.load(GOLDEN) as f:
        data = {k: f[k] for k in f.files}
    return {name: {k.split('/', 1)[1]: v for k, v in data.items() if k.startswith(name + '/')}
            for name in {k.split('/', 1)[0] for k in data if '/' in k}}


def test_golden_losses_and_gradients(one_thread):
    """Our L_HIC, L_HPC, L_Q, their sum and its gradients against their code's, stored in GOLDEN."""
    golden, diffs = _golden(), {}
    for name, c, dtype in LOSS_CASES:
        case = golden[name]
        want = {k: case[k] for k in ('hic', 'hpc', 'q', 'total') + tuple(f'grad_{g}' for g in GRADS)}
        _compare(our_loss(case, c, dtype), want, name, _tolerance(dtype), diffs)


def test_golden_clustering_and_ball(one_thread):
    """Our hierarchical hyperbolic K-Means (from their initial rows) and ball map against their code's."""
    golden, diffs = _golden(), {}
    for name, c, _ in KMEANS_CASES:
        case = golden[name]
        want = {key: levels(case, key) for key in ('centroids', 'im2cluster')}
        want['center_index'] = case['center_index']
        check_kmeans(our_kmeans(case['points'], c, levels(case, 'rows')), want, name, diffs)
    assert len(golden['km_dup']['centroids0']) < 12  # the case drops an empty cluster
    for name, c, clip_r in BALL_CASES:
        case = golden[name]
        got = dict(zip(('out', 'grad'), our_ball(case['u'], c, clip_r, case['w'])))
        _compare(got, {'out': case['out'], 'grad': case['grad']}, name, 1e-12, diffs)


# -----------------------------------------------------------------------------
# By hand
def test_poincare_distance_and_ball_map_by_hand():
    """c = 1: d(0, (1/2, 0)) = 2 artanh(1/2) = ln 3 and d((-1/2, 0), (1/2, 0)) = 2 ln 3 (distances add along a
    geodesic through 0); c = 1/4 scales distances by 2 and the ball by 2. Exactly, with the 1e-5 of the
    Möbius sum's denominator: 2 artanh(0.5 / (1 + 1e-5))."""
    x = torch.tensor([[0.0, 0.0], [-0.5, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    d = hhch.poincare_dist(x, y, 1.0)[:, 0]
    assert d[0].item() == pytest.approx(math.log(3), abs=1e-4)
    assert d[1].item() == pytest.approx(2 * math.log(3), abs=1e-4)
    assert d[0].item() == pytest.approx(2 * math.atanh(0.5 / (1 + 1e-5)), abs=1e-12)
    assert hhch.poincare_dist(2 * x, 2 * y, 0.25)[1, 0].item() == pytest.approx(2 * 2 * math.log(3), abs=2e-4)
    assert hhch.similarity(x[:1], y, 1.0).item() == pytest.approx(-d[0].item())
    u = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # ||u|| = 5: clipped to 2.3, then Exp_0 with c = 0.01
    clipped = u * 2.3 / (5 + 1e-5)
    assert torch.allclose(hhch.clip_features(u, 2.3), clipped, atol=1e-15)
    r = math.tanh(0.1 * 2.3 * 5 / (5 + 1e-5)) / 0.1  # |Exp_0(v)| = tanh(sqrt(c) |v|) / sqrt(c)
    assert torch.allclose(hhch.ToBall(0.01, 2.3)(u), torch.tensor([[0.6 * r, 0.8 * r]], dtype=torch.float64),
                          atol=1e-12)
    far = hhch.project(torch.tensor([[30.0, 40.0]], dtype=torch.float64), 0.01)  # beyond radius 10: to 9.99
    assert torch.allclose(far, torch.tensor([[0.6 * 9.99, 0.8 * 9.99]], dtype=torch.float64), atol=1e-12)


def test_masked_infonce_by_hand():
    """L_HIC one way on 3 items, cosine (c = 0), tau = 1, x0 = x1 = (e1, e2, e1); level 0 puts items 0 and 1
    together. Row 0 keeps its positive (cos 1), item 2 in both halves (1, 1): ln 3. Row 1 keeps its
    positive (1) and item 2 in both halves (0, 0): ln(e + 2) - 1. Row 2 keeps everything but itself
    in the x0 half: (1, 0, 1 | 1, 0): ln(3e + 2) - 1. A second level (0 | 1 2) gives the same three values
    on other rows, weighs 1/2, and the two levels are averaged: 3/4 of level 0's."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    e = math.e
    level0 = (math.log(3) + math.log(e + 2) - 1 + math.log(3 * e + 2) - 1) / 3
    one = hhch.hic_term(x, x, torch.tensor([[0], [0], [1]]), 1.0, 0)
    assert one.item() == pytest.approx(level0, abs=1e-12)
    two = hhch.hic_term(x, x, torch.tensor([[0, 0], [0, 1], [1, 1]]), 1.0, 0)
    assert two.item() == pytest.approx(0.75 * level0, abs=1e-12)
    mask = hhch.false_negative_mask(torch.tensor([0, 0, 1]))
    assert mask.tolist() == [[False, True, False] * 2, [True, False, False] * 2, [False, False, False] * 2]


def test_prototype_and_quantization_losses_by_hand():
    """L_HPC, cosine, tau = 1, one item at e1 in both views, prototypes (e1, e2), its own e1: each view gives
    -ln(e / (e + 1 + 1e-5)); L_Q of h1 = (1/2, -1), h2 = (0, 1): ((1/4 + 0) / 2 + (1 + 0) / 2) / 2."""
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    prototypes = [torch.eye(2, dtype=torch.float64)]
    want = 2 * -math.log(math.e / (math.e + 1 + float(torch.tensor(1e-5))))
    assert hhch.hpc_loss(z, z, prototypes, torch.tensor([[0]]), 1.0, 0).item() == pytest.approx(want, abs=1e-12)
    h1, h2 = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 1.0]])
    assert hhch.quantization_loss(h1, h2).item() == pytest.approx(0.3125)


def test_kmeans_drops_empty_clusters_by_hand():
    """Two identical initial centres: every point that is nearest to both goes to the first (first on ties),
    the second cluster is empty and is dropped, as pyclustering's (k_means.py:224); the two clusters left
    are {a, a} and {b, c}, each centre its members' Einstein midpoint."""
    a, b, c = [0.5, 0.0], [-0.5, 0.1], [-0.5, -0.1]
    x = torch.tensor([a, a, b, c], dtype=torch.float64)
    labels, centers = hhch.hyperbolic_kmeans(x, x[[0, 1, 2]], 1.0, 30, 1e-3)
    assert labels.tolist() == [0, 0, 1, 1]
    assert len(centers) == 2
    assert torch.allclose(centers[0], x[0], atol=1e-12)
    assert centers[1, 1].abs().item() < 1e-12 and -0.5 < centers[1, 0].item() < -0.45  # midpoint pulled to 0
    unmoved = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)  # the change is over all pairs of
    assert hhch._change(unmoved, unmoved, 1.0) == pytest.approx(2 * math.log(3), abs=1e-4)  # old and new: 2 ln 3
    index = hhch.proto_indices([torch.tensor([2, 0, 1]), torch.tensor([1, 1, 0])])
    assert index.tolist() == [[2, 0], [0, 1], [1, 1]]  # level 1 of item i: labels[1][labels[0][i]]


def test_lr_schedule_and_optimizer():
    """util.py:33-43: 1e-3 through epoch 29, then 1e-3 * 0.9 ** (epoch // 20): 0.9 at 30-39, 0.81 at 40-59."""
    assert [hhch.lr_at(e) for e in (0, 29)] == [1e-3, 1e-3]
    assert hhch.lr_at(30) == pytest.approx(9e-4) and hhch.lr_at(39) == pytest.approx(9e-4)
    assert hhch.lr_at(40) == pytest.approx(8.1e-4) and hhch.lr_at(79) == pytest.approx(7.29e-4)
    head = hhch.Head(16, 8)
    opt = hhch.optimizer(head)
    assert isinstance(opt, torch.optim.Adam) and [g['lr'] for g in opt.param_groups] == [1e-3, 1e-3]
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(head.parameters()))


# -----------------------------------------------------------------------------
# The harness's interface
def test_head_shapes_and_their_parameter_names():
    """model.py:33-39: hash_layer F -> 512 -> bits (dropout after the first Linear), head bits -> 128, so
    their checkpoint's names load; codes in (-1, 1), ball points inside radius 1/sqrt(c)."""
    head = hhch.Head(16, 8).eval()
    assert list(head.state_dict()) == ['hash_layer.0.weight', 'hash_layer.0.bias', 'hash_layer.3.weight',
                                       'hash_layer.3.bias', 'head.0.weight', 'head.0.bias']
    assert head.hash_layer[0].out_features == 512 and head.head[0].out_features == 128
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 10
    h, p = head.embed(x)
    assert torch.equal(h, head(x)) and h.abs().max() < 1 and p.shape == (5, 128)
    assert p.norm(dim=1).max() < 1 / math.sqrt(hhch.HYPER_C)


def test_epoch_start_and_batch_loss(monkeypatch, one_thread):
    """Per-epoch state from the plain features (same seed, same state; the head's mode kept), then a step:
    a finite loss whose gradient reaches every parameter."""
    monkeypatch.setattr(hhch, 'CLUSTERS', (10, 6, 3))
    torch.manual_seed(0)
    head, n = hhch.Head(16, 8), 60
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(1))
    aug = (x[:, None] + 0.1 * torch.randn(n, 2, 16, generator=torch.Generator().manual_seed(2))).half()
    states = [hhch.epoch_start(head, x, aug, 0, torch.Generator().manual_seed(3), 'cpu') for _ in range(2)]
    assert head.training
    s = states[0]
    assert s['proto_index'].shape == (n, 3) and [len(p) for p in s['prototypes']][0] <= 10
    assert all(torch.equal(a, b) for a, b in zip(s['prototypes'], states[1]['prototypes']))
    assert torch.equal(s['proto_index'], states[1]['proto_index'])
    assert s['prototypes'][0].dtype == torch.float32
    for level, proto in enumerate(s['prototypes']):  # every prototype index is in range and used
        assert int(s['proto_index'][:, level].max()) == len(proto) - 1
    idx = torch.arange(0, n, 3)
    loss = hhch.batch_loss(head, x[idx], aug[idx, 0].float(), aug[idx, 1].float(), idx, s, 0,
                           torch.Generator().manual_seed(4))
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
