"""TRL's generalised JSD loss (``GKDTrainer.generalized_jsd_loss``) on kdkernels' fused kernels.

Replace ``GKDTrainer.generalized_jsd_loss(...)`` with ``generalized_jsd_loss(...)`` from here:
the same signature and the same values (TRL 1.16, ``trl/experimental/gkd/gkd_trainer.py``),
without TRL's [B, T, V] temporaries (log-softmaxes, the mixture, two KL tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..loss import distillation_loss

IGNORE_INDEX = -100  # TRL's padding label


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence of Agarwal et al. (2024), eq. 1, as TRL computes it.

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta p + (1 - beta) q``,
    p = softmax(teacher_logits / temperature), q = softmax(student_logits / temperature),
    summed over the vocabulary; beta = 0 is exactly KL(p || q) and beta = 1 exactly KL(q || p).
    No T**2 factor and no hard-label term (as in TRL).

    Args:
        student_logits, teacher_logits: [B, T, V] (or [N, V]) float logits of the same shape.
        labels: optional [B, T] integer tensor; positions labelled -100 are left out.
        beta: in [0, 1].
        temperature: in [1e-4, 1e4] (`kdkernels.TEMPERATURE_RANGE`).
        reduction: the divisor of the sum over positions, as in TRL: "batchmean" the number of
            positions kept (with labels; at least 1) or B (without labels), "mean" that times V
            (TRL's mean over every element), "sum" none.
        num_items_in_batch: when given, the divisor instead of the reduction's (TRL divides by
            it whatever the reduction), for gradient accumulation; an int or a 0-dim tensor.

    Returns:
        A float32 scalar (float64 for float64 logits).

    Raises:
        ValueError: reduction="none": TRL returns a per-vocabulary [positions, V] tensor, which
            the fused kernels never form (use `kdkernels.distillation_loss(...,
            reduction="none")` for one value per position); and anything `distillation_loss`
            rejects (shapes, dtypes, beta, temperature).

    Differences from TRL: where TRL divides by 0 (``num_items_in_batch=0``: inf or NaN; "mean"
    with every position masked: NaN) this returns 0; the divergence is computed in float32 for
    half-precision logits (TRL computes it in their dtype).
    """
    if reduction not in ("batchmean", "mean", "sum"):
        raise ValueError(
            f"reduction must be 'batchmean', 'mean' or 'sum', got {reduction!r}: TRL's 'none' "
            "is a per-vocabulary [positions, V] tensor, which the fused kernels never form; "
            "kdkernels.distillation_loss(..., reduction='none') gives one value per position"
        )
    if labels is not None:  # only the -100 mask matters (TRL has no hard term)
        labels = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, 0)
    ours, weight = "mean", 1.0
    if num_items_in_batch is None:
        if reduction == "sum":
            ours = "sum"
        elif reduction == "mean":  # TRL: the mean over every element, positions x V
            weight = 1.0 / student_logits.shape[-1]
        elif labels is None:  # "batchmean" without labels: TRL divides by jsd.size(0), B
            num_items_in_batch = student_logits.shape[0]
    return distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        soft_weight=weight,
        hard_weight=0.0,
        soft_loss="jsd",
        beta=beta,
        scale_soft_by_t2=False,
        ignore_index=IGNORE_INDEX,
        reduction=ours,
        num_items_in_batch=num_items_in_batch,
    )
