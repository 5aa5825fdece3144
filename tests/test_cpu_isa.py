"""Each instruction-set variant of the CPU kernel against the reference, in its own process
(the variant is chosen once per process, from KDKERNELS_CPU_ISA)."""

import os
import subprocess
import sys

import pytest
import torch

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

# A bfloat16 gradient of 17 MB (260 x 32768): written with streaming stores, whole lines, which
# the avx512_bf16 variant rounds with one instruction each. Saved to the path in argv[1].
STREAMED_BFLOAT16 = """
import sys, torch, kdkernels as kd
from kdkernels import _C
gen = torch.Generator().manual_seed(0)
s = (torch.randn(260, 32768, generator=gen) * 2).bfloat16().requires_grad_(True)
t = (torch.randn(260, 32768, generator=gen) * 2).bfloat16()
y = torch.randint(0, 32768, (260,), generator=gen)
kd.distillation_loss(s, t, y, backend="cpu").backward()
torch.save(s.grad, sys.argv[1])
print(_C.build_info()["cpu_isa"])
"""


def _run_with_isa(isa: str, script: str, tmp_path, *args: str) -> list[str]:
    """The script's printed words, run in a fresh process with the variant `isa` (skips the test
    where that variant is not built here or the CPU does not support it)."""
    if isa not in _C.build_info()["cpu_isas_built"].split(","):
        pytest.skip(f"the {isa} variant is not built for this architecture")
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "KDKERNELS_CPU_ISA": isa},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )  # not the source tree: import the install
    words = out.stdout.split()
    if words[0] != isa:
        pytest.skip(f"this CPU does not support {isa} (ran {words[0]})")
    return words


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512", "avx512_bf16"])
def test_cpu_isa_variant_matches_reference(isa, tmp_path):
    _, worst = _run_with_isa(isa, SCRIPT, tmp_path)
    assert float(worst) < 1.0, f"{isa}: error {worst} x tolerance"


def test_bfloat16_rounding_instruction_matches_the_integer_rounding(tmp_path):
    """avx512_bf16 rounds a streamed bfloat16 gradient with vcvtne2ps2bf16, the avx512 variant
    with integer arithmetic (from_acc): both round to nearest even, so with no float32
    denormal among the values the gradients are equal bit for bit."""
    grads = {}
    for isa in ("avx512_bf16", "avx512"):
        _run_with_isa(isa, STREAMED_BFLOAT16, tmp_path, str(tmp_path / f"{isa}.pt"))
        grads[isa] = torch.load(tmp_path / f"{isa}.pt")
    assert grads["avx512"].abs().max() > 0
    assert torch.equal(grads["avx512_bf16"], grads["avx512"])
