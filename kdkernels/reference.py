"""The pure-PyTorch distillation loss: the test oracle and the ``backend="torch"`` path.

It follows DESIGN.md section 1 literally, in float64 when any input is float64 and in float32
otherwise, and it is differentiable by autograd, so its gradient is the reference gradient too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_sum_product(p: Tensor, x: Tensor) -> Tensor:
    """Row sums of p * x, where p == 0 contributes 0 even against an infinite x (0 log 0 = 0).

    Selecting on p == 0 (not p > 0) keeps a NaN p in the sum, so NaN inputs stay NaN.
    """
    return torch.where(p == 0, torch.zeros_like(x), p * x).sum(-1)


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
    scale_soft_by_t2: bool = True,
    ignore_index: int = -100,
    unlabeled_index: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Distillation loss of DESIGN.md section 1, composed from PyTorch ops.

    ``teacher_logits`` is a sequence of M tensors with the student's shape (a stacked [M, ...]
    tensor iterates as one). Inputs are assumed valid: `kdkernels.distillation_loss` validates.
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

    s = student_logits.reshape(-1, c).to(acc)
    t_rows = [(w, t.detach().reshape(-1, c).to(acc)) for w, t in members]
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
    if soft_loss == "kl":
        soft = _masked_sum_product(p, log_p - log_q)
    else:
        soft = -_masked_sum_product(p, log_q)

    n = s.shape[0]
    if labels is None:
        in_soft = torch.ones(n, dtype=torch.bool, device=s.device)
        in_hard = torch.zeros(n, dtype=torch.bool, device=s.device)
        y = torch.zeros(n, dtype=torch.long, device=s.device)
    else:
        y = labels.reshape(-1).long()
        in_soft = y != ignore_index
        in_hard = in_soft if unlabeled_index is None else in_soft & (y != unlabeled_index)
        y = torch.where(in_hard, y, torch.zeros_like(y))
    log_r = F.log_softmax(s, dim=-1)
    hard = -log_r.gather(1, y.unsqueeze(1)).squeeze(1)

    soft_scale = soft_weight * (temperature**2 if scale_soft_by_t2 else 1.0)
    soft_rows = torch.where(in_soft, soft_scale * soft, torch.zeros_like(soft))
    hard_rows = torch.where(in_hard, hard_weight * hard, torch.zeros_like(hard))
    if reduction == "none":
        return (soft_rows + hard_rows).reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return soft_rows.sum() + hard_rows.sum()
    soft_count = in_soft.sum().clamp(min=1).to(acc)
    hard_count = in_hard.sum().clamp(min=1).to(acc)
    return soft_rows.sum() / soft_count + hard_rows.sum() / hard_count
