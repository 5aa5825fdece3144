"""The Triton backend against the float64 reference: under the interpreter on CPU tensors in
CI (small shapes), on CUDA tensors at full size where a GPU is present."""

import pytest
import torch

import kdkernels as kd

pytest.importorskip("triton", reason="the triton extra is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The comparison with the reference on the sample grid is tests/test_backends.py, for every
# backend on the same data.


def test_out_of_range_label_gives_nan_row_on_device_path():
    """Without host validation (as on CUDA), a bad label makes its row NaN, never a crash."""
    from kdkernels._triton import triton_loss
    from kdkernels._validate import Options, Problem

    s, t = torch.randn(3, 10, device=DEVICE), torch.randn(3, 10, device=DEVICE)
    labels = torch.tensor([1, 50, 2], device=DEVICE)
    problem = Problem(s, [t], labels, [1.0], s.shape[:-1], Options(reduction="none"))
    rows = triton_loss(problem)
    assert rows[1].isnan() and not rows[[0, 2]].isnan().any()


def test_backend_reports_why_it_cannot_serve_float64():
    with pytest.raises(ValueError, match="float64 inputs are not supported"):
        kd.distillation_loss(
            torch.randn(2, 5, dtype=torch.float64, device=DEVICE),
            torch.randn(2, 5, dtype=torch.float64, device=DEVICE),
            backend="triton",
        )


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch.compile of Triton kernels needs a GPU"
)
def test_triton_compiles_fullgraph():
    s = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randn(2, 64, 1000, device="cuda")
    f = torch.compile(lambda s, t: kd.distillation_loss(s, t, backend="triton"), fullgraph=True)
    loss = f(s, t)
    loss.backward()
    ref_s = s.detach().clone().requires_grad_(True)
    kd.distillation_loss(ref_s, t, backend="triton").backward()
    torch.testing.assert_close(s.grad, ref_s.grad)
