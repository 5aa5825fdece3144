"""The fused kernel as a torch.library custom op (namespace ``kdkernels``): the op, its fake
implementation, then its autograd. The op returns per-row losses (already weighted and divided
by the valid-row counts, so the loss is their sum) and the gradient of their sum, computed in
the same pass; backward only scales that saved gradient by grad_output, in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ._extension import load_extension
from ._validate import Problem


def _dtype_name(x: Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _loss_dtype(student: Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def check_op_inputs(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_weights: int,
    *,
    same_dtype: bool = True,
) -> None:
    """The kernels read raw pointers: whoever calls the op directly (not through
    distillation_loss) gets an error here rather than an out-of-bounds read. `same_dtype`: the
    kernel takes one dtype for all teachers (the C++ and CUDA kernels; Triton takes each own)."""

    def unit_last(x: Tensor) -> bool:
        return x.stride(1) == 1 or x.shape[1] == 1

    if student.dim() != 2 or not unit_last(student):
        raise ValueError("student must be [N, C] with a contiguous last dimension")
    if not teachers or len(teachers) != num_weights:
        raise ValueError("need one teacher weight per teacher, and at least one teacher")
    for t in teachers:
        if t.shape != student.shape or not unit_last(t) or t.device != student.device:
            raise ValueError("every teacher must be [N, C] like the student, last dim contiguous")
        if same_dtype and t.dtype != teachers[0].dtype:
            raise ValueError("the teachers must share one dtype")
    if labels is not None and (
        labels.dtype != torch.int64
        or labels.shape != student.shape[:1]
        or labels.stride(0) != 1
        or labels.device != student.device
    ):
        raise ValueError("labels must be a contiguous int64 [N] tensor on the student's device")


def _fused_kd_impl(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    teacher_weights: list[float],
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ensemble: str,
    soft_loss: str,
    scale_soft_by_t2: bool,
    ignore_index: int,
    unlabeled_index: int | None,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row losses [N] and, if compute_grad, d(sum of them)/d(student) [N, C] (else empty)."""
    ext, why = load_extension()
    if ext is None:
        raise RuntimeError(why)
    if student.device.type not in ("cpu", "cuda"):
        raise ValueError(f"kdkernels::fused_kd serves CPU and CUDA tensors, not {student.device}")
    check_op_inputs(student, teachers, labels, len(teacher_weights))
    n, c = student.shape
    row_loss = student.new_empty((n,), dtype=_loss_dtype(student))
    grad = student.new_empty((n, c) if compute_grad else (0,))
    args = ext.make_args(
        student=student.data_ptr(),
        student_row_stride=student.stride(0),
        student_dtype=ext.DTYPE_CODES[_dtype_name(student)],
        teachers=[t.data_ptr() for t in teachers],
        teacher_row_strides=[t.stride(0) for t in teachers],
        teacher_dtype=ext.DTYPE_CODES[_dtype_name(teachers[0])],
        teacher_weights=teacher_weights,
        labels=0 if labels is None else labels.data_ptr(),
        ignore_index=ignore_index,
        unlabeled_index=unlabeled_index,
        num_rows=n,
        num_classes=c,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        scale_soft_by_t2=scale_soft_by_t2,
        ensemble=ext.ENSEMBLE_CODES[ensemble],
        soft_loss=ext.SOFT_LOSS_CODES[soft_loss],
        reduction=ext.REDUCTION_CODES[reduction],
        row_loss=row_loss.data_ptr(),
        grad=grad.data_ptr() if compute_grad else 0,
        num_threads=torch.get_num_threads(),
    )
    if student.device.type == "cuda":
        # Two int64 of device memory for the valid-row counts; the kernel never syncs the host.
        workspace = torch.empty(2, dtype=torch.int64, device=student.device)
        stream = torch.cuda.current_stream(student.device).cuda_stream
        ext.forward_cuda(args, stream, student.device.index, workspace.data_ptr())
    else:
        ext.forward_cpu(args)
    return row_loss, grad


fused_kd = torch.library.custom_op("kdkernels::fused_kd", mutates_args=())(_fused_kd_impl)


def fused_fake(student: Tensor, teachers, labels, teacher_weights, *options_and_compute_grad):
    """The fake (meta) implementation of every fused op: the output shapes and dtypes."""
    compute_grad = options_and_compute_grad[-1]
    n, c = student.shape
    row_loss = student.new_empty((n,), dtype=_loss_dtype(student))
    return row_loss, student.new_empty((n, c) if compute_grad else (0,))


fused_kd.register_fake(fused_fake)

_repeat_backward = False


@contextlib.contextmanager
def allow_repeated_backward() -> Iterator[None]:
    """Backward passes run inside this context scale a copy of the saved gradient instead of
    scaling it in place, so the same graph can be differentiated again (retain_graph=True,
    torch.autograd.gradcheck, Jacobians) at the cost of one [N, C] buffer per backward."""
    global _repeat_backward
    previous, _repeat_backward = _repeat_backward, True
    try:
        yield
    finally:
        _repeat_backward = previous


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    # Teachers come as a list (one None each) or as one stacked tensor (one None).
    ctx.teacher_grads = None if isinstance(inputs[1], Tensor) else [None] * len(inputs[1])
    ctx.mark_non_differentiable(output[1])
    # The gradient output never receives a gradient; without this autograd would materialise
    # an [N, C] zero tensor for it in every backward.
    ctx.set_materialize_grads(False)


def _is_broadcast_one(grad_row_loss: Tensor) -> bool:
    """grad_output of a mean/sum loss called with .backward(): one value 1.0 broadcast to [N].
    Reading it is free on the CPU (no device sync), and it saves a pass over the gradient."""
    if grad_row_loss.numel() == 0 or grad_row_loss.stride(0) != 0:
        return False
    if torch._C._len_torch_dispatch_stack() > 0:  # under a mode (fake tensors): do not read
        return False
    return float(grad_row_loss[0]) == 1.0


def _backward(ctx, grad_row_loss: Tensor | None, _unused: Tensor | None):
    if torch.is_grad_enabled():
        raise RuntimeError("kdkernels: double backward (create_graph=True) is not supported")
    (grad,) = ctx.saved_tensors
    no_grads = ctx.teacher_grads
    if grad_row_loss is None:  # the loss itself received no gradient
        return (None, no_grads) + (None,) * 12
    scale = grad_row_loss.unsqueeze(1)
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling() or _repeat_backward:
        # Traced (torch.compile, AOT): the functional form; the compiler plans the buffers.
        # Under allow_repeated_backward() too, which keeps the saved gradient intact.
        return (grad * scale, no_grads) + (None,) * 12
    # Eager: the saved gradient is ours alone, so scale it in place (no new [N, C] buffer), or
    # not at all for loss.backward() on a CPU mean/sum. Either way its version moves on, so a
    # second backward through this graph (retain_graph=True) raises instead of being wrong.
    if grad.device.type == "cpu" and _is_broadcast_one(grad_row_loss):
        torch.autograd.graph.increment_version(grad)
    else:
        grad.mul_(scale)
    return (grad, no_grads) + (None,) * 12


_registered: set[int] = set()


def register_fused_autograd(op) -> None:
    """Give a fused op (this one, or another backend's with the same signature) the autograd
    above: backward scales the gradient saved by the forward pass."""
    if id(op) not in _registered:
        op.register_autograd(_backward, setup_context=_setup_context)
        _registered.add(id(op))


register_fused_autograd(fused_kd)


def _plain_eager(tensors: list[Tensor]) -> bool:
    """Nothing traces, transforms or intercepts this call: no torch.compile, no function or
    dispatch mode (fake tensors, make_fx, opcheck), no functorch transform, no tensor subclass."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and all(type(t) is Tensor for t in tensors)
    )


class _EagerFused(torch.autograd.Function):
    """A fused op's implementation with the op's autograd, minus torch.library's Python
    dispatch (argument defaults, pytree flattening: about 300 us a call, which is what a small
    classification batch costs in all). Used only in plain eager mode; anything else goes
    through the registered custom op."""

    # forward takes ctx (no separate setup_context): apply() then skips binding the arguments
    # with inspect.signature, which alone costs tens of microseconds.
    @staticmethod
    def forward(ctx, impl, *args):
        output = impl(*args)
        _setup_context(ctx, args, output)
        ctx.teacher_grads = None  # an autograd.Function's non-tensor input takes None
        return output

    @staticmethod
    def backward(ctx, grad_row_loss, grad_unused):
        return (None, *_backward(ctx, grad_row_loss, grad_unused))


def call_fused(op, impl, args: tuple) -> tuple[Tensor, Tensor]:
    """Run a fused op (`op`, registered from `impl`) on op_arguments(...)."""
    teachers = args[1] if isinstance(args[1], list) else [args[1]]
    if _plain_eager([args[0], *teachers]):
        return _EagerFused.apply(impl, *args)
    return op(*args)


def _kernel_dtypes(problem: Problem) -> tuple[Tensor, list[Tensor]]:
    """The C++ and CUDA kernels take float64 only all together, and one dtype for all teachers:
    teachers of different dtypes are promoted to the widest of them (float16 with bfloat16 gives
    float32), never rounded down, so the result does not depend on the order of the list."""
    student, teachers = problem.student, problem.teachers
    if student.dtype == torch.float64 or any(t.dtype == torch.float64 for t in teachers):
        return student.double(), [t.double() for t in teachers]
    dtype = teachers[0].dtype
    for t in teachers[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return student, [t if t.dtype == dtype else t.to(dtype) for t in teachers]


def op_arguments(problem: Problem, student: Tensor, teachers, weights) -> tuple:
    """The positional arguments of a fused op (this one or another backend's) for a problem."""
    o = problem.options
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    return (
        student,
        teachers,
        problem.labels,
        weights,
        o.temperature,
        o.soft_weight,
        o.hard_weight,
        o.ensemble,
        o.soft_loss,
        o.scale_soft_by_t2,
        o.ignore_index,
        o.unlabeled_index,
        o.reduction,
        compute_grad,
    )


def fused_row_losses(problem: Problem) -> Tensor:
    """Run the fused op on a validated problem; returns the per-row losses [N]."""
    student, teachers = _kernel_dtypes(problem)
    row_loss, _ = call_fused(
        fused_kd, _fused_kd_impl, op_arguments(problem, student, teachers, problem.weights)
    )
    return row_loss
