"""Validation of every argument of `distillation_loss`, before any kernel runs.

`validate` turns the user's arguments into a `Problem`: 2-D [N, C] views whose last dimension is
contiguous, the teachers as a list (never stacked), labels as int64, normalised weights, and the
options. Every rejection names the argument and what was expected (TypeError for a wrong type,
ValueError for a wrong value).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from ._extension import load_extension

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)
ENSEMBLES = ("geometric", "arithmetic")
SOFT_LOSSES = ("kl", "cross_entropy", "reverse_kl", "jsd")
DEFAULT_BETA = 0.5  # jsd's beta when none is given (TRL's GKD default)
REDUCTIONS = ("mean", "sum", "none")
# Temperatures whose loss float32 can carry (csrc/kd_args.h says the same): below, 1/T overflows
# or T^2 underflows (T = 1e-40 gave NaN on every backend); above, the soft targets are uniform to
# the last bit and T^2 magnifies rounding.
TEMPERATURE_RANGE = (1e-4, 1e4)
# KDKERNELS_VALIDATE=1: check labels on the host for GPU inputs too (a sync per call; read once,
# like every knob listed in docs/DESIGN.md "Environment variables").
HOST_LABEL_CHECK = os.environ.get("KDKERNELS_VALIDATE") == "1"


@dataclass(frozen=True)
class Options:
    temperature: float = 4.0
    soft_weight: float = 0.9
    hard_weight: float = 0.1
    ensemble: str = "geometric"
    soft_loss: str = "kl"
    beta: float | None = None  # jsd only (None: DEFAULT_BETA)
    scale_soft_by_t2: bool = True
    ignore_index: int = -100
    unlabeled_index: int | None = None
    reduction: str = "mean"

    def as_dict(self) -> dict[str, object]:
        """The options by name, from `values` (a shallow copy: dataclasses.asdict's deep copy
        cost ~40 us a call; torch 2.11's dynamo cannot trace `dict(self.__dict__)`)."""
        return dict(zip(OPTION_NAMES, self.values, strict=True))

    def __post_init__(self) -> None:
        # The values in field order, as the fused ops take them: computed once per Options (a
        # plain attribute, which torch.compile reads like any other).
        object.__setattr__(self, "values", tuple(getattr(self, n) for n in OPTION_NAMES))


OPTION_NAMES = tuple(f.name for f in fields(Options))


class Problem(NamedTuple):
    student: Tensor  # [N, C], last dimension contiguous
    teachers: list[Tensor]  # M tensors [N, C], last dimension contiguous
    labels: Tensor | None  # [N] int64, contiguous
    weights: list[float]  # one per teacher, summing to 1 (zero-weight members dropped)
    lead_shape: torch.Size  # the student's leading dimensions
    options: Options
    num_items: Tensor | None = None  # int64 [2] on the student's device: "mean"'s denominators


_warned_teacher_grad = False


def divergence_of(soft_loss: str, beta: float | None) -> str:
    """The divergence computed: jsd at beta 0 and 1 is TRL's KL(p || q) and KL(q || p) exactly
    (csrc/kd_row_math.h, divergence_of, says the same)."""
    if soft_loss == "jsd" and beta in (0.0, 1.0):
        return "kl" if beta == 0.0 else "reverse_kl"
    return soft_loss


def _number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not torch.compiler.is_compiling():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        expected = "finite and > 0" if positive else "finite and >= 0"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string, one of {list(allowed)}, got {type(value).__name__}"
        )
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _index(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


_DEFAULT_VALUES = Options().as_dict()


def validate_options(**given: object) -> Options:
    """Options from keyword values (any subset of OPTION_NAMES; the rest take Options'
    defaults), each checked: TypeError for a wrong type or an unknown name, ValueError for a
    wrong value."""
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown options {unknown}; the options are {list(OPTION_NAMES)}")
    values = {**_DEFAULT_VALUES, **given}
    temperature, scale_soft_by_t2 = values["temperature"], values["scale_soft_by_t2"]
    ignore_index, unlabeled_index = values["ignore_index"], values["unlabeled_index"]
    if not isinstance(scale_soft_by_t2, bool):
        raise TypeError(f"scale_soft_by_t2 must be a bool, got {type(scale_soft_by_t2).__name__}")
    ignore = _index("ignore_index", ignore_index)
    unlabeled = None if unlabeled_index is None else _index("unlabeled_index", unlabeled_index)
    if unlabeled is not None and unlabeled == ignore:
        raise ValueError(
            f"unlabeled_index ({unlabeled}) must differ from ignore_index ({ignore}): one marks "
            "rows that take the soft term only, the other rows that take no term"
        )
    t = _number("temperature", temperature, positive=True)
    low, high = TEMPERATURE_RANGE
    if not low <= t <= high:
        raise ValueError(
            f"temperature must be in [{low:g}, {high:g}], got {t:g}: outside it float32 "
            "cannot carry the softened softmax (1/T overflows or T**2 underflows)"
        )
    soft_loss = _choice("soft_loss", values["soft_loss"], SOFT_LOSSES)
    beta = values["beta"]
    if beta is not None:
        if soft_loss != "jsd":
            raise ValueError(
                f"beta is the mixture weight of soft_loss='jsd'; with soft_loss={soft_loss!r} it "
                "must be None"
            )
        beta = _number("beta", beta, positive=False)
        if beta > 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
    return Options(
        temperature=t,
        soft_weight=_number("soft_weight", values["soft_weight"], positive=False),
        hard_weight=_number("hard_weight", values["hard_weight"], positive=False),
        ensemble=_choice("ensemble", values["ensemble"], ENSEMBLES),
        soft_loss=soft_loss,
        beta=beta,
        scale_soft_by_t2=scale_soft_by_t2,
        ignore_index=ignore,
        unlabeled_index=unlabeled,
        reduction=_choice("reduction", values["reduction"], REDUCTIONS),
    )


_OPTIONS_SEEN: dict[tuple, Options] = {}


def options_from_values(values: tuple) -> Options:
    """validate_options for values in OPTION_NAMES order, remembered: a training loop passes the
    same options every step, and checking them again cost about 5 us a call.
    The key holds each value's type too (1 == 1.0 == True, but only some are valid); tensor
    values (a 0-dim temperature) can change in place and are checked on every call."""
    types = tuple(map(type, values))
    key = (values, types)
    try:
        options = _OPTIONS_SEEN.get(key)
    except TypeError:  # an unhashable value, which validation refuses below, outside this
        options, key = None, None  # handler, so that its error is not chained to this one
    if options is None:
        options = validate_options(**dict(zip(OPTION_NAMES, values, strict=True)))
        tensors = any(issubclass(t, Tensor) for t in types)
        if key is not None and not tensors and len(_OPTIONS_SEEN) < 1024:
            _OPTIONS_SEEN[key] = options
    return options


def _is_logits(x: object) -> bool:
    return isinstance(x, Tensor) and x.dtype in _FLOAT_DTYPE_SET


def _logits(name: str, x: object) -> Tensor:
    """x if it passes _is_logits, else the error that says why."""
    if _is_logits(x):
        return x
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    raise TypeError(
        f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}"
    )


def _teacher_list(teacher_logits: object, student: Tensor) -> list[Tensor]:
    """The teachers as a list of tensors with the student's shape and device (checked)."""
    shape, device = student.shape, student.device
    if isinstance(teacher_logits, Tensor):
        t = _logits("teacher_logits", teacher_logits)
        if t.shape == shape:
            teachers = [t]
        elif t.dim() == student.dim() + 1 and t.shape[1:] == shape:
            if t.shape[0] == 0:
                raise ValueError(
                    "teacher_logits is an empty ensemble (M = 0): pass at least one teacher"
                )
            teachers = list(t.unbind(0))
        else:
            _shape_error("teacher_logits", t, student)
        if t.device != device:
            raise ValueError(f"teacher_logits is on {t.device} but student_logits is on {device}")
        return teachers
    if isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits is an empty ensemble: pass at least one teacher")
        for m, t in enumerate(teacher_logits):
            if not _is_logits(t):
                _logits(f"teacher_logits[{m}]", t)  # raises (the name is built only then)
            if t.shape != shape:
                _shape_error(f"teacher_logits[{m}]", t, student)
            if t.device != device:
                raise ValueError(
                    f"teacher_logits[{m}] is on {t.device} but student_logits is on {device}"
                )
        return list(teacher_logits)
    raise TypeError(
        "teacher_logits must be a tensor (one teacher, or M stacked on a leading dimension) or a "
        f"list of tensors, got {type(teacher_logits).__name__}"
    )


def _shape_error(name: str, t: Tensor, student: Tensor) -> None:
    c, v = student.shape[-1], t.shape[-1]
    if (
        t.dim() >= 1
        and v > c
        and t.shape[:-1] in (student.shape[:-1], (t.shape[0], *student.shape[:-1]))
    ):
        raise ValueError(
            f"{name} has a larger vocabulary ({v}) than the student ({c}); if the extra "
            f"entries are padding, pass {name}[..., :{c}] (a view, no copy)"
        )
    raise ValueError(
        f"{name} has shape {tuple(t.shape)}; expected the student's shape {tuple(student.shape)} "
        f"or a stacked ensemble [M, {', '.join(map(str, student.shape))}]"
    )


def _weights(teacher_weights: object, m: int) -> list[float]:
    if teacher_weights is None:
        return [1.0 / m] * m
    if isinstance(teacher_weights, Tensor):
        if teacher_weights.dim() != 1:
            raise ValueError(
                f"teacher_weights must be 1-D, got shape {tuple(teacher_weights.shape)}"
            )
        teacher_weights = teacher_weights.detach().cpu().tolist()
    if not isinstance(teacher_weights, (list, tuple)):
        raise TypeError(
            f"teacher_weights must be None, a sequence of floats or a 1-D tensor, got "
            f"{type(teacher_weights).__name__}"
        )
    if len(teacher_weights) != m:
        raise ValueError(f"teacher_weights has {len(teacher_weights)} entries for {m} teachers")
    weights = [
        _number(f"teacher_weights[{i}]", w, positive=False) for i, w in enumerate(teacher_weights)
    ]
    total = sum(weights)
    if total <= 0:
        raise ValueError("teacher_weights must not all be zero")
    return [w / total for w in weights]


def _labels(
    labels: object, student: Tensor, options: Options, student_name: str = "student_logits"
) -> Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    dtype = labels.dtype
    if dtype is not torch.int64 and (
        dtype == torch.bool or labels.is_floating_point() or labels.is_complex()
    ):
        raise TypeError(f"labels must be an integer tensor of class indices, got {dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}; expected the student's leading shape "
            f"{tuple(student.shape[:-1])}"
        )
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but {student_name} is on {student.device}")
    flat = labels
    if dtype is not torch.int64 or labels.dim() != 1 or not labels.is_contiguous():
        flat = labels.reshape(-1).to(torch.int64).contiguous()
    host_check = flat.is_cpu or HOST_LABEL_CHECK
    if host_check and not torch.compiler.is_compiling() and flat.numel() > 0:
        c = student.shape[-1]
        if _all_classes(flat, c):  # one pass settles the common case
            return flat
        ok = (flat >= 0) & (flat < c) | (flat == options.ignore_index)
        if options.unlabeled_index is not None:
            ok |= flat == options.unlabeled_index
        if not bool(ok.all()):
            pos = int((~ok).nonzero()[0, 0])
            marker = f"ignore_index ({options.ignore_index})"
            if options.unlabeled_index is not None:
                marker += f", unlabeled_index ({options.unlabeled_index})"
            raise ValueError(
                f"labels must be class indices in [0, {c}) or {marker}; found {int(flat[pos])} at "
                f"flat position {pos}"
            )
    return flat


def _all_classes(flat: Tensor, c: int) -> bool:
    """Whether every label of the contiguous int64 `flat` is a class in [0, c)."""
    in_range = getattr(load_extension()[0], "labels_in_range", None)
    if in_range is not None and type(flat) is Tensor and flat.is_cpu:
        return in_range(flat.data_ptr(), flat.numel(), c)  # no tensors created: microseconds
    lo, hi = flat.aminmax()
    return lo.item() >= 0 and hi.item() < c


def row_counts(labels: Tensor | None, n: int, options, device: torch.device) -> Tensor:
    """int64 [2] on `device`: the rows that take the soft term and those that take the hard
    term (no labels: all n soft, none hard), summed on the device, without a host sync.
    `options`: anything with ignore_index and unlabeled_index (Options, OpOptions)."""
    if labels is None:
        return torch.tensor([n, 0], dtype=torch.int64, device=device)
    soft = labels != options.ignore_index
    hard = soft if options.unlabeled_index is None else soft & (labels != options.unlabeled_index)
    return torch.stack([soft.sum(), hard.sum()])


def _num_items(value: object, options: Options, device: torch.device) -> Tensor | None:
    """num_items_in_batch as int64 [2] (soft, hard) on `device`, built there from Python ints
    (a fill, not a host-to-device copy) or moved there from tensors without a host sync."""
    if value is None:
        return None
    if options.reduction != "mean":
        raise ValueError(
            "num_items_in_batch replaces the denominators of reduction='mean'; with "
            f"reduction={options.reduction!r} it must be None"
        )
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(
            "num_items_in_batch must be an int, a 0-dim integer tensor, or a pair "
            f"(soft_rows, hard_rows) of them; got a sequence of {len(pair)}"
        )
    counts = []
    for v in pair:
        if isinstance(v, Tensor):
            if v.dim() != 0 or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
                raise TypeError(
                    "num_items_in_batch must be an int or a 0-dim integer tensor, got a tensor "
                    f"of shape {tuple(v.shape)} and dtype {v.dtype}"
                )
            counts.append(v.to(device=device, dtype=torch.int64, non_blocking=True))
        elif isinstance(v, int) and not isinstance(v, bool):
            if v < 0:
                raise ValueError(f"num_items_in_batch must be >= 0, got {v}")
            counts.append(torch.full((), v, dtype=torch.int64, device=device))
        else:
            raise TypeError(
                f"num_items_in_batch must be an int or a 0-dim integer tensor, got "
                f"{type(v).__name__}"
            )
    return torch.stack(counts)


def _rows(x: Tensor) -> Tensor:
    """[..., C] -> [N, C] with a contiguous last dimension (a view whenever one exists)."""
    if x.dim() == 2 and x.is_contiguous():  # the common case, at no cost
        return x
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def validate(
    student_logits: object,
    teacher_logits: object,
    labels: object,
    teacher_weights: object,
    options: Options,
    num_items_in_batch: object = None,
) -> Problem:
    global _warned_teacher_grad
    student = _logits("student_logits", student_logits)
    if student.dim() < 1:
        raise ValueError(
            "student_logits must have at least one dimension (classes last), got a scalar"
        )
    if student.shape[-1] < 1:
        raise ValueError("student_logits has 0 classes in its last dimension; expected at least 1")
    teachers = _teacher_list(teacher_logits, student)
    if teacher_weights is None:
        weights = [1.0 / len(teachers)] * len(teachers)
    else:  # a zero-weight member is not part of the ensemble
        weights = _weights(teacher_weights, len(teachers))
        teachers = [t for w, t in zip(weights, teachers, strict=True) if w > 0]
        weights = [w for w in weights if w > 0]
    rows = []
    for t in teachers:
        if t.requires_grad:
            t = t.detach()
            if not _warned_teacher_grad:
                _warned_teacher_grad = True
                warnings.warn(
                    "teacher_logits requires grad; teachers are constants of the distillation "
                    "loss and get no gradient (detach them to silence this warning)",
                    stacklevel=3,
                )
        rows.append(_rows(t))
    return Problem(
        student=_rows(student),
        teachers=rows,
        labels=_labels(labels, student, options),
        weights=weights,
        lead_shape=student.shape[:-1],
        options=options,
        num_items=_num_items(num_items_in_batch, options, student.device),
    )
