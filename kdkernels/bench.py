"""Microbenchmarks: cases and providers defined once, used by `kdkernels bench` and bench/.

Every figure is measured side by side in one run: the median time of forward+backward (or
forward only) per provider, the time to stream the minimal bytes at the copy bandwidth measured
in the same run, and optionally each provider's peak memory in a fresh process.
"""

from __future__ import annotations

import json
import math
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

from ._backends import REGISTRY, missing
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


# The grids. "targets" are the shapes of the CPU performance contract (docs/DESIGN.md section 4).
def _product(ns, cs, ms, dtypes) -> list[Case]:
    return [Case(n, c, m, d) for d in dtypes for m in ms for n in ns for c in cs]


GRIDS: dict[str, list[Case]] = {
    "quick": [Case(256, 10), Case(256, 1000, m=4), Case(64, 32000, dtype="bfloat16")],
    # Image classifiers: small rows, where per-call overhead and short-row loops decide.
    "classification": _product((256, 65536), (10, 100, 1000), (1, 4), ("float32",)),
    "default": _product((256, 65536), (10, 100, 1000), (1, 4), ("float32", "bfloat16"))
    + _product((2048, 8192), (32000, 128256), (1, 4), ("float32", "bfloat16")),
    "targets": [
        Case(2048, 32000),
        Case(2048, 32000, m=4),
        Case(65536, 10),
        Case(2048, 32000, dtype="bfloat16"),
        Case(2048, 32000, m=4, dtype="bfloat16"),
        Case(65536, 10, dtype="bfloat16"),
    ],
}


# Rough peak working set of each provider beyond its inputs, in [N, C] float32 buffers: --memory
# on the targets grid measured eager at 5-7 and compile at 1.5-2 after warm-up, but compiling
# itself peaks higher (an 8192 x 128256 bfloat16 case at an estimate of 3 was killed for memory).
_WORKING_SET = {"eager": 8.0, "compile": 6.0}


def estimated_bytes(case: Case, provider: str) -> int:
    size = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    inputs = case.n * case.c * size * (1 + case.m)
    return int(inputs + case.n * case.c * 4 * _WORKING_SET.get(provider, 1.0))


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


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
    # Each kernel on its own device (the first it serves: Triton on CPU is the test interpreter).
    for name, backend in REGISTRY.items():
        if backend.kernel and missing(name) is None and backend.devices[0] == device:
            found[f"kdkernels-{name}"] = _kdkernels_provider(name)
    if "kdkernels-cuda" in found:
        found["kdkernels-cuda-no-smem-row"] = _without_row_cache(found["kdkernels-cuda"])
    if device == "cuda":
        liger = _liger_provider()
        if liger is not None:
            found["liger"] = liger
    return found


def _without_row_cache(fn: Callable[[Tensor, Tensor, Tensor], Tensor]):
    """The CUDA kernel with its shared-memory row copy turned off: pass 2 re-reads the row
    through L2, to measure what the copy buys."""

    def loss(student: Tensor, teachers: Tensor, labels: Tensor) -> Tensor:
        os.environ["KDKERNELS_CUDA_ROW_CACHE"] = "0"
        try:
            return fn(student, teachers, labels)
        finally:
            del os.environ["KDKERNELS_CUDA_ROW_CACHE"]

    return loss


def _liger_provider() -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """Liger-Kernel's KL-divergence and cross-entropy losses composed into the same loss (its
    KL takes log-probabilities, so the softmaxes stay eager), when Liger is installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    kl, ce = LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerCrossEntropyLoss()

    def loss(student: Tensor, teachers: Tensor, labels: Tensor) -> Tensor:
        t = teachers[0] if teachers.shape[0] == 1 else teachers.float().mean(0)
        soft = kl(
            F.log_softmax(student.float() / TEMPERATURE, -1),
            F.log_softmax(t.float() / TEMPERATURE, -1),
        )
        return SOFT_WEIGHT * TEMPERATURE**2 * soft + HARD_WEIGHT * ce(student, labels)

    return loss


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
    note: str = ""


def run(
    cases: list[Case],
    device: str = "cpu",
    repeats: int = 5,
    memory: bool = False,
    progress: bool = True,
) -> list[Row]:
    """Time every provider on every case; ratios are within one case, measured back to back.
    A provider whose estimated working set would not fit in this machine's memory is skipped,
    with a note saying so."""
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
    free = available_bytes() if device == "cpu" else torch.cuda.mem_get_info()[0]
    for case, name in bar:
        need = estimated_bytes(case, name)
        if need > 0.6 * free:
            note = f"skipped: needs about {need / 2**30:.0f} GiB"
            rows.append(Row(case.name, name, float("nan"), float("nan"), float("nan"), note=note))
            continue
        if case not in floors:
            # A fresh, static compilation per case, as a training run with fixed shapes gets:
            # without the reset, dynamo's recompile limit (8) silently falls back to eager.
            torch._dynamo.reset()
            _compiled.clear()
            floors[case] = case.minimal_bytes() / copy_bandwidth(case, device)
            small = case.n * case.c * (1 + case.m) <= 2**29  # the float64 reference fits
            refs[case] = reference_loss(case) if small else float("nan")
        seconds, loss = time_provider(providers(device)[name], case, device, repeats)
        row = Row(case.name, name, seconds * 1e3, loss, refs[case])
        row.gbps = case.minimal_bytes() / seconds / 1e9
        row.floor_ms = floors[case] * 1e3
        row.times_floor = seconds / floors[case]
        if memory and device == "cpu":
            row.peak_mb = peak_memory_mb(name, case)
        elif device == "cuda":
            row.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
    for row in rows:
        same = {r.provider: r.ms for r in rows if r.case == row.case}
        row.speedup_vs_eager = same.get("eager", float("nan")) / row.ms
        row.speedup_vs_compile = same.get("compile", float("nan")) / row.ms
    return rows


def format_table(rows: list[Row]) -> str:
    header = (
        "| case | provider | ms | x eager | x compile | GB/s | floor ms | / floor | peak MB "
        "| loss rel. err |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        if r.note:
            lines.append(f"| {r.case} | {r.provider} | {r.note} |" + " |" * 7)
            continue
        err = abs(r.loss - r.reference) / max(abs(r.reference), 1e-30)
        err_text = "n/a (too big for the float64 reference)" if math.isnan(err) else f"{err:.1e}"
        lines.append(
            f"| {r.case} | {r.provider} | {r.ms:.1f} | {r.speedup_vs_eager:.1f} | "
            f"{r.speedup_vs_compile:.1f} | {r.gbps:.1f} | {r.floor_ms:.1f} | {r.times_floor:.1f} | "
            f"{r.peak_mb:.0f} | {err_text} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[Row], path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def plot(rows: list[Row], cases: list[Case], path) -> None:
    """Time and peak memory per provider against the problem size N * C (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in cases}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for color, provider in enumerate(dict.fromkeys(r.provider for r in rows)):
        for m, marker in ((1, "o"), (4, "s")):
            mine = [
                r for r in rows if r.provider == provider and not r.note and by_name[r.case].m == m
            ]
            if not mine:
                continue
            sizes = [by_name[r.case].n * by_name[r.case].c for r in mine]
            label = f"{provider}, M={m}"
            style = dict(marker=marker, ls="", color=f"C{color}", label=label)
            axes[0].plot(sizes, [r.ms for r in mine], **style)
            axes[1].plot(sizes, [r.peak_mb for r in mine], **style)
    for ax, ylabel in zip(axes, ("median time (ms)", "peak memory above inputs (MB)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("N x C")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    if any(r.peak_mb > 0 for r in rows):  # NaN when not measured, 0 when nothing above inputs
        axes[1].set_yscale("symlog", linthresh=1.0)
    else:
        axes[1].text(
            0.5, 0.5, "not measured (run with --memory)", ha="center", transform=axes[1].transAxes
        )
    axes[0].legend(fontsize=7)
    fig.suptitle("kdkernels distillation loss vs eager PyTorch and torch.compile")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
