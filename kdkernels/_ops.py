"""The fused kernel of the C++ extension (CPU, and CUDA where it was built) as the torch.library
custom op ``kdkernels::fused_kd``: the op, its fake, its autograd. The op returns per-row losses
(already weighted and divided by the valid-row counts, so the loss is their sum) and the
gradient of their sum, computed in the same pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import register_fused_op, run_fused
from ._extension import load_extension
from ._fused import (
    checked_op_impl,
    kernel_arguments,
    kernel_dtypes,
    run_cpu_kernel,
)
from ._validate import Problem


def _fused_kd_kernel(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    weights,
    *options,
    sum_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-row losses [N] (with `sum_rows` on the CPU their sum, 0-dim: the eager path of "mean"
    and "sum") and, if compute_grad, d(sum of them)/d(student) [N, C] (else empty), on inputs
    already checked (by the op's check_op_inputs, or by validation: the eager path)."""
    ext, why = load_extension()
    if ext is None:
        raise RuntimeError(why)
    if student.is_cpu:
        return run_cpu_kernel(
            student, teachers, labels, num_items, weights, *options, sum_rows=sum_rows
        )
    if not student.is_cuda:
        raise ValueError(f"kdkernels::fused_kd serves CPU and CUDA tensors, not {student.device}")
    arguments, row_loss, grad = kernel_arguments(
        ext, student, teachers, labels, num_items, weights, options
    )
    # Two int64 of device memory for the valid-row counts; the kernel never syncs the host.
    workspace = torch.empty(2, dtype=torch.int64, device=student.device)
    stream = torch.cuda.current_stream(student.device).cuda_stream
    args = ext.make_args(*arguments)
    ext.forward_cuda(args, stream, student.device.index, workspace.data_ptr())
    return row_loss, grad


_fused_kd_impl = checked_op_impl(_fused_kd_kernel)

fused_kd = torch.library.custom_op("kdkernels::fused_kd", mutates_args=())(_fused_kd_impl)
register_fused_op(fused_kd)


def fused_loss(problem: Problem) -> Tensor:
    """The loss of the fused op on a validated problem, reduced as its options say."""
    return run_fused(fused_kd, _fused_kd_kernel, problem, *kernel_dtypes(problem))
