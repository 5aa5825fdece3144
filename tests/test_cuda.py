"""The CUDA backend. Its correctness tests need a GPU (marked `cuda`, skipped without one, the same
tests run unchanged on a GPU machine); what the build says about it is tested everywhere."""

import os
import subprocess
import sys

import pytest
import torch

import kdkernels as kd
from kdkernels import _C

HAS_GPU = torch.cuda.is_available() and _C.cuda_status()[0] > 0


def test_backends_report_why_cuda_is_unavailable():
    status = kd.backends()["cuda"]
    build = _C.build_info()
    if not build["cuda"]:
        assert not status.available and "not compiled" in status.reason
    elif not HAS_GPU:
        assert not status.available
        assert "compiled (CUDA" in status.reason and "no GPU" in status.reason
    else:
        assert status.available


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(ValueError, match="backend='cuda' cannot serve these inputs"):
        kd.distillation_loss(torch.randn(2, 5), torch.randn(2, 5), backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine")
def test_cuda_out_of_range_label_gives_nan_row_without_sync():
    s = torch.randn(3, 10, device="cuda", requires_grad=True)
    rows = kd.distillation_loss(
        s,
        torch.randn(3, 10, device="cuda"),
        torch.tensor([1, 50, 2], device="cuda"),
        reduction="none",
        backend="cuda",
    )
    assert rows[1].isnan() and not rows[[0, 2]].isnan().any()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine")
def test_cuda_compiles_fullgraph():
    s = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randn(2, 64, 1000, device="cuda")
    f = torch.compile(lambda s, t: kd.distillation_loss(s, t, backend="cuda"), fullgraph=True)
    f(s, t).backward()
    ref = s.detach().clone().requires_grad_(True)
    kd.distillation_loss(ref, t, backend="cuda").backward()
    torch.testing.assert_close(s.grad, ref.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("row_cache", ["0", "1"])
@pytest.mark.parametrize("c", [4097, 32000, 128256])
def test_cuda_long_rows_with_and_without_the_shared_memory_copy(row_cache, c):
    """Long rows take a block per row, a cluster per row (sm_90, 128k float32 classes) or,
    with KDKERNELS_CUDA_ROW_CACHE=0 (read once per process: a fresh one), re-read the row
    through L2: all match the reference."""
    script = f"""
import torch, kdkernels as kd
from kdkernels.testing import rel_error
student = torch.randn(5, {c}, device="cuda", dtype=torch.float64)
teachers = torch.randn(2, 5, {c}, device="cuda", dtype=torch.float64)
labels = torch.randint(0, {c}, (5,), device="cuda")
s = student.float().requires_grad_(True)
out = kd.distillation_loss(s, teachers.float(), labels, backend="cuda", ensemble="arithmetic")
out.backward()
ref_s = student.requires_grad_(True)
ref = kd.kd_loss_reference(ref_s, list(teachers), labels, ensemble="arithmetic")
ref.backward()
assert rel_error(out, ref) < 1e-5, rel_error(out, ref)
assert rel_error(s.grad, ref_s.grad) < 1e-5, rel_error(s.grad, ref_s.grad)
"""
    env = {**os.environ, "KDKERNELS_CUDA_ROW_CACHE": row_cache}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
