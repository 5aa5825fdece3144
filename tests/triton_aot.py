"""Ahead-of-time compile of the Triton kernel for named GPU targets, with no GPU and no driver,
and static checks of what the compiler made of it. Run as a script (Triton's interpreter must be
off, so not inside the pytest process, whose conftest turns it on); prints one JSON line per
compiled specialisation. tests/test_gpu_static.py runs it and asserts on the lines.

Checks per specialisation:
- `i32_offset_products`: 32-bit multiplies that reach a pointer offset (an offset like m * stride
  overflows at 2^31 elements); must be empty.
- `unordered_scratch`: kernel arguments the kernel both stores to and loads from (an exchange
  between threads through memory) with no barrier in the kernel; must be empty.
- `v4_loads`: 128-bit global loads in the PTX (expected where the row layout allows them).
"""

from __future__ import annotations

import itertools
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kdkernels import _triton as kt

DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
CONSTEXPRS = (
    "M",
    "HAS_LABELS",
    "HAS_UNLABELED",
    "ARITHMETIC",
    "SOFT_LOSS",
    "ROW_SUM_GRADIENT",
    "DEVICE_COUNTS",
    "COMPUTE_GRAD",
    "BLOCK",
)


def block_sizes() -> list[int]:
    """Every BLOCK the launcher picks on a GPU (next power of two of C, capped)."""
    sizes, c = [], 1
    while True:
        block, _ = kt.launch_config(c, _cuda)
        if block in sizes:
            return sizes
        sizes.append(block)
        c *= 2


class _Device:
    type = "cuda"


_cuda = _Device()


def specialisations() -> list[dict]:
    """A covering set: every value of every axis the launcher varies appears at least once
    (each dtype pair, each block size, ensemble mode, labels or not, forward-only, ...), and
    the widest block runs every flag combination of the common case."""
    pairs = list(itertools.product(DTYPES, DTYPES))
    blocks = block_sizes()
    flags = list(itertools.product([False, True], repeat=3))  # arithmetic, labels, grad
    soft_losses = sorted(kt._SOFT_LOSS_CODES.values())
    specs = []
    for i in range(max(len(pairs), len(blocks), len(flags), len(soft_losses))):
        student, teacher = pairs[i % len(pairs)]
        arithmetic, labels, grad = flags[i % len(flags)]
        specs.append(
            dict(
                student=student,
                teacher=teacher,
                block=blocks[i % len(blocks)],
                m=1 + i % kt.MAX_TEACHERS,
                arithmetic=arithmetic,
                labels=labels,
                unlabeled=labels and i % 3 == 0,
                grad=grad,
                soft_loss=soft_losses[i % len(soft_losses)],
                device_counts=labels and i % 2 == 0,
                aligned=i % 2 == 0,
            )
        )
    return specs


def compile_one(spec: dict, arch: int):
    fn = kt._kd_fwd_kernel
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in ("S", "G"):
            signature[name] = "*" + DTYPES[spec["student"]]
        elif re.fullmatch(r"T\d", name):
            signature[name] = "*" + DTYPES[spec["teacher"]]
        elif name == "Y":
            signature[name] = "*i64"
        elif name in ("COUNTS", "LOSS"):
            signature[name] = "*fp32"
        elif re.fullmatch(r"w\d", name) or name in ("inv_t", "soft_scale", "hard_scale", "beta"):
            signature[name] = "fp32"
        elif name in CONSTEXPRS:
            signature[name] = "constexpr"
        else:  # C, row strides, ignore/unlabeled index: i32, the launcher's usual specialisation
            signature[name] = "i32"
    constexprs = dict(
        M=spec["m"],
        HAS_LABELS=spec["labels"],
        HAS_UNLABELED=spec["unlabeled"],
        ARITHMETIC=spec["arithmetic"],
        SOFT_LOSS=spec["soft_loss"],
        ROW_SUM_GRADIENT=kt.row_sum_gradient(spec["soft_loss"]),
        DEVICE_COUNTS=spec["device_counts"],
        COMPUTE_GRAD=spec["grad"],
        BLOCK=spec["block"],
    )
    attrs = {}
    if spec["aligned"]:  # 16-byte aligned pointers, strides and C divisible by 16
        attrs = {
            (names.index(n),): [["tt.divisibility", 16]]
            for n in names
            if signature[n].startswith("*") or n == "C" or re.fullmatch(r"s_row_stride|ts\d", n)
        }
    _, num_warps = kt.launch_config(spec["block"], _cuda)
    return triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=num_warps),
    )


_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = ([\w.]+) (.*)$")
_USE = re.compile(r"\btt\.(load|store) (%[\w.#]+)")


class _Ssa:
    """The single-result ops of a TTIR listing. MLIR's printer reuses names in nested regions,
    so a use resolves to the closest definition above it."""

    def __init__(self, ttir: str) -> None:
        self.lines = ttir.splitlines()
        self.defs: dict[str, list[tuple[int, str, list[str], str]]] = {}
        for i, line in enumerate(self.lines):
            m = _DEF.match(line)
            if m:
                name, op, rest = m.groups()
                body, _, rtype = rest.rpartition(" : ")
                operands = re.findall(r"%[\w.#]+", body)
                self.defs.setdefault(name, []).append((i, op, operands, rtype))

    def resolve(self, name: str, line: int):
        """(line, op, operands, result type) of the definition of `name` seen from `line`."""
        above = [d for d in self.defs.get(name, []) if d[0] < line]
        return above[-1] if above else None


def i32_offset_products(ttir: str) -> list[str]:
    """32-bit multiplies that flow (through adds, extensions and broadcasts) into an offset."""
    ssa = _Ssa(ttir)
    passthrough = {
        "arith.addi",
        "arith.subi",
        "arith.extsi",
        "arith.extui",
        "tt.splat",
        "tt.broadcast",
        "tt.expand_dims",
        "arith.muli",
    }
    found = set()

    def walk(name: str, line: int, seen: set) -> None:
        d = ssa.resolve(name, line)
        if d is None or d[0] in seen:
            return
        seen.add(d[0])
        at, op, operands, rtype = d
        if op == "arith.muli" and re.search(r"\bi32\b|xi32>", rtype):
            found.add(f"{name} = {op} {' '.join(operands)} : {rtype}")
        if op in passthrough:
            for operand in operands:
                walk(operand, at, seen)

    for entries in ssa.defs.values():
        for at, op, operands, _ in entries:
            if op == "tt.addptr":
                walk(operands[1], at, set())
    return sorted(found)


def unordered_scratch(ttir: str) -> list[str]:
    """Kernel arguments both stored to and loaded from, when the kernel has no barrier."""
    ssa = _Ssa(ttir)
    through = {"tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims"}

    def root(name: str, line: int) -> str:
        while (d := ssa.resolve(name, line)) is not None and d[1] in through:
            name, line = d[2][0], d[0]
        return name

    loads, stores = set(), set()
    for i, line in enumerate(ssa.lines):
        m = _USE.search(line)
        if m:
            (loads if m.group(1) == "load" else stores).add(root(m.group(2), i))
    return [] if "gpu.barrier" in ttir else sorted(loads & stores)


def main() -> int:
    archs = [int(a) for a in sys.argv[1:]] or [80, 90]
    for spec, arch in itertools.product(specialisations(), archs):
        line = dict(spec, arch=arch)
        try:
            kernel = compile_one(spec, arch)
        except Exception as exc:  # reported, and the test fails on it
            line["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        else:
            ttir, ptx = kernel.asm["ttir"], kernel.asm["ptx"]
            line["i32_offset_products"] = i32_offset_products(ttir)
            line["unordered_scratch"] = unordered_scratch(ttir)
            line["v4_loads"] = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx))
            line["cubin_bytes"] = len(kernel.asm["cubin"])
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
