"""What every fused op of kdkernels shares, whatever its backend: the op schema (built from the
loss options, defined once in `Options`), the fake implementation, the checks on direct calls,
and the argument building for a validated problem. Each backend's op lives in its own module
(_ops.py: C++ on CPU and CUDA; _triton.py; _emulated.py), with the autograd of _autograd.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import NamedTuple

import torch
from torch import Tensor

from ._extension import load_extension
from ._gradient_buffers import new_gradient
from ._validate import DEFAULT_BETA, Options, Problem

# Every fused op takes (student, teachers, labels, teacher weights) and these options: the loss
# options of Options, defined once, and whether to compute the gradient. The op schema is built
# from them, so an option added to Options reaches every backend's op.
_OP_OPTIONS = [(f.name, f.type) for f in fields(Options)] + [("compute_grad", "bool")]
OpOptions = NamedTuple("OpOptions", _OP_OPTIONS)
_PYTHON_TYPES = {
    "float": float,
    "str": str,
    "bool": bool,
    "int": int,
    "int | None": int | None,
    "float | None": float | None,
}


def op_signature(head: list[tuple[str, object]], returns: object) -> Callable:
    """Give an op's implementation, written as impl(*head, *options), the typed signature
    torch.library infers the op schema from: `head` (name, type) pairs, then OpOptions' fields,
    so every op that takes the loss options has them in one schema, built from Options."""

    def decorate(impl: Callable) -> Callable:
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        options = [(name, _PYTHON_TYPES[t]) for name, t in _OP_OPTIONS]
        impl.__signature__ = inspect.Signature(
            [inspect.Parameter(n, kind, annotation=t) for n, t in head + options],
            return_annotation=returns,
        )
        return impl

    return decorate


# Every backend's fused op: impl(student, teachers, labels, num_items, teacher_weights, *options).
fused_op_signature = op_signature(
    [
        ("student", Tensor),
        ("teachers", list[Tensor]),
        ("labels", Tensor | None),
        ("num_items", Tensor | None),
        ("teacher_weights", list[float]),
    ],
    tuple[Tensor, Tensor],
)


def device_type(x: Tensor) -> str:
    """x.device.type, without building the device object and its name (~1 us a call)."""
    return "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type


def loss_dtype(student: Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def check_op_inputs(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    num_weights: int,
    *,
    same_dtype: bool = True,
) -> None:
    """The kernels read raw pointers: whoever calls the op directly (not through
    distillation_loss) gets an error here rather than an out-of-bounds read. `same_dtype`: the
    kernel takes one dtype for all teachers (the C++ and CUDA kernels; Triton takes each own)."""

    shape, device = student.shape, student.device
    if student.dim() != 2 or (student.stride(1) != 1 and shape[1] != 1):
        raise ValueError("student must be [N, C] with a contiguous last dimension")
    if not teachers or len(teachers) != num_weights:
        raise ValueError("need one teacher weight per teacher, and at least one teacher")
    dtype = teachers[0].dtype
    for t in teachers:
        if t.shape != shape or (t.stride(1) != 1 and shape[1] != 1) or t.device != device:
            raise ValueError("every teacher must be [N, C] like the student, last dim contiguous")
        if same_dtype and t.dtype != dtype:
            raise ValueError("the teachers must share one dtype")
    if labels is not None and (
        labels.dtype != torch.int64
        or labels.shape != student.shape[:1]
        or (labels.stride(0) != 1 and shape[0] > 1)  # one label: its stride is never used
        or labels.device != student.device
    ):
        raise ValueError("labels must be a contiguous int64 [N] tensor on the student's device")
    if num_items is not None and (
        num_items.dtype != torch.int64
        or num_items.shape != (2,)
        or num_items.stride(0) != 1
        or num_items.device != student.device
    ):
        raise ValueError("num_items must be a contiguous int64 [2] tensor on the student's device")


def checked_op_impl(kernel: Callable, *, same_dtype: bool = True) -> Callable:
    """A fused op's implementation (what torch.library registers): check_op_inputs, then
    `kernel(student, teachers, labels, num_items, weights, *options)`, which the eager path
    calls directly on validated inputs."""

    @fused_op_signature
    def impl(student, teachers, labels, num_items, weights, *options):
        check_op_inputs(student, teachers, labels, num_items, len(weights), same_dtype=same_dtype)
        return kernel(student, teachers, labels, num_items, weights, *options)

    return impl


@functools.cache
def dtype_codes(ext) -> dict[torch.dtype, int]:
    """The extension's dtype codes by torch dtype (its DTYPE_CODES are by name)."""
    return {getattr(torch, name): code for name, code in ext.DTYPE_CODES.items()}


# make_args' parameters in order: each call's pointers, strides and sizes (run_cpu's after its
# kernel_options object), then the options (kernel_options' parameters).
CALL_ARGUMENT_NAMES = (
    *("student", "student_row_stride", "student_dtype", "teachers", "teacher_row_strides"),
    *("teacher_dtype", "labels", "row_counts", "num_rows", "num_classes", "row_loss", "sum_rows"),
    *("grad", "num_threads"),
)
OPTION_ARGUMENT_NAMES = (
    *("teacher_weights", "ignore_index", "unlabeled_index", "temperature", "soft_weight"),
    *("hard_weight", "scale_soft_by_t2", "ensemble", "soft_loss", "beta", "reduction"),
)
MAKE_ARGS_NAMES = CALL_ARGUMENT_NAMES + OPTION_ARGUMENT_NAMES


@functools.lru_cache(maxsize=256)
def _option_arguments(ext, options: tuple, weights: tuple[float, ...]) -> tuple:
    """The last arguments of `make_args`, which depend only on the options (OpOptions' values)
    and the teacher weights: the same every step of a training loop, so built once (enum codes
    by name)."""
    o = OpOptions(*options)
    return (
        list(weights),
        o.ignore_index,
        o.unlabeled_index,
        o.temperature,
        o.soft_weight,
        o.hard_weight,
        o.scale_soft_by_t2,
        ext.ENSEMBLE_CODES[o.ensemble],
        ext.SOFT_LOSS_CODES[o.soft_loss],
        DEFAULT_BETA if o.beta is None else o.beta,
        ext.REDUCTION_CODES[o.reduction],
    )


@functools.lru_cache(maxsize=256)
def kernel_options(ext, options: tuple, weights: tuple[float, ...]):
    """The extension's kernel_options object for these options: converted to C++ once, not on
    every call (a small batch's step passed 11 option values to run_cpu: about 0.5 us)."""
    return ext.kernel_options(*_option_arguments(ext, options, weights))


# The CPU kernel's summed loss is a copy of one of these (explicitly on the CPU: torch.empty
# follows torch.set_default_device, empty_like its template).
SCALARS = {t: torch.empty((), dtype=t, device="cpu") for t in (torch.float32, torch.float64)}


def call_arguments(
    ext,
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    compute_grad: bool,
    sum_rows: bool = False,
) -> tuple[tuple, Tensor, Tensor]:
    """The first arguments of `make_args` (MAKE_ARGS_NAMES: each call's pointers, strides and
    sizes) for one call of a fused C++ op of the extension `ext` on inputs that passed
    check_op_inputs (or validation), and the outputs they point into: per-row losses [N] (with
    `sum_rows`, their sum: 0-dim; the CPU kernel only) and, if compute_grad, the gradient
    [N, C] (else an empty tensor)."""
    n, c = student.shape
    dtype = loss_dtype(student)
    if sum_rows:  # the CPU kernel's one value: a copy of a 0-dim CPU tensor's shape and dtype
        row_loss = torch.empty_like(SCALARS[dtype])  # (no shape or dtype to parse: 0.4 us less)
    elif student.dtype == dtype:  # new_empty's dtype keyword alone costs microseconds
        row_loss = student.new_empty((n,))
    else:
        row_loss = student.new_empty((n,), dtype=dtype)
    grad = new_gradient(student) if compute_grad else student.new_empty((0,))
    codes = dtype_codes(ext)
    # stride()[0]: 0.07 us less than stride(0), which parses its argument. One teacher without
    # a list comprehension, which costs a function call.
    if len(teachers) == 1:
        pointers, strides = [teachers[0].data_ptr()], [teachers[0].stride()[0]]
    else:
        pointers, strides = [t.data_ptr() for t in teachers], [t.stride()[0] for t in teachers]
    arguments = (
        student.data_ptr(),
        student.stride()[0],
        codes[student.dtype],
        pointers,
        strides,
        codes[teachers[0].dtype],
        0 if labels is None else labels.data_ptr(),
        0 if num_items is None else num_items.data_ptr(),
        n,
        c,
        row_loss.data_ptr(),
        sum_rows,
        grad.data_ptr() if compute_grad else 0,
        torch.get_num_threads(),
    )
    return arguments, row_loss, grad


def kernel_arguments(
    ext,
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    weights,
    options: tuple,
    sum_rows: bool = False,
) -> tuple[tuple, Tensor, Tensor]:
    """All the positional arguments of `make_args` (MAKE_ARGS_NAMES), and the outputs of
    call_arguments. `options`: OpOptions' values in order, as the op takes them."""
    arguments, row_loss, grad = call_arguments(
        ext, student, teachers, labels, num_items, options[-1], sum_rows
    )
    return arguments + _option_arguments(ext, tuple(options), tuple(weights)), row_loss, grad


def run_cpu_kernel(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    weights,
    *options,
    sum_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """The CPU kernel on inputs that passed check_op_inputs (or validation), with the fused
    ops' kernel signature (OpOptions' values last): the outputs of call_arguments, written."""
    ext = load_extension()[0]
    arguments, row_loss, grad = call_arguments(
        ext, student, teachers, labels, num_items, options[-1], sum_rows
    )
    ext.run_cpu(kernel_options(ext, options, tuple(weights)), *arguments)
    return row_loss, grad


def fused_fake(
    student: Tensor, teachers, labels, num_items, teacher_weights, *options_and_compute_grad
):
    """The fake (meta) implementation of every fused op: the output shapes and dtypes."""
    compute_grad = options_and_compute_grad[-1]
    n, c = student.shape
    row_loss = student.new_empty((n,), dtype=loss_dtype(student))
    return row_loss, student.new_empty((n, c) if compute_grad else (0,))


def kernel_dtypes(problem: Problem) -> tuple[Tensor, list[Tensor]]:
    """The C++ and CUDA kernels take float64 only all together, and one dtype for all teachers:
    teachers of different dtypes are promoted to the widest of them (float16 with bfloat16 gives
    float32), never rounded down, so the result does not depend on the order of the list."""
    student, teachers = problem.student, problem.teachers
    dtypes = [t.dtype for t in teachers]
    if student.dtype == torch.float64 or torch.float64 in dtypes:
        return student.double(), [t.double() for t in teachers]
    dtype = dtypes[0]
    if dtypes.count(dtype) == len(dtypes):  # the common case: nothing to convert
        return student, teachers
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return student, [t if t.dtype == dtype else t.to(dtype) for t in teachers]


def op_arguments(problem: Problem, student: Tensor, teachers, weights) -> tuple:
    """The positional arguments of a fused op (this one or another backend's) for a problem."""
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    # OpOptions' values in order (the loss options, then compute_grad), without building one
    head = (student, teachers, problem.labels, problem.num_items, weights)
    return (*head, *problem.options.values, compute_grad)
