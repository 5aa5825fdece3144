"""The CUDA kernel's own source, run by the host emulator (csrc/kd_cuda_emulator.h) on CPU tensors:
the same reference grid as every backend, through the whole public API, on machines without a
GPU. Each block's threads run as fibers with real barriers, warp shuffles and shared memory; the
emulator reports a barrier some threads skip and a shuffle after a lane exited.

What this cannot show: speed, races between warps that a cooperative scheduler never interleaves,
and the exact rounding of the GPU's fast exp/log (the emulator uses the host's exp and log)."""

import contextlib

import pytest
import torch

import kdkernels as kd
from kdkernels import _C
from kdkernels.testing import rel_error, sample_inputs, tolerance

CASES = list(sample_inputs(seed=5))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Shared memory a block may use for its row copy: H200's opt-in limit, and none (pass 2 re-reads).
CACHE_LIMITS = {"smem-row": 227 * 1024, "no-smem-row": 0}


@contextlib.contextmanager
def cuda_kernel_on_cpu(cache_limit: int, plans: list | None = None):
    """Route the CPU backend's kernel call to the emulated CUDA kernel."""
    cpu_kernel = _C.forward_cpu

    def emulated(args):
        if plans is not None:
            plans.append(_C.cuda_launch_plan(args, cache_limit))
        _C.forward_cuda_emulated(args, cache_limit)

    _C.forward_cpu = emulated
    try:
        yield
    finally:
        _C.forward_cpu = cpu_kernel


def run_emulated(case, dtype, cache_limit, plans=None):
    student, teachers, labels = case.inputs(dtype)
    student.requires_grad_(True)
    with cuda_kernel_on_cpu(cache_limit, plans):
        out = kd.distillation_loss(student, teachers, labels, backend="cpu", **case.kwargs)
    ref_student = student.detach().double().requires_grad_(True)
    ref = case.reference(ref_student, teachers, labels)
    gen = torch.Generator().manual_seed(0)
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
    (out.double() * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    return out, ref, student.grad, ref_student.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cache", CACHE_LIMITS)
def test_emulated_cuda_kernel_matches_reference(cache, dtype, case):
    out, ref, grad, ref_grad = run_emulated(case, dtype, CACHE_LIMITS[cache])
    assert rel_error(out, ref) < tolerance(dtype)
    floor = 2 * rel_error(ref_grad.to(dtype), ref_grad)
    assert rel_error(grad, ref_grad) < max(tolerance(dtype), floor)


def plan_of(name: str, dtype: torch.dtype, cache_limit: int) -> dict:
    plans: list[dict] = []
    case = next(c for c in CASES if c.name == name)
    run_emulated(case, dtype, cache_limit, plans)
    assert len(plans) == 1
    return plans[0]


@pytest.mark.parametrize(
    "name, dtype, cache_limit, expected",
    [
        # Short rows: a warp each, 8 rows per 256-thread block; 16-byte loads when C allows.
        ("shape-37x1000", torch.float32, 0, dict(warp_rows=True, vectorized=True, blocks=5)),
        ("shape-3x10", torch.bfloat16, 0, dict(warp_rows=True, vectorized=False, blocks=1)),
        # Long rows: a block each; the row copy in shared memory when it fits.
        ("shape-3x4097", torch.float32, 1 << 20, dict(warp_rows=False, vectorized=False)),
        ("shape-3x32000", torch.float32, 1 << 20, dict(warp_rows=False, vectorized=True)),
        ("shape-3x32000", torch.bfloat16, 227 * 1024, dict(cache_bytes=32000 * (2 + 4))),
        ("shape-3x32000", torch.float32, 227 * 1024, dict(cache_bytes=0)),  # 256 KB: no room
        ("shape-3x32000", torch.bfloat16, 0, dict(cache_bytes=0, threads=512, blocks=3)),
    ],
)
def test_launch_plan(name, dtype, cache_limit, expected):
    plan = plan_of(name, dtype, cache_limit)
    assert {k: plan[k] for k in expected} == expected


def test_strided_rows_fall_back_to_scalar_access():
    """Rows 7 elements apart cannot be read in 16-byte packs."""
    n, c = 4, 4096
    student = torch.randn(n, c + 7)[:, :c]
    teacher = torch.randn(n, c)
    plans: list[dict] = []
    with cuda_kernel_on_cpu(1 << 20, plans):
        out = kd.distillation_loss(student, teacher, reduction="none")
    assert plans[0]["vectorized"] is False and plans[0]["warp_rows"] is False
    ref = kd.kd_loss_reference(student.double(), [teacher.double()], reduction="none")
    assert rel_error(out, ref) < 1e-5


def test_emulator_reports_kernel_errors_as_exceptions():
    """A launch the emulator cannot run comes back as a RuntimeError, not a crash."""
    student = torch.randn(2, 5)
    row_loss = torch.empty(1, dtype=torch.float64)
    args = _C.make_args(
        student=student.data_ptr(),
        student_row_stride=5,
        student_dtype=3,  # float64: the CUDA kernel refuses it
        teachers=[student.data_ptr()],
        teacher_row_strides=[5],
        teacher_dtype=3,
        teacher_weights=[1.0],
        labels=0,
        ignore_index=-100,
        unlabeled_index=None,
        num_rows=1,
        num_classes=2,
        temperature=1.0,
        soft_weight=1.0,
        hard_weight=0.0,
        scale_soft_by_t2=True,
        ensemble=0,
        soft_loss=0,
        reduction=0,
        row_loss=row_loss.data_ptr(),
        grad=0,
        num_threads=1,
    )
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        _C.forward_cuda_emulated(args, 0)
