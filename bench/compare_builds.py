"""The CPU kernel of this installation against another build's, side by side in one process:
each case alternates the two (ABAB...) and reports medians and their ratio, so machine noise
hits both alike. For "did this change cost speed" questions.

    pip wheel --no-deps -w /tmp/old <old checkout>
    pip install --no-deps --target /tmp/oldpkg /tmp/old/*.whl
    python bench/compare_builds.py /tmp/oldpkg/kdkernels            # random logits (DESIGN shapes)
    python bench/compare_builds.py /tmp/oldpkg/kdkernels --near     # students close to teachers

Both builds get the same raw arguments (kdkernels._C.make_args), so only the kernels are timed.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import statistics
import time

import torch

from kdkernels import _C as this  # its KDArgs type is module-local: no clash with the other's
from kdkernels._fused import MAKE_ARGS_NAMES, OpOptions, kernel_arguments
from kdkernels._validate import Options

CASES = [  # (N, C, M, dtype, ensemble)
    (2048, 32000, 1, torch.float32, "geometric"),
    (2048, 32000, 4, torch.float32, "geometric"),
    (2048, 32000, 4, torch.float32, "arithmetic"),
    (2048, 32000, 1, torch.bfloat16, "geometric"),
    (65536, 10, 1, torch.float32, "geometric"),
    (256, 1000, 5, torch.float32, "geometric"),
]


def load_other(folder: str):
    """The other build's extension, loaded beside this one (its module name differs)."""
    path = glob.glob(f"{folder}/_C*.so")[0]
    spec = importlib.util.spec_from_file_location("other_kdkernels._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_arguments(n, c, m, dtype, ensemble, near, keep):
    """make_args keywords (the same in both builds) for one case, with its tensors kept alive."""
    gen = torch.Generator().manual_seed(0)
    teachers = torch.randn(m, n, c, generator=gen) * 2
    noise = torch.randn(n, c, generator=gen)
    student = teachers.mean(0) + 0.05 * noise if near else 2 * noise
    student, teachers = student.to(dtype), list(teachers.to(dtype))
    labels = torch.randint(0, c, (n,), generator=gen)
    options = OpOptions(*Options(ensemble=ensemble).values, compute_grad=True)
    arguments, *outputs = kernel_arguments(
        this, student, teachers, labels, None, [1 / m] * m, options
    )
    keep += [student, teachers, labels, *outputs]
    return dict(zip(MAKE_ARGS_NAMES, arguments, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="folder of the other build's kdkernels package")
    parser.add_argument("--near", action="store_true", help="students close to their teachers")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    other = load_other(args.other)

    print(f"{'case':40} {'this ms':>9} {'other ms':>9} {'this/other':>10}")
    for n, c, m, dtype, ensemble in CASES:
        keep: list = []
        raw = raw_arguments(n, c, m, dtype, ensemble, args.near, keep)
        # An older build takes fewer options: give it only the keywords its signature names.
        theirs = {k: v for k, v in raw.items() if f"{k}:" in other.make_args.__doc__}
        runs = {"this": (this, this.make_args(**raw)), "other": (other, other.make_args(**theirs))}
        times: dict[str, list[float]] = {"this": [], "other": []}
        for i in range(args.repeats + 1):
            order = ("this", "other") if i % 2 else ("other", "this")
            for name in order:
                module, kernel_args = runs[name]
                start = time.perf_counter()
                module.forward_cpu(kernel_args)
                if i > 0:  # the first round warms caches and pages
                    times[name].append(time.perf_counter() - start)
        ours, theirs = (statistics.median(times[k]) * 1e3 for k in ("this", "other"))
        label = f"{n}x{c} M{m} {str(dtype)[6:]} {ensemble}"
        print(f"{label:40} {ours:9.2f} {theirs:9.2f} {ours / theirs:10.3f}")


if __name__ == "__main__":
    main()
