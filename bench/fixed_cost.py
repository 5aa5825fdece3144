"""The fixed cost of one call at N=1, C=10 (CPU, float32): forward+backward with M = 1..5
teachers (one tensor for M=1, a list otherwise), the forward under torch.no_grad(), and the
floors measured beside them: PyTorch's own (`.backward()` of a leaf, an autograd.Function that
does nothing) and the CPU kernel alone in an autograd.Function, called as the fast path
(kdkernels/_eager_cpu.py) calls it but on arguments prepared once (no checks, no options: what a
call would cost with everything but the kernel and autograd gone).
Medians over interleaved blocks of calls, in microseconds.

    python bench/fixed_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdkernels as kd
from kdkernels._eager_cpu import _kernel_dtypes, _kernel_options, _run_kernel
from kdkernels._extension import load_extension
from kdkernels._validate import Options


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros(1, 10)


class _KernelOnly(torch.autograd.Function):
    """The fast path's kernel call on arguments prepared once, the gradient handed back as it
    is (a floor: correct only for the grad_loss of 1.0 this script passes)."""

    @staticmethod
    def forward(ctx, student, arguments):
        loss, ctx.gradient = _run_kernel(student, arguments)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # 1.0 here (.backward() of the loss): the gradient as saved
        grad, ctx.gradient = ctx.gradient, None
        return grad, None


# The base class's C++ apply, as the fast path calls its Function (kdkernels/_autograd.py).
kernel_only_apply = super(torch.autograd.Function, _KernelOnly).apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=21, help="timed rounds (the median's)")
    parser.add_argument("--block", type=int, default=300, help="calls per round")
    a = parser.parse_args()
    torch.set_num_threads(2)
    student = torch.randn(1, 10, requires_grad=True)
    labels = torch.randint(0, 10, (1,))
    teachers = {m: [torch.randn(1, 10) for _ in range(m)] for m in range(1, 6)}
    teachers[1] = teachers[1][0]

    def step(m: int) -> None:
        student.grad = None
        kd.distillation_loss(student, teachers[m], labels).backward()

    def no_grad() -> None:
        with torch.no_grad():
            kd.distillation_loss(student, teachers[1], labels)

    def leaf_backward() -> None:
        student.grad = None
        student.sum().backward()

    def nothing() -> None:
        student.grad = None
        _Nothing.apply(student).backward()

    ext = load_extension()[0]
    prepared = (ext.run_cpu, _kernel_options(ext, Options(), 1), _kernel_dtypes()[torch.float32])
    prepared += ([teachers[1].data_ptr()], [10], labels.data_ptr())

    def kernel_only() -> None:
        student.grad = None
        kernel_only_apply(student, prepared).backward()

    calls = {f"M={m} fwd+bwd": (lambda m=m: step(m)) for m in teachers}
    calls |= {"M=1 forward, no_grad": no_grad, "torch: sum().backward()": leaf_backward}
    calls["torch: do-nothing Function fwd+bwd"] = nothing
    calls["the kernel alone in a Function"] = kernel_only
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(a.blocks + 1):  # the first round warms up
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(a.block):
                call()
            times[name].append((time.perf_counter() - start) / a.block * 1e6)
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    for name, us in median.items():
        print(f"{name:36s} {us:7.1f} us")
    per_teacher = (median["M=5 fwd+bwd"] - median["M=1 fwd+bwd"]) / 4
    print(f"{'per extra teacher, (M=5 - M=1) / 4':36s} {per_teacher:7.2f} us")


if __name__ == "__main__":
    main()
