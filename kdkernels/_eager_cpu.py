"""The common CPU call, straight to the kernel: plain 2-D CPU tensors that need no conversion,
labels that are all classes, no teacher weights, no num_items_in_batch, a mean or sum. The
general path (validate, select, run_fused) makes the same decisions for any input, which costs
about 20 us of Python a call: as much as the kernel and autograd together at N=1, C=10, and a
third of a training step at N=64. Anything this path does not take in a few comparisons
returns None and goes the general way, which also words every error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import _EagerFused
from ._backends import MAX_TEACHERS, missing
from ._extension import load_extension
from ._ops import _fused_kd_kernel
from ._validate import Options

_KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))


def _plain(x: object, shape: torch.Size, dtype: torch.dtype) -> bool:
    """x is a plain contiguous CPU tensor of this shape and dtype that needs no gradient."""
    return (
        type(x) is Tensor
        and x.dtype == dtype
        and x.shape == shape
        and x.is_cpu
        and x.is_contiguous()
        and not x.requires_grad
    )


def eager_cpu_loss(
    student: object, teacher_logits: object, labels: object, options: Options
) -> Tensor | None:
    """The loss, computed as the general path would compute it, or None where this path does
    not apply (the caller then takes the general path)."""
    if (
        options.reduction == "none"
        or type(student) is not Tensor
        or not student.is_cpu
        or student.dim() != 2
        or student.dtype not in _KERNEL_DTYPES
        or not student.is_contiguous()
        or torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.forward_ad._current_level >= 0
    ):
        return None
    shape, dtype = student.shape, student.dtype
    n, c = shape
    teachers = [teacher_logits] if type(teacher_logits) is Tensor else teacher_logits
    if (
        c == 0
        or type(teachers) not in (list, tuple)
        or not 0 < len(teachers) <= MAX_TEACHERS
        or not all(_plain(t, shape, dtype) for t in teachers)
        or missing("cpu") is not None
    ):
        return None
    if labels is not None:
        if not _plain(labels, shape[:1], torch.int64):
            return None
        if n > 0 and not load_extension()[0].labels_in_range(labels.data_ptr(), n, c):
            return None  # ignore_index, unlabeled_index, or an error to word
    m = len(teachers)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    arguments = (teachers, labels, None, [1.0 / m] * m, *options.values, compute_grad)
    if compute_grad:
        return _EagerFused.apply(student, (_fused_kd_kernel, True, arguments))
    return _fused_kd_kernel(student, *arguments, sum_rows=True)[0]
