"""The common CPU call, straight to the kernel: plain 2-D CPU tensors that need no conversion,
labels that are all classes, no teacher weights, no num_items_in_batch, a mean or sum. The
general path (validate, select, run_fused) makes the same decisions for any input, which costs
about 20 us of Python a call: as much as the kernel and autograd together at N=1, C=10, and a
third of a training step at N=64. Anything this path does not take in a few comparisons
returns None and goes the general way, which also words every error.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._autograd import apply_eager_fused
from ._backends import MAX_TEACHERS, missing
from ._extension import load_extension
from ._fused import SCALARS, dtype_codes, kernel_options
from ._gradient_buffers import MIN_BYTES, new_gradient
from ._validate import Options

_is_compiling = torch.compiler.is_compiling
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_forward_ad = torch.autograd.forward_ad
_empty_like = torch.empty_like
_num_threads = torch.get_num_threads


def eager_cpu_loss(
    student: object, teacher_logits: object, labels: object, options: Options
) -> Tensor | None:
    """The loss, computed as the general path would compute it, or None where this path does
    not apply (the caller then takes the general path)."""
    if (
        _is_compiling()  # first: Dynamo traces no further
        or type(student) is not Tensor
        or not student.is_cpu
        or len(shape := student.shape) != 2
        or not student.is_contiguous()
        or options.reduction == "none"
        or _function_mode()
        or _dispatch_modes() > 0
        or _functorch_level() is not None
        or _forward_ad._current_level >= 0
        or missing("cpu") is not None
    ):
        return None
    dtype = student.dtype
    kernel_dtype = _kernel_dtypes().get(dtype)
    n, c = shape
    if kernel_dtype is None or c == 0:
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
    ext = load_extension()[0]
    labels_pointer = 0
    if labels is not None:
        if not (
            type(labels) is Tensor
            and labels.dtype == torch.int64
            and labels.is_cpu
            and labels.dim() == 1
            and labels.is_contiguous()
            and labels.shape[0] == n
        ):
            return None
        labels_pointer = labels.data_ptr()
        if n > 0 and not ext.labels_in_range(labels_pointer, n, c):
            return None  # ignore_index, unlabeled_index, or an error to word
    m = len(teachers)
    pointers = [teachers[0].data_ptr()] if m == 1 else [t.data_ptr() for t in teachers]
    # Every tensor here is contiguous [N, C]: row stride C (is_contiguous ignores the stride of
    # a dimension of size 1, and a kernel never steps one).
    arguments = (
        ext.run_cpu,
        _kernel_options(ext, options, m),
        kernel_dtype,
        pointers,
        [c] * m,
        labels_pointer,
    )
    if student.requires_grad and torch.is_grad_enabled():
        return apply_eager_fused(student, _run_kernel, arguments)
    return _run_kernel(student, arguments, compute_grad=False)[0]


def _run_kernel(
    student: Tensor, arguments: tuple, compute_grad: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The CPU kernel on what eager_cpu_loss prepared: the rows' summed loss (0-dim) and, with
    compute_grad, the gradient of it [N, C] (else None)."""
    run_cpu, options, (dtype_code, loss_template), teachers, strides, labels = arguments
    n, c = student.shape
    loss = _empty_like(loss_template)  # no shape or dtype to parse
    grad = None
    if compute_grad:  # a small one from the allocator; a large one maybe kept from a last call
        grad = _empty_like(student) if student.nbytes < MIN_BYTES else new_gradient(student)
    grad_pointer = 0 if grad is None else grad.data_ptr()
    student_pointer = student.data_ptr()
    # make_args' first 14 arguments (kdkernels/_fused.py CALL_ARGUMENT_NAMES), positionally.
    run_cpu(
        options, student_pointer, c, dtype_code, teachers, strides, dtype_code, labels, 0,
        n, c, loss.data_ptr(), True, grad_pointer, _num_threads(),
    )  # fmt: skip
    return loss, grad


def _kernel_options(ext, options: Options, num_teachers: int):
    """The extension's kernel_options object for these options and uniform teacher weights,
    made once (a dict lookup on the options' values: the general path's lru_cache builds a
    longer key from the options, the weights and the extension on every call)."""
    key = (options.values, num_teachers)
    found = _KERNEL_OPTIONS.get(key)
    if found is None:
        weights = (1.0 / num_teachers,) * num_teachers
        found = kernel_options(ext, (*options.values, True), weights)
        if len(_KERNEL_OPTIONS) < 1024:  # as many as options_from_values remembers
            _KERNEL_OPTIONS[key] = found
    return found


_KERNEL_OPTIONS: dict[tuple, object] = {}


@functools.cache
def _kernel_dtypes() -> dict[torch.dtype, tuple[int, Tensor]]:
    """The dtypes the CPU kernel takes (called once the extension is loaded): each one's code
    and a 0-dim CPU tensor of its loss's dtype (float64 for float64, else float32) for the loss
    to copy."""
    return {
        dtype: (code, SCALARS[torch.float64 if dtype == torch.float64 else torch.float32])
        for dtype, code in dtype_codes(load_extension()[0]).items()
    }
