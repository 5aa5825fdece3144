"""The reference against closed forms composed by hand from PyTorch's own losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkernels import kd_loss_reference

torch.manual_seed(0)


def _inputs(n=9, c=7, m=3):
    return (
        torch.randn(n, c, dtype=torch.float64) * 2,
        torch.randn(m, n, c, dtype=torch.float64) * 2,
        torch.randint(0, c, (n,)),
    )


def test_single_teacher_at_t1_is_kl_div_plus_cross_entropy():
    s, t, y = _inputs(m=1)
    got = kd_loss_reference(s, t, y, temperature=1.0, soft_weight=0.7, hard_weight=0.3)
    expect = 0.7 * F.kl_div(
        F.log_softmax(s, -1), F.log_softmax(t[0], -1), log_target=True, reduction="batchmean"
    ) + 0.3 * F.cross_entropy(s, y)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_geometric_mean_is_normalised_product_of_member_softmaxes(temperature):
    s, t, _ = _inputs()
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    product = (F.softmax(t / temperature, -1) ** w[:, None, None]).prod(0)
    p = product / product.sum(-1, keepdim=True)
    expect = -(p * F.log_softmax(s / temperature, -1)).sum(-1).mean()
    got = kd_loss_reference(
        s,
        t,
        temperature=temperature,
        teacher_weights=w.tolist(),
        soft_loss="cross_entropy",
        soft_weight=1.0,
        scale_soft_by_t2=False,
    )
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)


def test_arithmetic_mean_is_weighted_sum_of_member_softmaxes():
    s, t, _ = _inputs()
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    p = (F.softmax(t / 3.0, -1) * (w / w.sum())[:, None, None]).sum(0)
    expect = (p * (p.log() - F.log_softmax(s / 3.0, -1))).sum(-1).mean() * 9.0
    got = kd_loss_reference(
        s, t, temperature=3.0, teacher_weights=w.tolist(), ensemble="arithmetic", soft_weight=1.0
    )
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 8.0])
def test_gradient_is_soft_weight_times_t_times_q_minus_p(temperature):
    s, t, _ = _inputs(m=1)
    s.requires_grad_(True)
    kd_loss_reference(s, t, temperature=temperature, soft_weight=0.9).backward()
    q = F.softmax(s.detach() / temperature, -1)
    p = F.softmax(t[0] / temperature, -1)
    torch.testing.assert_close(
        s.grad, 0.9 * temperature * (q - p) / s.shape[0], rtol=1e-10, atol=1e-14
    )


def test_cross_entropy_minus_kl_is_teacher_entropy():
    s, t, _ = _inputs(m=1)
    ce = kd_loss_reference(s, t, soft_loss="cross_entropy", scale_soft_by_t2=False, soft_weight=1.0)
    kl = kd_loss_reference(s, t, soft_loss="kl", scale_soft_by_t2=False, soft_weight=1.0)
    p = F.softmax(t[0] / 4.0, -1)
    torch.testing.assert_close(ce - kl, -(p * p.log()).sum(-1).mean(), rtol=1e-12, atol=1e-14)


def test_each_term_is_averaged_over_its_own_rows():
    s, t, y = _inputs(n=6, m=1)
    y[0] = -100  # ignored: no term
    y[1] = -1  # unlabeled: soft term only
    rows = kd_loss_reference(
        s, t, y, unlabeled_index=-1, reduction="none", soft_weight=1.0, hard_weight=0.0
    )
    assert rows[0] == 0
    soft_mean = kd_loss_reference(s, t, y, unlabeled_index=-1, soft_weight=1.0, hard_weight=0.0)
    torch.testing.assert_close(soft_mean, rows.sum() / 5)
    hard_mean = kd_loss_reference(s, t, y, unlabeled_index=-1, soft_weight=0.0, hard_weight=1.0)
    torch.testing.assert_close(hard_mean, F.cross_entropy(s[2:], y[2:]))
    total = kd_loss_reference(s, t, y, unlabeled_index=-1, reduction="sum")
    torch.testing.assert_close(
        total, kd_loss_reference(s, t, y, unlabeled_index=-1, reduction="none").sum()
    )


def test_masked_teacher_class_contributes_nothing():
    s, t, _ = _inputs(m=1)
    t[..., 0] = float("-inf")
    got = kd_loss_reference(s, t, soft_weight=1.0, scale_soft_by_t2=False, temperature=1.0)
    p = F.softmax(t[0][:, 1:], -1)
    q = F.log_softmax(s, -1)[:, 1:]
    torch.testing.assert_close(got, (p * (p.log() - q)).sum(-1).mean())
    assert math.isfinite(got.item())


def test_all_ignored_batch_is_zero_with_zero_gradient():
    s, t, y = _inputs(m=1)
    s.requires_grad_(True)
    y[:] = -100
    loss = kd_loss_reference(s, t, y)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(s.grad) == 0
