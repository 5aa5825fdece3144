"""The pure-PyTorch distillation loss: the test oracle and the ``backend="torch"`` path.

It follows docs/DESIGN.md section 1 literally, in float64 when any input is float64 and in float32
otherwise, and it is differentiable by autograd, so its gradient is the reference gradient too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import DEFAULT_BETA, divergence_of


def _masked_sum_product(p: Tensor, x: Tensor) -> Tensor:
    """Row sums of p * x, where p == 0 contributes 0 even against an infinite x (0 log 0 = 0).

    Selecting on p == 0 (not p > 0) keeps a NaN p in the sum, so NaN inputs stay NaN; x is
    zeroed there too, so autograd never multiplies a zero gradient by an infinite or NaN x
    (reverse KL differentiates through p = q).
    """
    zero = torch.zeros_like(x)
    return torch.where(p == 0, zero, p * torch.where(p == 0, zero, x)).sum(-1)


def _row_max(x: Tensor) -> Tensor:
    """The row max [N, 1] (0 where it is not finite), a constant for autograd."""
    top = x.detach().amax(-1, keepdim=True) if x.shape[0] > 0 else x.detach()[:, :1]
    return torch.where(top.isfinite(), top, torch.zeros_like(top))


def _shifted(x: Tensor) -> Tensor:
    """x minus its row max (a constant, so the softmaxes are unchanged): the logits then enter
    the float32 arithmetic as differences, and a constant added to a row cannot cost digits."""
    return x - _row_max(x)


def _geometric_log_ratio(
    s: Tensor,
    teachers: list[tuple[float, Tensor]],
    log_p: Tensor,
    log_q: Tensor,
    temperature: float,
) -> Tensor:
    """log p - log q for the geometric ensemble, keeping its digits where p is close to q:
    there it equals D / T + c with D = sum_m w_m (t_m - s), which is exact (the logits nearly
    cancel) while log p - log q subtracts two numbers of size |log p|. Rows far from their
    teachers (some |D| / T > 64, where D / T + c would cancel instead) keep log p - log q.
    `s` and `teachers` are the unshifted logits; the Triton and CUDA kernels do the same."""
    direct = log_p - log_q
    diff = sum(w * (t - s) for w, t in teachers)
    shift = _row_max(s) - sum(w * _row_max(t) for w, t in teachers)
    lse_u = torch.logsumexp(_shifted(s) / temperature, dim=-1, keepdim=True)
    lse_z = torch.logsumexp(sum(w * _shifted(t) for w, t in teachers) / temperature, -1, True)
    finite = s.isfinite() & diff.isfinite()
    safe = torch.where(finite, diff, torch.zeros_like(diff))
    near = (safe.abs().amax(-1, keepdim=True) / temperature <= 64) & finite
    return torch.where(near, safe / temperature + (shift / temperature - lse_z + lse_u), direct)


def kl_terms(p: Tensor, log_p: Tensor, d: Tensor, q: Tensor) -> Tensor:
    """Per-class terms of KL(p || q) that are each >= 0: p * f(d) with d = log p - log q and
    f(d) = exp(-d) - 1 + d (their sum is the KL, since sum(q - p) = 0), and q where p = 0.

    Summing p * d directly cancels near p = q: in float32 the KL of two close distributions
    reads negative. f is evaluated by its Taylor series where |d| < 0.25 (where exp(-d) - 1 + d
    would cancel), elsewhere as exp(log p - d) - p + p d (the q that d implies, so an error in
    d's row constant cancels to first order). The Triton and CUDA kernels compute the same.
    """
    small = d.abs() < 0.25
    zero = torch.zeros_like(d)
    # Each branch sees only the d it is used for, so autograd through the unused branch never
    # multiplies 0 by an infinite derivative (d is -inf where p = 0, +inf where q = 0).
    ds = torch.where(small, d, zero)
    series = (
        ds * ds * (0.5 - ds * (1 / 6 - ds * (1 / 24 - ds * (1 / 120 - ds * (1 / 720 - ds / 5040)))))
    )
    df = torch.where(p == 0, zero, d)
    far = torch.exp(log_p - df) - p + p * df
    return torch.where(p == 0, q, torch.where(small, p * series, far))


def jsd_terms(p: Tensor, log_p: Tensor, d: Tensor, q: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Per-class terms of beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q,
    each >= 0 (kl_terms of both KLs). e = log q - log m and f = log p - log m come from d through
    expm1 / log1p of a non-positive argument: no overflow, and no cancellation near p = q.
    Where p = q = 0 (d undefined) d is taken as 0: the terms are 0 there. The Triton and CUDA
    kernels compute the same (csrc/kd_row_math.h, JensenShannon)."""
    d = torch.where((p == 0) & (q == 0), torch.zeros_like(d), d)
    p_smaller = d <= 0
    x = torch.where(p_smaller, d, -d)
    l_ = -torch.log1p(torch.where(p_smaller, beta, 1.0 - beta) * torch.expm1(x))
    e = torch.where(p_smaller, l_, l_ - d)
    f = torch.where(p_smaller, d + l_, l_)
    m = beta * p + (1.0 - beta) * q
    return beta * kl_terms(p, log_p, f, m) + (1.0 - beta) * kl_terms(q, log_q, e, m)


def _divide(total: Tensor, count: Tensor) -> Tensor:
    """total / count, and 0 for a count of 0 (an all-ignored batch, num_items_in_batch = 0)."""
    count = count.to(total.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _item_counts(num_items_in_batch, device: torch.device) -> tuple[Tensor, Tensor]:
    """(soft, hard) denominators from an int, a 0-dim tensor, a pair of them, or int64 [2]."""
    if isinstance(num_items_in_batch, Tensor) and num_items_in_batch.dim() == 1:
        return num_items_in_batch[0], num_items_in_batch[1]
    pair = num_items_in_batch
    if not isinstance(pair, (tuple, list)):
        pair = (pair, pair)
    soft, hard = (torch.as_tensor(v, device=device) for v in pair)
    return soft, hard


def kd_loss_reference(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    temperature: float = 4.0,
    soft_weight: float = 0.9,
    hard_weight: float = 0.1,
    ensemble: str = "geometric",
    teacher_weights: Sequence[float] | None = None,
    soft_loss: str = "kl",
    beta: float | None = None,
    scale_soft_by_t2: bool = True,
    ignore_index: int = -100,
    unlabeled_index: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | tuple | None = None,
) -> Tensor:
    """Distillation loss of docs/DESIGN.md section 1, composed from PyTorch ops.

    ``teacher_logits`` is a sequence of M tensors with the student's shape (a stacked [M, ...]
    tensor iterates as one). Inputs are assumed valid: `kdkernels.distillation_loss` validates.
    In float64 each divergence is its definition, term by term (the oracle); in float32 the
    same divergences are summed as non-negative terms that keep their digits near p = q.
    """
    c = student_logits.shape[-1]
    teachers = list(teacher_logits)
    float64 = student_logits.dtype == torch.float64 or any(
        t.dtype == torch.float64 for t in teachers
    )
    acc = torch.float64 if float64 else torch.float32
    weights = (
        [1.0] * len(teachers) if teacher_weights is None else [float(w) for w in teacher_weights]
    )
    total = sum(weights)
    members = [(w / total, t) for w, t in zip(weights, teachers, strict=True) if w > 0]

    n = student_logits.reshape(-1, c).shape[0]
    if labels is None:
        in_soft = torch.ones(n, dtype=torch.bool, device=student_logits.device)
        in_hard = torch.zeros(n, dtype=torch.bool, device=student_logits.device)
        y = torch.zeros(n, dtype=torch.long, device=student_logits.device)
    else:
        y = labels.reshape(-1).long()
        in_soft = y != ignore_index
        in_hard = in_soft if unlabeled_index is None else in_soft & (y != unlabeled_index)
        y = torch.where(in_hard, y, torch.zeros_like(y))

    # An excluded row contributes exactly nothing, to the loss and to the gradient: its logits
    # are replaced by zeros before any arithmetic (masking only the result would still send
    # 0 * NaN = NaN back through the masked branch, e.g. for an all -inf teacher row).
    def rows_in(rows: Tensor, x: Tensor) -> Tensor:
        return torch.where(rows.unsqueeze(1), x, torch.zeros_like(x))

    s_raw = rows_in(in_soft, student_logits.reshape(-1, c).to(acc))
    t_raw = [(w, rows_in(in_soft, t.detach().reshape(-1, c).to(acc))) for w, t in members]
    s = _shifted(s_raw)
    t_rows = [(w, _shifted(t)) for w, t in t_raw]
    if ensemble == "geometric":
        z = sum(w * t for w, t in t_rows) / temperature
        log_p = F.log_softmax(z, dim=-1)
    else:
        log_p = torch.logsumexp(
            torch.stack([F.log_softmax(t / temperature, dim=-1) + math.log(w) for w, t in t_rows]),
            dim=0,
        )
    p = log_p.exp()
    log_q = F.log_softmax(s / temperature, dim=-1)
    q = log_q.exp()
    divergence = divergence_of(soft_loss, beta)
    beta = DEFAULT_BETA if beta is None else float(beta)
    if divergence == "cross_entropy":
        soft = -_masked_sum_product(p, log_q)
    elif acc == torch.float64:  # the oracle: each definition, term by term
        if divergence == "kl":
            soft = _masked_sum_product(p, log_p - log_q)
        elif divergence == "reverse_kl":
            soft = _masked_sum_product(q, log_q - log_p)
        else:
            both_zero = (p == 0) & (q == 0)  # 0 log 0: keep log m finite there for autograd
            lp = torch.where(both_zero, torch.zeros_like(log_p), log_p)
            lq = torch.where(both_zero, torch.zeros_like(log_q), log_q)
            log_m = torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))
            soft = beta * _masked_sum_product(p, log_p - log_m)
            soft = soft + (1.0 - beta) * _masked_sum_product(q, log_q - log_m)
    else:  # float32 (backend="torch"): never negative, accurate near p = q
        d = log_p - log_q
        if ensemble == "geometric":
            d = _geometric_log_ratio(s_raw, t_raw, log_p, log_q, temperature)
        if divergence == "kl":
            soft = kl_terms(p, log_p, d, q).sum(-1)
        elif divergence == "reverse_kl":
            soft = kl_terms(q, log_q, -d, p).sum(-1)  # the KL with p and q swapped
        else:
            soft = jsd_terms(p, log_p, d, q, log_q, beta).sum(-1)

    log_r = F.log_softmax(_shifted(rows_in(in_hard, student_logits.reshape(-1, c).to(acc))), -1)
    hard = -log_r.gather(1, y.unsqueeze(1)).squeeze(1)

    soft_scale = soft_weight * (temperature**2 if scale_soft_by_t2 else 1.0)
    soft_rows = torch.where(in_soft, soft_scale * soft, torch.zeros_like(soft))
    hard_rows = torch.where(in_hard, hard_weight * hard, torch.zeros_like(hard))
    if reduction == "none":
        return (soft_rows + hard_rows).reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return soft_rows.sum() + hard_rows.sum()
    if num_items_in_batch is None:
        soft_count, hard_count = in_soft.sum(), in_hard.sum()
    else:
        soft_count, hard_count = _item_counts(num_items_in_batch, soft_rows.device)
    return _divide(soft_rows.sum(), soft_count) + _divide(hard_rows.sum(), hard_count)
