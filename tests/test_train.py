"""Hand-worked values for the pieces of train.py: Eq. 5-6, 8, 9, 1 and 10-11."""
import math

import numpy as np
import pytest
import torch

import external
import train


def test_lr_schedule_eq10_11():
    # warm-up: lr_min + (lr_max - lr_min) * t / 10; then half-cosine over the remaining 50 epochs
    expect = {0: 1e-5, 5: 1e-5 + 9e-5 * 0.5, 10: 1e-4, 35: 1e-5 + 9e-5 * 0.5,
              59: 1e-5 + 9e-5 * 0.5 * (1 + math.cos(49 * math.pi / 50))}
    for epoch, lr in expect.items():
        assert train.lr_at(epoch, 1e-5, 1e-4, 10, 60) == pytest.approx(lr, rel=1e-12), epoch
    assert train.lr_at(59) == pytest.approx(1.0088792e-05, rel=1e-6)  # almost back to lr_min


def test_bcl_term_3x3_identity_codes():
    # a = b = rows of the identity: cos(a_i, b_j) = [i == j]; tau2 = 1.
    a = torch.eye(3)
    eye = torch.eye(3, dtype=torch.bool)
    # only i itself positive: -log(e / (e + 2)) for every row
    assert train.bcl_term(a, a, eye, 1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    # row 0 also has j = 1 as a positive: -log((e + 1) / (e + 2)); rows 1, 2 unchanged
    pos = eye.clone()
    pos[0, 1] = True
    expect = (math.log(math.e + 2) - math.log(math.e + 1) + 2 * (math.log(math.e + 2) - 1)) / 3
    assert train.bcl_term(a, a, pos, 1.0).item() == pytest.approx(expect, abs=1e-6)


def test_bcl_term_3x3_general_against_formula():
    # relaxed codes that are not unit vectors: the loss uses their cosine (Eq. 9)
    a = torch.tensor([[0.5, -0.2, 0.9], [0.1, 0.8, -0.3], [-0.7, 0.2, 0.4]])
    b = torch.tensor([[0.4, -0.1, 0.8], [-0.6, 0.3, 0.2], [0.2, 0.9, -0.1]])
    pos = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    tau = 0.5
    total = 0.0
    for i in range(3):
        cos = [float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) for j in range(3)]
        num = sum(math.exp(cos[j] / tau) for j in range(3) if pos[i, j])
        den = sum(math.exp(c / tau) for c in cos)
        total -= math.log(num / den)
    assert train.bcl_term(a, b, pos, tau).item() == pytest.approx(total / 3, abs=1e-6)


def test_bcl_loss_eq1_sums_three_terms_and_ablations():
    g = torch.Generator().manual_seed(0)
    hv1, hv2, he = (torch.randn(4, 8, generator=g) for _ in range(3))
    pos = torch.eye(4, dtype=torch.bool)
    terms = [train.bcl_term(x, y, pos, 0.8) for x, y in ((hv1, hv2), (hv1, he), (hv2, he))]
    assert train.bcl_loss(hv1, hv2, he, pos, 0.8).item() == pytest.approx(sum(terms).item(), abs=1e-6)
    assert train.bcl_loss(hv1, None, he, pos, 0.8).item() == pytest.approx(terms[1].item(), abs=1e-6)  # AUG off
    assert train.bcl_loss(hv1, hv2, None, pos, 0.8).item() == pytest.approx(terms[0].item(), abs=1e-6)  # IMGAUG


def test_positives_eq8():
    e = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]])  # cos(e0, e1) = 0.99 / |e1| ~ 0.990
    pos = train.positives(e, 0.97)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert train.positives(e, 0.995).tolist() == torch.eye(3, dtype=torch.bool).tolist()
    assert train.positives(e, 0.97, sim=False).tolist() == torch.eye(3, dtype=torch.bool).tolist()


def test_external_features_eq5_6_two_nouns():
    # two unit nouns t_1 = (1, 0), t_2 = (0, 1); image i = (0.8, 0.6); tau1 = 0.1
    # s = softmax([8, 6]) = (1/(1+e^-2), e^-2/(1+e^-2)); e = normalise(s_1 t_1 + s_2 t_2)
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    i = np.array([[0.8, 0.6], [-3.0, 0.0]])  # the second image is not unit norm: it is normalised first
    e = external.external_features(i, t, 0.1).numpy()
    s1 = 1 / (1 + math.exp(-2))
    v = np.array([s1, 1 - s1])
    np.testing.assert_allclose(e[0], v / np.linalg.norm(v), atol=1e-6)
    # (-1, 0): cos = (-1, 0), softmax([-10, 0]) -> mostly t_2
    s = np.exp([-10, 0]) / np.exp([-10, 0]).sum()
    np.testing.assert_allclose(e[1], s / np.linalg.norm(s), atol=1e-6)
    # a tiny temperature picks the nearest noun
    np.testing.assert_allclose(external.external_features(i[:1], t, 1e-4).numpy()[0], [1, 0], atol=1e-6)


def test_pick_views_distinct_pairs():
    g = torch.Generator().manual_seed(0)
    a, b = train.pick_views(1000, 4, g)
    assert (a != b).all() and a.min() >= 0 and b.max() <= 3
    assert len(set(zip(a.tolist(), b.tolist()))) == 12  # all ordered pairs of 4 views occur
    a, b = train.pick_views(5, 1, g)
    assert (a == 0).all() and (b == 0).all()


def test_a_run_starts_without_the_compiler_or_open_clip():
    # deterministic() sets torch's flag as use_deterministic_algorithms does, without importing torch._inductor;
    # random CLIP weights need no open_clip to name their build (each import cost seconds of every run)
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys, torch, train, models; train.deterministic(True); a = torch.are_deterministic_algorithms_"
            "enabled(); train.deterministic(False); b = torch.are_deterministic_algorithms_enabled(); "
            "build = models.clip_build('tiny-test', 'random'); print(a, b, build['activation'], "
            "'torch._inductor.config' in sys.modules, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ['True', 'False', 'GELU', 'False', 'False'], out.stderr[-2000:]
