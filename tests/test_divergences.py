"""Reverse KL and the generalised JSD: closed forms, endpoints, symmetry, signs and infinities,
and num_items_in_batch, on every backend present (the shared grid of sample_inputs compares
them with the float64 reference too)."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kd
from kdkernels.testing import backends_here, device_of, loss_on, rel_error

EVERY = backends_here()
PLAIN = dict(temperature=2.0, soft_weight=1.0, hard_weight=0.0, scale_soft_by_t2=False)


def logits(*shape, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def per_row(backend, s, t, **options):
    """Per-row soft terms of `backend` on float32 copies of s and t (float64 masters)."""
    dev = device_of(backend)
    out = loss_on(backend, s.float().to(dev), t.float().to(dev), reduction="none", **options)
    return out.double().cpu()


@pytest.mark.parametrize("backend", EVERY)
def test_closed_forms_against_kl_div(backend):
    """Reverse KL and JSD written with F.kl_div (its argument order: kl_div(log q, log p) is
    KL(p || q)), against each backend."""
    s, t = logits(6, 50, seed=1), logits(6, 50, seed=2)
    log_q, log_p = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    assert rel_error(per_row(backend, s, t, soft_loss="reverse_kl", **PLAIN), reverse) < 1e-5
    for beta in (0.1, 0.5, 0.9):
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        jsd = beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
        jsd += (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
        out = per_row(backend, s, t, soft_loss="jsd", beta=beta, **PLAIN)
        assert rel_error(out, jsd) < 1e-5, beta


@pytest.mark.parametrize("backend", EVERY)
def test_jsd_endpoints_are_the_two_kls_exactly(backend):
    """TRL's convention: beta = 0 is KL(p || q) and beta = 1 is KL(q || p), bit for bit; just
    inside, JSD_beta tends to 0 (roughly beta KL), not to the endpoint's KL."""
    s, t = logits(5, 40, seed=3), logits(5, 40, seed=4)
    kl = per_row(backend, s, t, soft_loss="kl", **PLAIN)
    reverse = per_row(backend, s, t, soft_loss="reverse_kl", **PLAIN)
    assert torch.equal(per_row(backend, s, t, soft_loss="jsd", beta=0.0, **PLAIN), kl)
    assert torch.equal(per_row(backend, s, t, soft_loss="jsd", beta=1.0, **PLAIN), reverse)
    near_zero = per_row(backend, s, t, soft_loss="jsd", beta=1e-4, **PLAIN)
    assert (near_zero < 1e-3 * kl).all() and (near_zero > 0).all()


@pytest.mark.parametrize("backend", EVERY)
def test_jsd_symmetry(backend):
    """JSD_beta(p, q) = JSD_{1-beta}(q, p): swapping student and teacher swaps beta."""
    s, t = logits(5, 30, seed=5), logits(5, 30, seed=6)
    a = per_row(backend, s, t, soft_loss="jsd", beta=0.3, **PLAIN)
    b = per_row(backend, t, s, soft_loss="jsd", beta=0.7, **PLAIN)
    assert rel_error(a, b) < 1e-5


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize(("soft_loss", "beta"), [("reverse_kl", None), ("jsd", 0.5)])
@pytest.mark.parametrize("ensemble", ["geometric", "arithmetic"])
def test_never_negative_near_convergence(backend, soft_loss, beta, ensemble):
    """A student within 1e-4 of its teachers: each divergence is tiny, and never negative
    (float32 summing signed terms reads it below 0); within 1e-4 of the float64 value."""
    t = logits(2, 64, 1000, seed=7)
    s = t.mean(0) + 1e-4 * logits(64, 1000, seed=8, scale=1.0)
    options = dict(soft_loss=soft_loss, ensemble=ensemble, **PLAIN)
    if beta is not None:
        options["beta"] = beta
    out = per_row(backend, s, t, **options)
    ref = kd.kd_loss_reference(
        s, list(t), reduction="none", beta=beta, **{k: v for k, v in options.items() if k != "beta"}
    )
    assert (out >= 0).all()
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-9


@pytest.mark.parametrize("backend", EVERY)
def test_reverse_kl_infinite_where_the_teacher_excludes_a_class(backend):
    """p = 0 < q gives +inf (the true value) and a non-finite gradient in that row only; with
    the student masked where the teacher is, every row is finite."""
    dev = device_of(backend)
    s, t = logits(4, 20, seed=9).float(), logits(4, 20, seed=10).float()
    t[1, 5] = float("-inf")
    x = s.clone().to(dev).requires_grad_(True)
    loss = loss_on(backend, x, t.to(dev), soft_loss="reverse_kl", reduction="none")
    loss.sum().backward()
    assert loss[1].item() == math.inf and loss[[0, 2, 3]].isfinite().all()
    assert not x.grad[1].isfinite().all() and x.grad[[0, 2, 3]].isfinite().all()
    s[1, 5] = float("-inf")
    x = s.to(dev).requires_grad_(True)
    loss = loss_on(backend, x, t.to(dev), soft_loss="reverse_kl", reduction="none")
    loss.sum().backward()
    assert loss.isfinite().all() and x.grad.isfinite().all()


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize(("soft_loss", "beta"), [("reverse_kl", None), ("jsd", 0.4)])
def test_nan_in_nan_out(backend, soft_loss, beta):
    dev = device_of(backend)
    s, t = logits(3, 20, seed=11).float(), logits(3, 20, seed=12).float()
    s[0, 3] = float("nan")
    out = loss_on(backend, s.to(dev), t.to(dev), soft_loss=soft_loss, beta=beta, reduction="none")
    assert out[0].isnan() and out[1:].isfinite().all()


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize(("soft_loss", "beta"), [("kl", None), ("reverse_kl", None), ("jsd", 0.5)])
def test_gradient_accumulation_with_num_items_in_batch(backend, soft_loss, beta):
    """Micro-batches, each divided by the whole batch's counts, sum to the whole batch's loss
    and gradient (a pair of counts: unlabeled rows take the soft term only)."""
    dev = device_of(backend)
    s, t = logits(12, 30, seed=13).float(), logits(12, 30, seed=14).float()
    y = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(15))
    y[[1, 7]], y[[2, 9, 10]] = -100, -1
    options = dict(soft_loss=soft_loss, beta=beta, unlabeled_index=-1)
    whole = s.to(dev).requires_grad_(True)
    loss_on(backend, whole, t.to(dev), y.to(dev), **options).backward()
    counts = (int((y != -100).sum()), int(((y != -100) & (y != -1)).sum()))
    parts = s.to(dev).requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 5), slice(5, 8), slice(8, 12)):
        micro = loss_on(
            backend,
            parts[rows],
            t[rows].to(dev),
            y[rows].to(dev),
            num_items_in_batch=(torch.tensor(counts[0]), counts[1]),
            **options,
        )
        micro.backward()
        total = total + micro.detach()
    full = loss_on(backend, s.to(dev), t.to(dev), y.to(dev), **options)
    assert rel_error(total, full) < 1e-6
    assert rel_error(parts.grad, whole.grad) < 1e-6


@pytest.mark.parametrize("backend", EVERY)
def test_zero_num_items_gives_zero_loss_and_gradient(backend):
    dev = device_of(backend)
    x = logits(4, 10, seed=16).float().to(dev).requires_grad_(True)
    loss = loss_on(backend, x, logits(4, 10, seed=17).float().to(dev), num_items_in_batch=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize(("soft_loss", "beta"), [("reverse_kl", None), ("jsd", 0.3)])
@pytest.mark.parametrize("ensemble", ["geometric", "arithmetic"])
def test_gradcheck_float64(soft_loss, beta, ensemble):
    """The fused analytic gradient of the new divergences against finite differences."""
    gen = torch.Generator().manual_seed(18)
    student = torch.randn(4, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    teachers = torch.randn(2, 4, 7, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, -100, 3, 6])

    def loss(x):
        return kd.distillation_loss(
            x, teachers, labels, soft_loss=soft_loss, beta=beta, ensemble=ensemble, backend="cpu"
        )

    with kd.allow_repeated_backward():
        assert torch.autograd.gradcheck(loss, (student,))
