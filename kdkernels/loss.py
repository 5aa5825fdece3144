"""The public loss: `distillation_loss` and its module form `DistillationLoss`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import _backends
from ._eager_cpu import eager_cpu_loss
from ._validate import (
    OPTION_NAMES,
    Options,
    _choice,
    options_from_values,
    validate,
    validate_options,
)


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
    beta: float | None = None,
    scale_soft_by_t2: bool = True,
    ignore_index: int = -100,
    unlabeled_index: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | tuple[int | Tensor, int | Tensor] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Knowledge-distillation loss of Hinton, Vinyals & Dean (2015), fused into one kernel.

    ``soft_weight * T**2 * D(p, q) + hard_weight * CE(student, labels)``, where D is the
    divergence `soft_loss` (default KL(p || q), the paper's), ``p`` is
    the teachers' softmax at temperature ``T`` (for an ensemble, the weighted geometric
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
        temperature: T in [1e-4, 1e4] (`kd.TEMPERATURE_RANGE`) for both softmaxes of the soft
            term.
        soft_weight, hard_weight: weights of the two terms (>= 0).
        ensemble: "geometric" (default) or "arithmetic" mean of the teachers.
        teacher_weights: M non-negative weights (normalised to sum 1); default uniform.
        soft_loss: the divergence between the soft targets p and q:
            "kl": KL(p || q) = sum p (log p - log q) (default; mode-covering);
            "cross_entropy": H(p, q) = -sum p log q (KL plus the teachers' entropy, a constant:
            same gradient);
            "reverse_kl": KL(q || p) = sum q (log q - log p) (mode-seeking). +inf where a class
            has p = 0 (a -inf teacher logit) and q > 0, the true value, and that row's gradient
            is not finite; a class where both logits are -inf contributes 0, so mask the
            student where the teacher is masked;
            "jsd": the generalised Jensen-Shannon divergence of TRL's GKD trainer,
            beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q (Agarwal et
            al. 2024, on-policy distillation). beta = 0 is exactly KL(p || q), beta = 1 exactly
            KL(q || p); in between the value tends to 0 at both ends (roughly beta KL near
            beta = 0), so beta is not a smooth knob between the two KLs.
        beta: jsd's beta in [0, 1] (default 0.5); an error with any other soft_loss.
        scale_soft_by_t2: multiply the soft term by T**2, which keeps its gradient's size
            independent of T (the paper's recommendation).
        reduction: "mean" (each term averaged over its own rows), "sum" or "none" (per row).
        num_items_in_batch: with "mean", the denominators instead of this call's row counts
            (the Hugging Face Trainer's name): an int or a 0-dim integer tensor (moved to the
            logits' device without a host sync), or a pair (soft_rows, hard_rows) when the
            two terms count different rows (unlabeled_index). Summing the losses of the
            micro-batches of a gradient-accumulation step, each called with the step's total,
            gives exactly the loss and gradient of the whole batch. 0 gives a zero loss and
            gradient. An error with "sum" or "none".
        backend: "auto", "cpu", "cuda", "triton" or "torch" (the pure-PyTorch reference).

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``.

    Example:
        >>> loss = distillation_loss(student(x), teacher(x).detach(), y, temperature=4.0)
        >>> loss.backward()
    """
    # In the order of Options' fields (a test checks it), as options_from_values takes them.
    options = options_from_values(
        (
            temperature,
            soft_weight,
            hard_weight,
            ensemble,
            soft_loss,
            beta,
            scale_soft_by_t2,
            ignore_index,
            unlabeled_index,
            reduction,
        )
    )
    return _loss(
        student_logits,
        teacher_logits,
        labels,
        options,
        teacher_weights,
        num_items_in_batch,
        backend,
    )


def _loss(
    student_logits: object,
    teacher_logits: object,
    labels: object,
    options: Options,
    teacher_weights: object,
    num_items_in_batch: object,
    backend: object,
) -> Tensor:
    """distillation_loss on checked options (the function's, or a DistillationLoss's own)."""
    if backend in ("auto", "cpu") and teacher_weights is None and num_items_in_batch is None:
        loss = eager_cpu_loss(student_logits, teacher_logits, labels, options)
        if loss is not None:
            return loss
    backend = _choice("backend", backend, _backends.NAMES)
    problem = validate(
        student_logits, teacher_logits, labels, teacher_weights, options, num_items_in_batch
    )
    return _backends.select(backend, problem).loss(problem)


class DistillationLoss(nn.Module):
    """`distillation_loss` as a module: options at construction, tensors at call.

    Every option is an attribute that takes effect on the next call and shows in the repr, so
    a temperature schedule can assign ``criterion.temperature = 2.0``; a bad value is refused at
    the assignment (teacher_weights, which depends on the teachers, at the next call), and an
    unknown attribute name raises AttributeError.

    >>> criterion = DistillationLoss(temperature=4.0, soft_weight=0.9, hard_weight=0.1)
    >>> loss = criterion(student_logits, teacher_logits, labels)
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        extra = {k: options.pop(k) for k in ("teacher_weights", "backend") if k in options}
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"DistillationLoss got unknown options {unknown}")
        # Checked now rather than at the first batch; tensors are checked per call.
        self._options = validate_options(**options)
        self.teacher_weights = extra.get("teacher_weights")
        self.backend = _choice("backend", extra.get("backend", "auto"), _backends.NAMES)

    def __setattr__(self, name: str, value: object) -> None:
        if name in OPTION_NAMES:  # checked together with the others (beta needs soft_loss="jsd")
            options = validate_options(**{**self._options.as_dict(), name: value})
            object.__setattr__(self, "_options", options)
        elif name == "backend":
            super().__setattr__(name, _choice("backend", value, _backends.NAMES))
        elif name.startswith("_") or name in _MODULE_ATTRIBUTES or hasattr(self, name):
            super().__setattr__(name, value)
        else:
            raise AttributeError(
                f"DistillationLoss has no option {name!r}; the options are "
                f"{[*OPTION_NAMES, 'teacher_weights', 'backend']}"
            )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | Sequence[Tensor],
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | tuple[int | Tensor, int | Tensor] | None = None,
    ) -> Tensor:
        return _loss(
            student_logits,
            teacher_logits,
            labels,
            self._options,
            self.teacher_weights,
            num_items_in_batch,
            self.backend,
        )

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self._options.as_dict().items() if v != getattr(_DEFAULTS, k)}
        if self.teacher_weights is not None:
            shown["teacher_weights"] = self.teacher_weights
        if self.backend != "auto":
            shown["backend"] = self.backend
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())


_DEFAULTS = Options()
_MODULE_ATTRIBUTES = frozenset({"training", "teacher_weights"})


def _option_property(name: str) -> property:
    return property(lambda self: getattr(self._options, name), doc=f"the {name} option")


for _name in OPTION_NAMES:
    setattr(DistillationLoss, _name, _option_property(_name))


def backends() -> dict[str, _backends.BackendStatus]:
    """Backends present here: ``{name: BackendStatus(available, reason)}``."""
    return _backends.backends()
