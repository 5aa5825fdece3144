"""The public hidden-state loss: `linear_distillation_loss` and its module form
`LinearDistillationLoss`. The [N, V] logits are never materialised: see _linear.py."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _backends
from ._fused import OpOptions, loss_dtype
from ._linear import default_chunk_size, linear_kd
from ._validate import (
    FLOAT_DTYPES,
    OPTION_NAMES,
    Options,
    Problem,
    _choice,
    _labels,
    _num_items,
    _weights,
    row_counts,
    validate_options,
)


def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | Sequence[Tensor],
    teacher_weight: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | Sequence[Tensor | None] | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    teacher_weights: Sequence[float] | Tensor | None = None,
    num_items_in_batch: int | Tensor | tuple[int | Tensor, int | Tensor] | None = None,
    backend: str = "auto",
    **options: object,
) -> Tensor:
    """`distillation_loss` computed from final hidden states and lm_head weights, in chunks of
    rows, so that no [N, V] logits tensor ever exists (as Liger-Kernel's fused-linear losses
    and Apple's cut-cross-entropy do for a single model).

    For each side, ``logits = (hidden @ weight.T + bias) * logit_scale``, then, with a softcap,
    ``softcap * tanh(logits / softcap)`` (Gemma 2's final-logit soft-capping), and only then the
    temperature; then exactly the loss of `distillation_loss` with the same options.

    Args:
        student_hidden: [..., H] float32/float16/bfloat16/float64; leading dimensions are rows.
        student_weight: [V, H], the student's lm_head weight: the hidden states' dtype (or
            float32 with half-precision hidden states), on their device.
        teacher_hidden: [..., H_m] with the student's leading shape, or a list of them (an
            ensemble; members may have different hidden sizes). Teachers get no gradient.
        teacher_weight: [V, H_m], or a list, one per teacher hidden state. A vocabulary larger
            than the student's is an error: pass ``teacher_weight[:V]`` (and
            ``teacher_bias[:V]``) if the extra rows are padding.
        labels: optional [...] class indices, as for `distillation_loss`.
        student_bias: optional [V]. teacher_bias: optional [V], or a list (entries may be None).
        student_logit_scale, teacher_logit_scale: finite multipliers of the logits.
        student_softcap, teacher_softcap: None or > 0.
        chunk_size: rows per chunk (default: about 2 GiB of float32 chunk buffers on a CPU and
            on a GPU). The result does not depend on it.
        teacher_weights, num_items_in_batch, backend: as for `distillation_loss` ("torch",
            the reference, has no fused kernel and is refused).
        **options: temperature, soft_weight, hard_weight, ensemble, soft_loss, beta,
            scale_soft_by_t2, ignore_index, unlabeled_index, reduction (`distillation_loss`).

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``.

    Raises:
        TypeError / ValueError naming the argument, for a wrong type, shape, device or value.

    Memory: one chunk's student and teacher logits and gradient (float32), the float32 weight
    and bias gradient accumulators, and, for half-precision weights on a CPU, a float32 copy of
    each head (MKL has no half-in, float32-out product). With reduction "none", backward
    recomputes every chunk (its upstream gradient differs per row).
    """
    o = validate_options(**options)
    backend = _choice("backend", backend, _backends.NAMES)
    hidden = _float_tensor("student_hidden", student_hidden, min_dim=1)
    lead, h = hidden.shape[:-1], hidden.shape[-1]
    weight = _head_weight("student_weight", student_weight, hidden)
    v = weight.shape[0]
    bias = _head_bias("student_bias", student_bias, weight)
    t_hidden, t_weight, t_bias = _teachers(teacher_hidden, teacher_weight, teacher_bias, hidden, v)
    weights = _weights(teacher_weights, len(t_hidden))
    members = [m for m, w in enumerate(weights) if w > 0]
    scales = [_finite("student_logit_scale", student_logit_scale)]
    scales.append(_finite("teacher_logit_scale", teacher_logit_scale))
    caps = [_softcap("student_softcap", student_softcap)]
    caps.append(_softcap("teacher_softcap", teacher_softcap))

    n = math.prod(lead)
    rows = hidden.reshape(n, h)
    # Stride-0 stand-ins for the [N, V] logits that never exist: the label and backend checks
    # read only their shape, dtype and device.
    logits_like = rows.new_empty(1, dtype=loss_dtype(hidden)).as_strided(
        (*lead, v), (0,) * (len(lead) + 1)
    )
    flat_labels = _labels(labels, logits_like, o, student_name="student_hidden")
    num_items = _num_items(num_items_in_batch, o, hidden.device)
    if num_items is None and o.reduction == "mean":  # the counts of all rows, before the chunks
        num_items = row_counts(flat_labels, n, o, hidden.device)
    chosen = _backend(backend, logits_like.reshape(-1, v), len(members), o)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, v, len(members), hidden.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    grad_on = torch.is_grad_enabled()
    needs_grad = [grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    loss, *_ = linear_kd(
        rows,
        weight,
        bias,
        [t_hidden[m].reshape(n, t_hidden[m].shape[-1]).detach() for m in members],
        [t_weight[m].detach() for m in members],
        # A teacher without a bias gets zeros (a Tensor[] argument: the op has one schema).
        [_zeros_if_none(t_bias[m], t_weight[m]) for m in members],
        flat_labels,
        num_items,
        None,
        [weights[m] for m in members],
        scales,
        [c or 0.0 for c in caps],
        chunk_size,
        needs_grad,
        chosen,
        *OpOptions(**o.as_dict(), compute_grad=any(needs_grad)),
    )
    return loss.reshape(lead) if o.reduction == "none" else loss


def _zeros_if_none(bias: Tensor | None, weight: Tensor) -> Tensor:
    return weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()


def _float_tensor(name: str, x: object, min_dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got {x.dim()}")
    return x


def _head_weight(name: str, weight: object, hidden: Tensor) -> Tensor:
    weight = _float_tensor(name, weight, 2)
    h = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != h or weight.shape[0] < 1:
        raise ValueError(
            f"{name} must be [V, {h}] (vocabulary, the hidden size of its hidden states), got "
            f"{tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"{name} is on {weight.device} but its hidden states on {hidden.device}")
    if weight.dtype != hidden.dtype and not (
        weight.dtype == torch.float32 and hidden.dtype in (torch.float16, torch.bfloat16)
    ):
        raise TypeError(
            f"{name} is {weight.dtype} but its hidden states are {hidden.dtype}; expected the "
            "same dtype (or a float32 weight with float16/bfloat16 hidden states)"
        )
    return weight


def _head_bias(name: str, bias: object, weight: Tensor) -> Tensor | None:
    if bias is None:
        return None
    bias = _float_tensor(name, bias, 1)
    if tuple(bias.shape) != (weight.shape[0],) or bias.device != weight.device:
        raise ValueError(
            f"{name} must be [{weight.shape[0]}] on {weight.device}, got {tuple(bias.shape)} on "
            f"{bias.device}"
        )
    return bias


def _as_list(x: object) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _teachers(hidden: object, weight: object, bias: object, student: Tensor, v: int):
    """Teacher hidden states, weights and biases as lists of the same length, each checked."""
    hiddens, weights = _as_list(hidden), _as_list(weight)
    biases = [None] * len(hiddens) if bias is None else _as_list(bias)
    if not hiddens:
        raise ValueError("teacher_hidden must be a tensor or a non-empty list of tensors")
    if len(weights) != len(hiddens) or len(biases) != len(hiddens):
        raise ValueError(
            f"got {len(hiddens)} teacher hidden states, {len(weights)} teacher weights and "
            f"{len(biases)} teacher biases; expected one head per teacher"
        )
    single = len(hiddens) == 1 and not isinstance(hidden, (list, tuple))
    for m, (h, w) in enumerate(zip(hiddens, weights, strict=True)):
        at = "" if single else f"[{m}]"
        h = _float_tensor(f"teacher_hidden{at}", h, 1)
        if tuple(h.shape[:-1]) != tuple(student.shape[:-1]) or h.device != student.device:
            raise ValueError(
                f"teacher_hidden{at} must be [..., H] with the student's leading shape "
                f"{tuple(student.shape[:-1])} on {student.device}, got {tuple(h.shape)} on "
                f"{h.device}"
            )
        w = _head_weight(f"teacher_weight{at}", w, h)
        if w.shape[0] != v:
            fix = f"teacher_weight{at}[:{v}]"
            if biases[m] is not None:
                fix += f" and teacher_bias{at}[:{v}]"
            hint = f"; pass {fix} if its extra rows are padding" if w.shape[0] > v else ""
            raise ValueError(
                f"teacher_weight{at} has a vocabulary of {w.shape[0]} but the student's is "
                f"{v}{hint}"
            )
        _head_bias(f"teacher_bias{at}", biases[m], w)
    return hiddens, weights, biases


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _softcap(name: str, value: object) -> float | None:
    if value is None:
        return None
    if _finite(name, value) <= 0:
        raise ValueError(f"{name} must be None or > 0, got {value!r}")
    return float(value)


def _backend(name: str, logits_like: Tensor, m: int, o: Options) -> str:
    """The backend whose fused kernel runs each chunk (the reference has none)."""
    problem = Problem(logits_like, [logits_like] * m, None, [1.0 / m] * m, logits_like.shape[:1], o)
    chosen = _backends.select(name, problem)
    if chosen.impl is None:
        raise ValueError(
            f"backend={chosen.name!r} has no fused kernel for linear_distillation_loss; "
            "use a kernel backend, or distillation_loss on materialised logits"
        )
    return chosen.name


class LinearDistillationLoss(nn.Module):
    """`linear_distillation_loss` as a module: options at construction, tensors at call. A head
    is an `nn.Linear` (its weight and bias are used) or a weight tensor [V, H].

    >>> criterion = LinearDistillationLoss(temperature=2.0, soft_weight=0.5, hard_weight=0.5)
    >>> out = student(input_ids, output_hidden_states=True)  # a Hugging Face causal LM
    >>> with torch.no_grad():
    ...     t_out = teacher(input_ids, output_hidden_states=True)
    >>> loss = criterion(out.hidden_states[-1], student.lm_head,
    ...                  t_out.hidden_states[-1], teacher.lm_head, labels)
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(OPTION_NAMES) - set(_CALL_OPTIONS))
        if unknown:
            raise TypeError(f"LinearDistillationLoss got unknown options {unknown}")
        validate_options(**{k: v for k, v in options.items() if k in OPTION_NAMES})
        self.options = options

    def forward(
        self,
        student_hidden: Tensor,
        student_head: nn.Linear | Tensor,
        teacher_hidden: Tensor | Sequence[Tensor],
        teacher_head: nn.Linear | Tensor | Sequence[nn.Linear | Tensor],
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | tuple[int | Tensor, int | Tensor] | None = None,
    ) -> Tensor:
        weight, bias = _head("student_head", student_head)
        heads = [_head("teacher_head", h) for h in _as_list(teacher_head)]
        return linear_distillation_loss(
            student_hidden,
            weight,
            teacher_hidden,
            [w for w, _ in heads] if isinstance(teacher_head, (list, tuple)) else heads[0][0],
            labels,
            student_bias=bias,
            teacher_bias=[b for _, b in heads],
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_CALL_OPTIONS = (
    "student_logit_scale",
    "teacher_logit_scale",
    "student_softcap",
    "teacher_softcap",
    "chunk_size",
    "teacher_weights",
    "backend",
)


def _head(name: str, head: object) -> tuple[Tensor, Tensor | None]:
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, Tensor):
        return head, None
    raise TypeError(f"{name} must be an nn.Linear or a weight tensor, got {type(head).__name__}")
