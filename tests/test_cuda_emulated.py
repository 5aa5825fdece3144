"""The CUDA kernel's own source, run by the host emulator (csrc/kd_cuda_emulator.h) on CPU tensors:
the same reference grid as every backend, through the whole public API, on machines without a
GPU. Each block's threads run as fibers with real barriers, warp shuffles and shared memory; the
emulator reports a barrier some threads skip and a shuffle after a lane exited.

What this cannot show: speed, races between warps that a cooperative scheduler never interleaves,
and the exact rounding of the GPU's fast exp/log (the emulator uses the host's exp and log)."""

import pytest
import torch
from kernel_args import raw_kernel_args

import kdkernels as kd
from kdkernels import _emulated
from kdkernels.testing import (
    assert_matches_reference,
    rel_error,
    run_against_reference,
    sample_inputs,
)

pytestmark = pytest.mark.skipif(
    _emulated.missing() is not None, reason=f"the CUDA emulator: {_emulated.missing()}"
)

CASES = list(sample_inputs(seed=1))
SMALL_CASES = list(sample_inputs(seed=1, small=True))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
H200 = _emulated.EMULATED_H200
# Emulated devices that steer the cases down the kernel's other paths. Every thread is a fiber,
# so these run the small grid (N <= 37, C <= 1000) in two dtypes to keep CI fast.
PATHS = {
    # A block per row for every case; pass 2 re-reads the row (no copy in shared memory).
    "block-rows": dict(smem_per_block=0, max_cluster=1, warp_row_max_classes=0),
    # A block per row with the row copy in shared memory.
    "block-rows-copy": dict(H200, max_cluster=1, warp_row_max_classes=0),
    # 1600 bytes of shared memory per block: rows of 100 classes are shared out over clusters
    # of 4 to 8 blocks that merge through each other's shared memory.
    "clusters": dict(smem_per_block=1600, max_cluster=8, warp_row_max_classes=0),
}


def run_emulated(case, dtype, device, plans=None):
    with _emulated.emulated_device(device, plans):
        return run_against_reference("cuda-emulated", case, dtype)


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_emulated_cuda_kernel_paths_match_reference(path, dtype, case):
    """The grid on the kernel's other paths (the H200 path runs in tests/test_backends.py)."""
    with _emulated.emulated_device(PATHS[path]):
        assert_matches_reference("cuda-emulated", case, dtype)


def plan_of(name: str, dtype: torch.dtype, device: dict) -> dict:
    plans: list[dict] = []
    case = next(c for c in CASES if c.name == name)
    run_emulated(case, dtype, device, plans)
    assert len(plans) == 1
    return plans[0]


@pytest.mark.parametrize(
    "name, dtype, device, expected",
    [
        # Short rows: a warp each, 8 rows per 256-thread block; 16-byte loads when C allows.
        ("shape-37x1000", torch.float32, H200, dict(warp_rows=True, vectorized=True, blocks=5)),
        ("shape-3x10", torch.bfloat16, H200, dict(warp_rows=True, vectorized=False, blocks=1)),
        # Long rows: a block each, with the row copy in shared memory when it fits.
        ("shape-3x4097", torch.float32, H200, dict(warp_rows=False, vectorized=False, cluster=1)),
        ("shape-3x32000", torch.bfloat16, H200, dict(cache_row=True, cluster=1, blocks=3)),
        # 32000 float32 classes (256 KB) do not fit one block: a cluster of two shares them.
        ("shape-3x32000", torch.float32, H200, dict(cache_row=True, cluster=2, blocks=6)),
        # Without clusters (before sm_90) that row is re-read through L2 instead.
        ("shape-3x32000", torch.float32, dict(H200, max_cluster=1), dict(cache_row=False)),
        ("shape-3x32000", torch.float32, PATHS["block-rows"], dict(cache_row=False)),
        ("shape-37x10", torch.float32, PATHS["clusters"], dict(warp_rows=False, cluster=1)),
        ("shape-3x1000", torch.float32, PATHS["clusters"], dict(cache_row=False, cluster=1)),
    ],
)
def test_launch_plan(name, dtype, device, expected):
    plan = plan_of(name, dtype, device)
    assert {k: plan[k] for k in expected} == expected


def test_strided_rows_fall_back_to_scalar_access():
    """Rows 7 elements apart cannot be read in 16-byte packs."""
    n, c = 4, 4096
    student = torch.randn(n, c + 7)[:, :c]
    teacher = torch.randn(n, c)
    plans: list[dict] = []
    with _emulated.emulated_device(H200, plans):
        out = kd.distillation_loss(student, teacher, reduction="none", backend="cuda-emulated")
    assert plans[0]["vectorized"] is False and plans[0]["warp_rows"] is False
    ref = kd.kd_loss_reference(student.double(), [teacher.double()], reduction="none")
    assert rel_error(out, ref) < 1e-5


def test_emulator_reports_kernel_errors_as_exceptions():
    """A launch the emulator cannot run comes back as a RuntimeError, not a crash."""
    _keep, args = raw_kernel_args(2, 5, student_dtype=3, teacher_dtype=3)  # float64: refused
    args = _emulated._emulator.make_args(**args)
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        _emulated._emulator.forward(args, H200)


def test_cuda_kernel_refuses_sum_rows():
    """sum_rows (one summed loss in row_loss) is the CPU kernel's: the CUDA kernel would write
    N row losses into room for one, so it refuses the flag."""
    _keep, args = raw_kernel_args(4, 5, sum_rows=True)
    args = _emulated._emulator.make_args(**args)
    with pytest.raises(RuntimeError, match="sum_rows is the CPU kernel's"):
        _emulated._emulator.forward(args, H200)


def test_clusters_only_with_cluster_code():
    """Clusters need an sm_90+ device and kernels compiled for sm_90+ (a wheel built for sm_80
    only runs on an H200 from compute_80 code, which has no cluster support)."""
    max_cluster = _emulated._emulator.max_cluster
    assert max_cluster(device_major=9, code_arch=90) == 8
    assert max_cluster(device_major=10, code_arch=100) == 8
    assert max_cluster(device_major=9, code_arch=80) == 1
    assert max_cluster(device_major=8, code_arch=80) == 1


@pytest.mark.parametrize(
    "name, dtype, cluster",
    [
        ("opt-geometric-kl-mean-t21-none-M1", torch.float32, 4),
        ("opt-arithmetic-kl-mean-t21-mixed-M5", torch.bfloat16, 4),
    ],
)
def test_clusters_path_shares_rows_out(name, dtype, cluster):
    """The 'clusters' device really runs the small grid's option cases on clusters."""
    plans: list[dict] = []
    case = next(c for c in SMALL_CASES if c.name == name)
    run_emulated(case, dtype, PATHS["clusters"], plans)
    assert plans[0]["cluster"] == cluster and plans[0]["cache_row"]
