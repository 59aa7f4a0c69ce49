"""Golden values and invariants of the distillation losses (methods.md), computed by hand here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillctl.errors import BadInput
from distillctl.methods.dist import dist_terms, pearson
from distillctl.methods.dkd import dkd_terms
from distillctl.methods.mldr import MAX_ROW_RELATION, MSDF, dfra_terms, relation_kl
from distillctl.methods.ofa import ofa_loss




def _softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


def _kl(p, q):
    return float(np.sum(p * np.log(p / q)))


# ----------------------------------------------------------------------------- OFA


def test_ofa_gamma_one_is_cross_entropy_against_teacher():
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    for t in (1.0, 3.0):
        expected = F.cross_entropy(z / t, F.softmax(zt / t, dim=-1))  # soft-target CE
        assert torch.allclose(ofa_loss(z, zt, y, gamma=1.0, temperature=t), expected, atol=1e-6)


def test_ofa_gamma_golden_value():
    # one sample, 3 classes, label 1, gamma 2, T 1: target = (p_t + m)^2 - m
    zs, zt = np.array([0.5, -1.0, 2.0]), np.array([1.0, 2.0, 0.0])
    pt, log_ps = _softmax(zt), np.log(_softmax(zs))
    m = np.array([0.0, 1.0, 0.0])
    expected = -float(np.sum(((pt + m) ** 2 - m) * log_ps))
    got = ofa_loss(torch.tensor(zs[None]), torch.tensor(zt[None]), torch.tensor([1]), gamma=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # soft labels (mixup / smoothing) use the argmax as the target class
    soft = torch.tensor([[0.1, 0.8, 0.1]])
    got_soft = ofa_loss(torch.tensor(zs[None]), torch.tensor(zt[None]), soft, gamma=2.0)
    assert got_soft.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- DKD


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_dkd_terms_hand_made(t):
    zs, zt, y = np.array([2.0, 1.0, 0.0, -1.0]), np.array([1.0, 3.0, 0.5, 0.0]), 1
    ps, pt = _softmax(zs / t), _softmax(zt / t)
    bs, bt = np.array([ps[y], 1 - ps[y]]), np.array([pt[y], 1 - pt[y]])
    rest = [c for c in range(4) if c != y]
    hat_s, hat_t = _softmax(zs[rest] / t), _softmax(zt[rest] / t)  # softmax over non-target classes only
    tckd, nckd = dkd_terms(torch.tensor(zs[None]), torch.tensor(zt[None]), torch.tensor([y]), t)
    assert tckd.item() == pytest.approx(_kl(bt, bs), rel=1e-5)
    assert nckd.item() == pytest.approx(_kl(hat_t, hat_s), rel=1e-5)
    # DKD's decomposition: KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD
    assert _kl(pt, ps) == pytest.approx(tckd.item() + (1 - pt[y]) * nckd.item(), rel=1e-5)


def test_dkd_terms_stable_for_confident_logits():
    zs = torch.tensor([[40.0, -40.0, 0.0]], requires_grad=True)
    tckd, nckd = dkd_terms(zs, torch.tensor([[-40.0, 40.0, 0.0]]), torch.tensor([0]), 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(zs.grad).all()


# ----------------------------------------------------------------------------- DIST


def test_dist_identical_logits_leave_only_the_eps():
    # rho(u, u) = |u'|^2 / (|u'|^2 + eps) with the authors' denominator: 1 - rho = eps / (|u'|^2 + eps), not 0
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    inter, intra = dist_terms(z, z.clone(), temperature=4.0)
    q = F.softmax(z.double() / 4.0, dim=-1).numpy()

    def one_minus_rho(rows):
        sq = ((rows - rows.mean(1, keepdims=True)) ** 2).sum(1)
        return float(np.mean(1e-8 / (sq + 1e-8)))

    assert inter.item() == pytest.approx(one_minus_rho(q), abs=1e-6)
    assert intra.item() == pytest.approx(one_minus_rho(q.T), abs=1e-6)
    assert intra.item() > 1e-7  # the class columns vary little at T = 4: the eps is visible there


def test_dist_pearson_matches_numpy():
    u, v = np.array([1.0, 2.0, 4.0, 3.0]), np.array([0.5, 0.1, 2.0, 1.0])
    got = pearson(torch.tensor(u), torch.tensor(v)).item()
    assert got == pytest.approx(float(np.corrcoef(u, v)[0, 1]), rel=1e-6)
    # shift and positive scale invariance: what lets DIST relax the exact match of KL
    assert pearson(torch.tensor(u), torch.tensor(3 * v + 2)).item() == pytest.approx(got, rel=1e-6)


# ----------------------------------------------------------------------------- MLDR


def test_dfra_terms_zero_for_equal_logits():
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    for t in (1.0, 2.0):
        cls_rel, smp_rel, prob = dfra_terms(z, z.clone(), t)
        for term in (cls_rel, smp_rel, prob):
            assert term.item() == pytest.approx(0.0, abs=1e-6)


def test_relation_kl_golden_value():
    # one row, 2 items, k = 1: R = a a^T, softmax down each column, KL(teacher || student) per column
    a, b = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    expected = np.mean([_kl(_softmax(b * b[j]), _softmax(a * a[j])) for j in range(2)])
    got = relation_kl(torch.tensor(a[None]), torch.tensor(b[None]), k=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_relation_kl_chunked_matches_whole_with_grads():
    g = torch.Generator().manual_seed(3)
    a1 = torch.randn(10, 12, generator=g, requires_grad=True)
    b = torch.randn(10, 12, generator=g)
    a2 = a1.detach().clone().requires_grad_(True)
    whole = relation_kl(a1, b, 0.3)
    chunked = relation_kl(a2, b, 0.3, chunk_elems=3 * 12 * 12)  # 3 rows per chunk, checkpointed
    whole.backward(), chunked.backward()
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(a1.grad, a2.grad, atol=1e-6)


def test_relation_refuses_huge_rows():
    n = math.isqrt(MAX_ROW_RELATION) + 1
    with pytest.raises(BadInput, match="w_class=0"):
        relation_kl(torch.zeros(1, n), torch.zeros(1, n), 1.0)


def test_msdf_weights_sum_to_one_over_stages():
    torch.manual_seed(0)
    msdf = MSDF(dim=8, num_classes=5)
    desc = torch.randn(4, 3, 8) * 10  # [S, B, P]
    w = msdf.weights(desc)  # [S, B, C]
    assert w.shape == (4, 3, 5)
    assert torch.allclose(w.sum(0), torch.ones(3, 5), atol=1e-6)
    assert (w >= 0).all()
    # a convex combination of equal stage logits is those logits
    same = torch.randn(3, 5).expand(4, 3, 5)
    assert torch.allclose(msdf(desc, same), same[0], atol=1e-5)


# TAS: info_nce is pinned with values and gradients by tests/test_golden.py (open_clip's ClipLoss).
