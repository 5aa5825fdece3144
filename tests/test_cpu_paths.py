"""The CPU kernel's ways through a row agree: a row with one teacher skips pass 1's float copies
(C <= 1024, float32 or bfloat16: its exponential pass reads the inputs, InputLogits; C > 1024:
the one-pass form, one_pass_exp); the same teacher given twice at half weight goes through the
copies (csrc/kd_cpu_kernel.cpp). All are tested against the reference elsewhere; here against
each other, on the same rows, on both sides of the thresholds and of a whole vector."""

import pytest
import torch

import kdkernels as kd
from kdkernels.reference import kd_loss_reference
from kdkernels.testing import rel_error, tolerance


@pytest.mark.parametrize("c", [1, 10, 16, 17, 1000, 1024, 1025])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 3.3])
def test_one_teacher_matches_the_buffered_path(c, dtype, temperature):
    gen = torch.Generator().manual_seed(c)
    s = (torch.randn(9, c, generator=gen) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(9, c, generator=gen) * 3).to(dtype)
    t[1, -1] = float("-inf") if c > 1 else t[1, -1]  # a class the teacher rules out
    y = torch.randint(0, c, (9,), generator=gen)
    unlabeled = 7 if c > 7 else None
    y[0] = -100  # a row that takes no term
    y[2] = -100 if unlabeled is None else unlabeled  # one that takes the soft term only

    def loss_and_grad(teachers, weights):
        loss = kd.distillation_loss(
            s,
            teachers,
            y,
            temperature=temperature,
            teacher_weights=weights,
            reduction="none",
            unlabeled_index=unlabeled,
            backend="cpu",
        )
        (grad,) = torch.autograd.grad(loss.sum(), s)
        return loss, grad

    one, one_grad = loss_and_grad(t, None)
    two, two_grad = loss_and_grad([t, t], [0.5, 0.5])
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(one_grad, two_grad, rtol=1e-5, atol=1e-7)
    else:  # each rounded to bfloat16 once: at most one unit in the last place apart
        torch.testing.assert_close(one_grad.float(), two_grad.float(), rtol=8e-3, atol=1e-6)


_PARALLEL_CALLER = """
#include <omp.h>
void run_in_parallel(void (*callback)(int), int threads) {
#pragma omp parallel num_threads(threads)
  callback(omp_get_thread_num());
}
"""


def test_a_call_from_inside_a_callers_parallel_region_runs_every_row(tmp_path):
    """A one-thread kernel call made from inside a caller's OpenMP parallel region computes all
    its rows (an orphaned omp for in the kernel once shared them with the caller's team)."""
    import ctypes
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build an OpenMP caller")
    library = tmp_path / "libcaller.so"
    (tmp_path / "caller.c").write_text(_PARALLEL_CALLER)
    built = subprocess.run(
        [compiler, "-fopenmp", "-shared", "-fPIC", "-o", str(library), str(tmp_path / "caller.c")],
        capture_output=True,
    )
    if built.returncode != 0:
        pytest.skip("the C compiler cannot build OpenMP code here")
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 10, generator=gen), torch.randn(64, 10, generator=gen)
    expected = kd.distillation_loss(s, t, reduction="sum")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}

    def callback(thread: int) -> None:
        results[thread] = kd.distillation_loss(s, t, reduction="sum")

    try:
        caller = ctypes.CDLL(str(library))
        caller.run_in_parallel(ctypes.CFUNCTYPE(None, ctypes.c_int)(callback), 2)
    finally:
        torch.set_num_threads(threads)
    assert results
    for value in results.values():
        torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [4.0, 3.3])
def test_streamed_gradient_matches_the_reference(dtype, temperature):
    """A gradient of 16 MB or more goes out with streaming stores, a 64-byte line at a time,
    computed in registers (line_bits) where the hard term's exp(s) is a power of the one at T
    (T = 4) and where it is read back from its buffer (T = 3.3); labels in the first and last
    lines of a row, at a line's last class, and in each half of a bfloat16 line."""
    n, c = 66, 65536 if dtype == torch.float32 else 131072  # 17 MB of gradient either way
    gen = torch.Generator().manual_seed(int(temperature * 10))
    s = (torch.randn(n, c, generator=gen) * 2).to(dtype).requires_grad_(True)
    t = (torch.randn(n, c, generator=gen) * 2).to(dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    y[:6] = torch.tensor([0, 15, 16, 31, c - 1, -100])
    loss = kd.distillation_loss(s, t, y, temperature=temperature, backend="cpu")
    (grad,) = torch.autograd.grad(loss, s)
    r = s.detach().double().requires_grad_(True)
    ref = kd_loss_reference(r, [t.double()], y, temperature=temperature)
    (ref_grad,) = torch.autograd.grad(ref, r)
    assert rel_error(loss, ref) < tolerance(dtype)
    floor = 2 * rel_error(ref_grad.to(dtype), ref_grad)  # the gradient's own rounding to dtype
    assert rel_error(grad, ref_grad) < max(tolerance(dtype), floor)
