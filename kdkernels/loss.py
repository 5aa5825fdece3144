"""The public loss: `distillation_loss` and its module form `DistillationLoss`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import _backends
from ._ops import fused_row_losses
from ._triton import triton_row_losses
from ._validate import BACKEND_NAMES, Problem, _choice, validate, validate_options
from .reference import kd_loss_reference


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    temperature: float = 4.0,
    soft_weight: float = 0.9,
    hard_weight: float = 0.1,
    ensemble: str = "geometric",
    teacher_weights: Sequence[float] | Tensor | None = None,
    soft_loss: str = "kl",
    scale_soft_by_t2: bool = True,
    ignore_index: int = -100,
    unlabeled_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Knowledge-distillation loss of Hinton, Vinyals & Dean (2015), fused into one kernel.

    ``soft_weight * T**2 * KL(p || q) + hard_weight * CE(student, labels)``, where
    ``p`` is the teachers' softmax at temperature ``T`` (for an ensemble, the weighted geometric
    mean ``softmax(sum_m w_m t_m / T)`` or the arithmetic mean ``sum_m w_m softmax(t_m / T)``) and
    ``q = softmax(student / T)``; the hard term is the ordinary cross-entropy at T = 1.

    Args:
        student_logits: [..., C] float32/float16/bfloat16/float64; leading dimensions are rows.
        teacher_logits: one teacher with the student's shape, M teachers stacked as [M, ..., C],
            or a list of M tensors with the student's shape (never stacked by kdkernels).
            Teachers are constants: no gradient flows to them.
        labels: optional [...] integer class indices. Rows labelled ``ignore_index`` take no
            term; rows labelled ``unlabeled_index`` take the soft term only. Without labels every
            row takes the soft term only.
        temperature: T > 0 for both softmaxes of the soft term.
        soft_weight, hard_weight: weights of the two terms (>= 0).
        ensemble: "geometric" (default) or "arithmetic" mean of the teachers.
        teacher_weights: M non-negative weights (normalised to sum 1); default uniform.
        soft_loss: "kl" (default) or "cross_entropy" (adds the teachers' entropy, a constant;
            same gradient).
        scale_soft_by_t2: multiply the soft term by T**2, which keeps its gradient's size
            independent of T (the paper's recommendation).
        reduction: "mean" (each term averaged over its own rows), "sum" or "none" (per row).
        backend: "auto", "cpu", "cuda", "triton" or "torch" (the pure-PyTorch reference).

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``.

    Example:
        >>> loss = distillation_loss(student(x), teacher(x).detach(), y, temperature=4.0)
        >>> loss.backward()
    """
    options = validate_options(
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ensemble=ensemble,
        soft_loss=soft_loss,
        scale_soft_by_t2=scale_soft_by_t2,
        ignore_index=ignore_index,
        unlabeled_index=unlabeled_index,
        reduction=reduction,
    )
    backend = _choice("backend", backend, BACKEND_NAMES)
    problem = validate(student_logits, teacher_logits, labels, teacher_weights, options)
    name = _backends.select(backend, problem)
    if name == "torch":
        return _reference(problem)
    row_loss = _row_losses(name, problem)
    if reduction == "none":
        return row_loss.reshape(problem.lead_shape)
    return row_loss.sum()


def _row_losses(name: str, problem: Problem) -> Tensor:
    """The per-row losses [N] of a kernel backend (their sum is the loss)."""
    return triton_row_losses(problem) if name == "triton" else fused_row_losses(problem)


def _reference(problem: Problem) -> Tensor:
    o = problem.options
    return kd_loss_reference(
        problem.student,
        problem.teachers,
        problem.labels,
        temperature=o.temperature,
        soft_weight=o.soft_weight,
        hard_weight=o.hard_weight,
        ensemble=o.ensemble,
        teacher_weights=problem.weights,
        soft_loss=o.soft_loss,
        scale_soft_by_t2=o.scale_soft_by_t2,
        ignore_index=o.ignore_index,
        unlabeled_index=o.unlabeled_index,
        reduction=o.reduction,
    ).reshape(problem.lead_shape if o.reduction == "none" else ())


class DistillationLoss(nn.Module):
    """`distillation_loss` as a module: options at construction, tensors at call.

    >>> criterion = DistillationLoss(temperature=4.0, soft_weight=0.9, hard_weight=0.1)
    >>> loss = criterion(student_logits, teacher_logits, labels)
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = dict(options)
        # Check the options now rather than at the first batch; tensors are checked per call.
        validate_options(
            **{**_OPTION_DEFAULTS, **{k: v for k, v in options.items() if k in _OPTION_DEFAULTS}}
        )
        unknown = set(options) - set(_OPTION_DEFAULTS) - {"teacher_weights", "backend"}
        if unknown:
            raise TypeError(f"DistillationLoss got unknown options {sorted(unknown)}")

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | Sequence[Tensor],
        labels: Tensor | None = None,
    ) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_OPTION_DEFAULTS: dict[str, object] = {
    "temperature": 4.0,
    "soft_weight": 0.9,
    "hard_weight": 0.1,
    "ensemble": "geometric",
    "soft_loss": "kl",
    "scale_soft_by_t2": True,
    "ignore_index": -100,
    "unlabeled_index": None,
    "reduction": "mean",
}


def backends() -> dict[str, _backends.BackendStatus]:
    """Backends present here: ``{name: BackendStatus(available, reason)}``."""
    return _backends.backends()
