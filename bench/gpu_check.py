"""GPU check: one call that checks every GPU backend against the reference and times
forward+backward against eager PyTorch, torch.compile (and Liger-Kernel when importable), with
achieved bandwidth as a fraction of a device-to-device copy measured in the same run.

    pip install '.[test,triton,bench]' && python bench/gpu_check.py
    python bench/gpu_check.py --n 4096 --c 32000 --dtype float32 --m 4     # one case

By default it runs four cases that take the CUDA kernel's different paths: a 128k vocabulary
in bfloat16 (on sm_90 a cluster of 4 blocks per row, each holding a quarter of the row in shared
memory), a 32k vocabulary in bfloat16 (one block per row with the row copied into shared memory),
an ensemble of four in float32, 1000 classes (a warp per row) and the JSD (a third pass). Run it
again with KDKERNELS_CUDA_ROW_CACHE=0 to time the CUDA kernel with the shared-memory copy off
(pass 2 re-reads the row through L2). Without a GPU it says so (and why, per backend) and
exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

import kdkernels as kd
from kdkernels.bench import Case, format_table, linear, run
from kdkernels.bench.cases import teacher_list
from kdkernels.reference import kd_loss_reference

DEFAULT_CASES = [
    Case(8192, 128256, 1, "bfloat16"),
    Case(4096, 32000, 1, "bfloat16"),
    Case(4096, 32000, 4, "float32"),
    Case(65536, 1000, 1, "float32"),
    Case(4096, 32000, 1, "bfloat16", soft_loss="jsd"),
]


def check(case: Case, backend: str) -> tuple[float, float]:
    """Relative error of the loss and of the gradient against the float32 GPU reference."""
    student, teachers, labels = case.inputs("cuda")
    s1 = student.detach().clone().requires_grad_(True)
    s2 = student.detach().clone().requires_grad_(True)
    out = kd.distillation_loss(s1, teachers, labels, backend=backend, **case.options())
    ref = kd_loss_reference(s2, teacher_list(teachers), labels, **case.options())
    out.backward()
    ref.backward()
    loss_err = (out.double() - ref.double()).abs().item() / ref.double().abs().item()
    g, r = s1.grad.double(), s2.grad.double()
    grad_err = ((g - r).norm() / r.norm()).item()
    return loss_err, grad_err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="one case of this many rows (default: four cases)")
    parser.add_argument("--c", type=int, default=128256)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-check", action="store_true", help="timing only")
    parser.add_argument("--linear", action="store_true", help="also linear_distillation_loss")
    args = parser.parse_args()

    gpu = {name: s for name, s in kd.backends().items() if name in ("cuda", "triton")}
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; none is available here.")
        for name, status in gpu.items():
            print(f"  {name}: {status.reason}")
        return 2
    versions = f"torch {torch.__version__}, kdkernels {kd.__version__}"
    print(f"device: {torch.cuda.get_device_name()}, {versions}")
    cases = DEFAULT_CASES
    if args.n is not None:
        cases = [Case(args.n, args.c, args.m, args.dtype)]
    print("\ncorrectness at full size (relative error vs the float32 GPU reference):")
    ok = True
    for case in [] if args.skip_check else cases:
        for name, status in gpu.items():
            if not status.available:
                print(f"  {case.name} {name}: not run ({status.reason})")
                continue
            loss_err, grad_err = check(case, name)
            good = loss_err < 1e-2 and grad_err < 1e-2
            ok &= good
            verdict = "ok" if good else "FAIL"
            print(f"  {case.name} {name}: loss {loss_err:.2e}, gradient {grad_err:.2e} {verdict}")
    print(
        "\ntiming (median of repeats; 'GB/s' over the minimal bytes; '/ floor' = time over the "
        "time to move those bytes at the measured device-to-device copy bandwidth):"
    )
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    print(f"device memory: {free / 2**30:.0f} GiB free of {total / 2**30:.0f} GiB")
    for case in cases:  # a table per case, so that a run cut short still reports
        rows = run([case], "cuda", args.repeats, progress=False)
        print(format_table(rows), flush=True)
        for row in rows:
            if not row.note:
                print(f"  {row.provider}: {100 / row.times_floor:.0f}% of copy bandwidth")
    if args.linear:
        print(
            "\nlinear_distillation_loss (forward+backward from hidden states; peak memory "
            "above the inputs and the gradients of hidden and weight):"
        )
        for case in linear.GRIDS["cuda"]:
            rows = linear.run([case], "cuda", max(3, args.repeats // 2), memory=True)
            print(linear.format_table(rows), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
