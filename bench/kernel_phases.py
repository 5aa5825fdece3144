"""Where a long row's CPU kernel time goes: the kernel alone (kdkernels._C.forward_cpu on
prepared arguments) at N=2048, C=32000, M=1, T=4 with labels, in four variants that each remove
one cost: the gradient write (compute_grad off) and the inputs' memory traffic (every row a
view of one cached row, stride 0). "cached, no gradient" is the arithmetic alone.

    python bench/kernel_phases.py --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

from kdkernels import _C
from kdkernels._fused import OpOptions, kernel_arguments
from kdkernels._validate import Options
from kdkernels.bench.measure import median_time


def kernel_ms(student, teacher, compute_grad: bool, repeats: int) -> float:
    labels = torch.randint(0, student.shape[1], (student.shape[0],))
    options = OpOptions(*Options(temperature=4.0).values, compute_grad)
    # row_loss and `_grad` stay alive here: the kernel writes through their pointers.
    arguments, row_loss, _grad = kernel_arguments(
        _C, student, [teacher], labels, None, [1.0], options
    )
    args = _C.make_args(*arguments)

    def once() -> torch.Tensor:
        _C.forward_cpu(args)
        return row_loss[0]

    return median_time(once, "cpu", repeats)[0] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=32000)
    a = parser.parse_args()
    dtype, n, c = getattr(torch, a.dtype), a.rows, a.classes
    rows = torch.randn(n, c).to(dtype), torch.randn(n, c).to(dtype)
    cached = tuple(torch.randn(1, c).to(dtype).expand(n, c) for _ in range(2))
    for label, inputs, grad in [
        ("full", rows, True),
        ("no gradient", rows, False),
        ("inputs cached (stride 0)", cached, True),
        ("cached, no gradient", cached, False),
    ]:
        print(f"{label:26s} {kernel_ms(*inputs, grad, a.repeats):7.2f} ms (median of {a.repeats})")


if __name__ == "__main__":
    main()
