"""What the GPU compilers make of the kernels, checked without a GPU: the Triton kernel compiled
ahead of time for sm_80 and sm_90 (tests/triton_aot.py), and the CUDA kernels in the built
extension read with the cuobjdump that ships inside the triton wheel."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import triton_aot  # a helper beside the tests (conftest puts this folder on sys.path)

from kdkernels import _C
from kdkernels import _triton as kt

HERE = Path(__file__).parent

pytest.importorskip("triton", reason="the triton extra is not installed")


@pytest.fixture(scope="module")
def compiled():
    """One JSON line per specialisation and target, from a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(HERE / "triton_aot.py"), "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_specialisation_compiles_for_sm80_and_sm90(compiled):
    specs = triton_aot.specialisations()
    assert len(compiled) == 2 * len(specs)
    for line in compiled:
        assert "error" not in line, line
        assert line["cubin_bytes"] > 0
    # The covering set has every value of every axis the launcher varies.
    expected = dict(
        student=set(triton_aot.DTYPES),
        teacher=set(triton_aot.DTYPES),
        block=set(triton_aot.block_sizes()),
        m=set(range(1, triton_aot.kt.MAX_TEACHERS + 1)),
        soft_loss=set(kt._SOFT_LOSS_CODES.values()),
        **{flag: {False, True} for flag in ("arithmetic", "labels", "grad", "aligned")},
    )
    for axis, values in expected.items():
        assert {line[axis] for line in compiled} == values, axis


def test_no_32_bit_product_reaches_a_pointer_offset(compiled):
    for line in compiled:
        assert line["i32_offset_products"] == [], line


def test_no_exchange_through_memory_without_a_barrier(compiled):
    for line in compiled:
        assert line["unordered_scratch"] == [], line


def test_128_bit_loads_where_rows_are_16_byte_aligned(compiled):
    """With aligned rows (C, strides, pointers divisible by 16) and at least 16 bytes of a row
    per thread, the loads are 128-bit."""
    width = {"float32": 4, "float16": 2, "bfloat16": 2}
    checked = 0
    for line in compiled:
        _, warps = triton_aot.kt.launch_config(line["block"], triton_aot._cuda)
        per_thread = line["block"] // (32 * warps)
        widest = max(width[line["student"]], width[line["teacher"]])
        if line["aligned"] and per_thread * widest >= 16:
            assert line["v4_loads"] > 0, line
            checked += 1
    assert checked >= 2


def test_the_static_checks_can_fail():
    """The checkers flag the two faults they exist for, on TTIR written the faulty way."""
    faulty = """
    %m_1 = arith.constant 2 : i32
    %p_2 = arith.muli %m_1, %stride : i32
    %p_3 = tt.addptr %T, %p_2 : !tt.ptr<f32>, i32
    %v_4 = tt.load %p_3 : !tt.ptr<f32>
    %q_5 = tt.addptr %STATS, %m_1 : !tt.ptr<f32>, i32
    tt.store %q_5, %v_4 : !tt.ptr<f32>
    %q_6 = tt.addptr %STATS, %m_1 : !tt.ptr<f32>, i32
    %v_7 = tt.load %q_6 : !tt.ptr<f32>
    """
    assert triton_aot.i32_offset_products(faulty) == ["%p_2 = arith.muli %m_1 %stride : i32"]
    assert triton_aot.unordered_scratch(faulty) == ["%STATS"]
    assert triton_aot.unordered_scratch(faulty + "gpu.barrier\n") == []


def _cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else shutil.which("cuobjdump")


needs_cuda_build = pytest.mark.skipif(
    not _C.build_info()["cuda"], reason="this build has no CUDA kernels (nvcc was not found)"
)


@pytest.fixture(scope="module")
def cuda_binary():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (it ships in the triton wheel)")
    return tool, _C.__file__


@needs_cuda_build
def test_cuda_kernels_are_built_for_every_architecture(cuda_binary):
    tool, library = cuda_binary
    listing = subprocess.run([tool, "-lelf", library], capture_output=True, text=True, check=True)
    archs = set(re.findall(r"sm_(\d+)", listing.stdout))
    expected = set(_C.build_info()["cuda_architectures"].split(","))
    assert expected <= archs, listing.stdout


def _functions(text: str) -> dict[str, str]:
    """Demangled-enough kernel name -> its section of a cuobjdump listing."""
    parts = re.split(r"\n\s*Function : (\S+)", text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@needs_cuda_build
def test_cuda_packed_path_uses_128_bit_loads(cuda_binary):
    tool, library = cuda_binary
    sass = subprocess.run([tool, "-sass", library], capture_output=True, text=True, check=True)
    functions = _functions(sass.stdout)
    fused = {name: body for name, body in functions.items() if "kd_fwd_kernel" in name}
    assert fused, "no fused kernel in the SASS listing"
    # Template arguments <S, Tt, threads, group, V>: V > 1 is the packed (16-byte) instance.
    packed = {n: b for n, b in fused.items() if not re.search(r"Li1EEEv", n)}
    scalar = {n: b for n, b in fused.items() if re.search(r"Li1EEEv", n)}
    assert packed and scalar
    for name, body in packed.items():
        assert re.search(r"LDG\.E\.128", body), f"{name}: no 128-bit load"


# Bytes of stack frame per thread (spilled registers and the local copies ptxas makes of the
# teacher arrays a loop indexes dynamically). ptxas gives the scalar (V = 1) block-row kernels 64
# registers; they had 24-56 bytes before the divergence pass 3 and 48-80 with it (sm_80, sm_90).
# A kernel past the bound spills more than that.
MAX_STACK_BYTES = 96


@needs_cuda_build
def test_cuda_registers_and_spills_are_bounded(cuda_binary):
    """Every kernel fits its launch bounds' registers, with a bounded stack frame (ptxas spills
    land there) and no other local memory; the table prints with `pytest -s`."""
    tool, library = cuda_binary
    usage = subprocess.run(
        [tool, "-res-usage", library], capture_output=True, text=True, check=True
    )
    rows = re.findall(
        r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout
    )
    assert rows, usage.stdout[:2000]
    report = []
    for name, reg, stack, local in rows:
        report.append(f"{name[:60]} REG:{reg} STACK:{stack} LOCAL:{local}")
        assert int(local) == 0, f"{name} uses local memory: LOCAL:{local}"
        assert int(stack) <= MAX_STACK_BYTES, f"{name}: {stack} bytes of stack"
        limit = 128 if "kd_fwd_kernel" in name and "Li512E" in name else 255
        assert int(reg) <= limit, f"{name} uses {reg} registers (bound {limit})"
    print("\n".join(report))
