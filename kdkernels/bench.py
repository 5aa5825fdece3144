"""Microbenchmarks: cases and providers defined once, used by `kdkernels bench` and bench/.

Every figure is measured side by side in one run: the median time of forward+backward (or
forward only) per provider, the time to stream the minimal bytes at the copy bandwidth measured
in the same run, and optionally each provider's peak memory in a fresh process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import kdkernels

from .reference import kd_loss_reference

TEMPERATURE, SOFT_WEIGHT, HARD_WEIGHT = 4.0, 0.9, 0.1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    m: int = 1
    dtype: str = "float32"
    backward: bool = True

    @property
    def name(self) -> str:
        mode = "fwd+bwd" if self.backward else "fwd"
        return f"N={self.n} C={self.c} M={self.m} {self.dtype} {mode}"

    def minimal_bytes(self) -> int:
        """Read the student and the M teachers once; write the gradient once (if backward)."""
        size = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return self.n * self.c * size * (1 + self.m + (1 if self.backward else 0))

    def inputs(self, device: str = "cpu", seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        dtype = DTYPES[self.dtype]
        student = (torch.randn(self.n, self.c, generator=gen) * 2).to(device, dtype)
        teachers = (torch.randn(self.m, self.n, self.c, generator=gen) * 2).to(device, dtype)
        labels = torch.randint(0, self.c, (self.n,), generator=gen).to(device)
        return student, teachers, labels


# The grids. "targets" are the shapes of the CPU performance contract (DESIGN.md section 4).
GRIDS: dict[str, list[Case]] = {
    "quick": [Case(256, 10), Case(256, 1000, m=4), Case(64, 32000, dtype="bfloat16")],
    "targets": [
        Case(2048, 32000),
        Case(2048, 32000, m=4),
        Case(65536, 10),
        Case(2048, 32000, dtype="bfloat16"),
        Case(2048, 32000, m=4, dtype="bfloat16"),
        Case(65536, 10, dtype="bfloat16"),
    ],
}


def eager_kd_loss(student: Tensor, teachers: Tensor, labels: Tensor) -> Tensor:
    """The distillation loss the way users write it in PyTorch (one teacher, or the geometric
    mean of an ensemble: the softmax of the mean logits)."""
    s = student.float()
    t = teachers[0].float() if teachers.shape[0] == 1 else teachers.float().mean(0)
    soft = F.kl_div(
        F.log_softmax(s / TEMPERATURE, -1),
        F.log_softmax(t / TEMPERATURE, -1),
        log_target=True,
        reduction="batchmean",
    )
    return SOFT_WEIGHT * TEMPERATURE**2 * soft + HARD_WEIGHT * F.cross_entropy(s, labels)


def _kdkernels_provider(backend: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def loss(student: Tensor, teachers: Tensor, labels: Tensor) -> Tensor:
        return kdkernels.distillation_loss(
            student,
            teachers,
            labels,
            temperature=TEMPERATURE,
            soft_weight=SOFT_WEIGHT,
            hard_weight=HARD_WEIGHT,
            backend=backend,
        )

    return loss


_compiled: dict[str, Callable] = {}


def providers(device: str = "cpu") -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """Every provider that can run here on `device`: eager, compile, and each kdkernels backend."""
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(eager_kd_loss)
    found = {"eager": eager_kd_loss, "compile": _compiled["compile"]}
    for name, status in kdkernels.backends().items():
        serves = "cpu" if name == "cpu" else "cuda"
        if status.available and name != "torch" and serves == device:
            found[f"kdkernels-{name}"] = _kdkernels_provider(name)
    return found


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_provider(fn, case: Case, device: str = "cpu", repeats: int = 5, warmup: int = 1):
    """Median seconds of one call (forward, and backward when case.backward), and the loss."""
    student, teachers, labels = case.inputs(device)
    student.requires_grad_(case.backward)

    def once() -> Tensor:
        student.grad = None
        loss = fn(student, teachers, labels)
        if case.backward:
            loss.backward()
        return loss

    for _ in range(warmup):
        loss = once()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        loss = once()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), float(loss.detach())


def copy_bandwidth(case: Case, device: str = "cpu", repeats: int = 10) -> float:
    """Bytes per second of a plain tensor copy as large as the case's inputs (read + write),
    from the fastest of `repeats` copies: the floor is the best the memory system showed."""
    src = torch.randn(case.n * case.c * (case.m + 1), device=device).to(DTYPES[case.dtype])
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / min(times)


def reference_loss(case: Case) -> float:
    student, teachers, labels = case.inputs("cpu")
    return float(kd_loss_reference(student.double(), teachers.double(), labels))


def peak_memory_mb(provider: str, case: Case) -> float:
    """Peak resident memory of one call above what the process held before it (the inputs),
    measured in a fresh process per provider so that no other provider's memory counts."""
    out = subprocess.run(
        [sys.executable, "-m", "kdkernels.bench", provider, json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return float(out.stdout.strip().splitlines()[-1])


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(provider: str, case_json: str) -> None:
    case = Case(**json.loads(case_json))
    fn = providers("cpu")[provider]
    student, teachers, labels = case.inputs("cpu")
    student.requires_grad_(case.backward)

    def once() -> None:
        student.grad = None
        loss = fn(student, teachers, labels)
        if case.backward:
            loss.backward()
        student.grad = None

    once()  # warm-up: compilation and allocator start-up are not the loss's memory
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) to the current resident size
    base = _rss_kb("VmRSS:")
    once()
    print((_rss_kb("VmHWM:") - base) / 1024)


@dataclass
class Row:
    case: str
    provider: str
    ms: float
    loss: float
    reference: float
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")
    gbps: float = float("nan")
    floor_ms: float = float("nan")
    times_floor: float = float("nan")
    peak_mb: float = float("nan")


def run(
    cases: list[Case],
    device: str = "cpu",
    repeats: int = 5,
    memory: bool = False,
    progress: bool = True,
) -> list[Row]:
    """Time every provider on every case; ratios are within one case, measured back to back."""
    names = list(providers(device))
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra brings tqdm; without it, no progress bar

        def tqdm(it, **_):
            return it

    rows: list[Row] = []
    steps = [(case, name) for case in cases for name in names]
    bar = tqdm(steps, desc="kdkernels bench", disable=not progress, leave=False)
    floors: dict[Case, float] = {}
    refs: dict[Case, float] = {}
    for case, name in bar:
        if case not in floors:
            floors[case] = case.minimal_bytes() / copy_bandwidth(case, device)
            refs[case] = reference_loss(case)
        seconds, loss = time_provider(providers(device)[name], case, device, repeats)
        row = Row(case.name, name, seconds * 1e3, loss, refs[case])
        row.gbps = case.minimal_bytes() / seconds / 1e9
        row.floor_ms = floors[case] * 1e3
        row.times_floor = seconds / floors[case]
        if memory and device == "cpu":
            row.peak_mb = peak_memory_mb(name, case)
        rows.append(row)
    for row in rows:
        same = [r for r in rows if r.case == row.case]
        eager = next(r.ms for r in same if r.provider == "eager")
        compiled = next(r.ms for r in same if r.provider == "compile")
        row.speedup_vs_eager, row.speedup_vs_compile = eager / row.ms, compiled / row.ms
    return rows


def format_table(rows: list[Row]) -> str:
    header = (
        "| case | provider | ms | x eager | x compile | GB/s | floor ms | / floor | peak MB "
        "| loss rel. err |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        err = abs(r.loss - r.reference) / max(abs(r.reference), 1e-30)
        lines.append(
            f"| {r.case} | {r.provider} | {r.ms:.1f} | {r.speedup_vs_eager:.1f} | "
            f"{r.speedup_vs_compile:.1f} | {r.gbps:.1f} | {r.floor_ms:.1f} | {r.times_floor:.1f} | "
            f"{r.peak_mb:.0f} | {err:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
