"""Each instruction-set variant of the CPU kernel against the reference, in its own process
(the variant is chosen once per process, from KDKERNELS_CPU_ISA)."""

import os
import subprocess
import sys

import pytest

from kdkernels import _C

SCRIPT = """
import torch, kdkernels as kd
from kdkernels import _C
from kdkernels.testing import rel_error, sample_inputs, tolerance
worst = 0.0
for case in list(sample_inputs(seed=5))[::7]:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s, t, y = case.inputs(dtype)
        s.requires_grad_(True)
        out = kd.distillation_loss(s, t, y, backend="cpu", **case.kwargs)
        out.sum().backward()
        r = s.detach().double().requires_grad_(True)
        ref = case.reference(r, t, y)
        ref.sum().backward()
        floor = 2 * rel_error(r.grad.to(dtype), r.grad)
        worst = max(worst, rel_error(out, ref) / tolerance(dtype),
                    rel_error(s.grad, r.grad) / max(tolerance(dtype), floor))
print(_C.build_info()["cpu_isa"], worst)
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512", "avx512_bf16"])
def test_cpu_isa_variant_matches_reference(isa, tmp_path):
    if isa not in _C.build_info()["cpu_isas_built"].split(","):
        pytest.skip(f"the {isa} variant is not built for this architecture")
    env = {**os.environ, "KDKERNELS_CPU_ISA": isa}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )  # not the source tree: import the install
    chosen, worst = out.stdout.split()
    if chosen != isa:
        pytest.skip(f"this CPU does not support {isa} (ran {chosen})")
    assert float(worst) < 1.0, f"{isa}: error {worst} x tolerance"
