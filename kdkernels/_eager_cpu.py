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

from ._autograd import apply_eager_fused
from ._backends import MAX_TEACHERS, missing
from ._extension import load_extension
from ._fused import run_cpu_kernel
from ._validate import Options

_KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
_is_compiling = torch.compiler.is_compiling
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_forward_ad = torch.autograd.forward_ad


def eager_cpu_loss(
    student: object, teacher_logits: object, labels: object, options: Options
) -> Tensor | None:
    """The loss, computed as the general path would compute it, or None where this path does
    not apply (the caller then takes the general path)."""
    if (
        _is_compiling()  # first: Dynamo traces no further
        or type(student) is not Tensor
        or not student.is_cpu
        or student.dim() != 2
        or student.dtype not in _KERNEL_DTYPES
        or not student.is_contiguous()
        or options.reduction == "none"
        or _function_mode()
        or _dispatch_modes() > 0
        or _functorch_level() is not None
        or _forward_ad._current_level >= 0
        or missing("cpu") is not None
    ):
        return None
    shape, dtype = student.shape, student.dtype
    n, c = shape
    if c == 0:
        return None
    if type(teacher_logits) is Tensor:
        teachers = [teacher_logits]
    elif type(teacher_logits) in (list, tuple) and 0 < len(teacher_logits) <= MAX_TEACHERS:
        teachers = teacher_logits
    else:
        return None
    for t in teachers:  # plain contiguous CPU tensors like the student, needing no gradient
        if not (
            type(t) is Tensor
            and t.dtype == dtype
            and t.is_cpu
            and not t.requires_grad
            and t.is_contiguous()
            and t.shape == shape
        ):
            return None
    if labels is not None and not (
        type(labels) is Tensor
        and labels.dtype == torch.int64
        and labels.is_cpu
        and labels.dim() == 1
        and labels.is_contiguous()
        and labels.shape[0] == n
        # else ignore_index, unlabeled_index, or an error to word
        and (n == 0 or load_extension()[0].labels_in_range(labels.data_ptr(), n, c))
    ):
        return None
    m = len(teachers)
    weights = _UNIFORM[m] if m < len(_UNIFORM) else (1.0 / m,) * m
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    arguments = (teachers, labels, None, weights, *options.values, compute_grad)
    if compute_grad:
        return apply_eager_fused(student, (run_cpu_kernel, True, arguments))
    return run_cpu_kernel(student, *arguments, sum_rows=True)[0]


# The teacher weights of M = 1..8 teachers, at index M.
_UNIFORM = [(), *((1.0 / m,) * m for m in range(1, 9))]
