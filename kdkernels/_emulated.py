"""The CUDA kernel's source run on the host emulator as one more backend ("cuda-emulated": CPU
tensors, never chosen by "auto"), so the tests check the CUDA code on machines without a GPU.
The emulator is its own extension module, kdkernels._emulator, built only for tests (CMake option
KDKERNELS_EMULATOR; CI turns it on). `emulated_device` says which device it pretends to be.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ._autograd import register_fused_op, run_fused
from ._extension import load_extension
from ._fused import (
    checked_op_impl,
    kernel_arguments,
    kernel_dtypes,
)
from ._validate import Problem

try:
    from . import _emulator
except ImportError:  # a product build: the emulator is a test build only
    _emulator = None

# An H200's shared memory per block and clusters of up to 8 blocks.
EMULATED_H200 = dict(smem_per_block=227 * 1024, max_cluster=8)
_device: dict = EMULATED_H200
_plans: list | None = None


@contextlib.contextmanager
def emulated_device(device: dict, plans: list | None = None) -> Iterator[None]:
    """Within it the emulator is `device` (smem_per_block, max_cluster, warp_row_max_classes),
    and each launch plan is appended to `plans`."""
    global _device, _plans
    previous = _device, _plans
    _device, _plans = device, plans
    try:
        yield
    finally:
        _device, _plans = previous


def missing() -> str | None:
    """Why the emulated backend is not usable here (None when it is)."""
    if _emulator is None:
        return (
            "not built: kdkernels._emulator is a test build "
            "(pip install -C cmake.define.KDKERNELS_EMULATOR=ON .)"
        )
    return load_extension()[1] or None


def _fused_kd_emulated_kernel(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    num_items: Tensor | None,
    weights,
    *options,
    sum_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """The CUDA kernel on the emulator: per-row losses [N] (always the rows, as the CUDA kernel
    writes them: `sum_rows` is the CPU kernel's) and, if compute_grad, the gradient, on inputs
    already checked (by the op's check_op_inputs, or by validation)."""
    ext, why = load_extension()
    if ext is None or _emulator is None:
        raise RuntimeError(why or missing())
    if student.device.type != "cpu":
        raise ValueError(f"the CUDA emulator runs on CPU tensors, not {student.device}")
    arguments, row_loss, grad = kernel_arguments(
        ext, student, teachers, labels, num_items, weights, options
    )
    args = _emulator.make_args(*arguments)
    if _plans is not None:
        _plans.append(_emulator.launch_plan(args, _device))
    _emulator.forward(args, _device)
    return row_loss, grad


_fused_kd_emulated_impl = checked_op_impl(_fused_kd_emulated_kernel)

fused_kd_emulated = torch.library.custom_op("kdkernels::fused_kd_emulated", mutates_args=())(
    _fused_kd_emulated_impl
)
register_fused_op(fused_kd_emulated)


def emulated_loss(problem: Problem) -> Tensor:
    """The loss of the emulated op on a validated problem, reduced as its options say."""
    return run_fused(fused_kd_emulated, _fused_kd_emulated_kernel, problem, *kernel_dtypes(problem))
