"""Timing and memory: the median time of one call per provider, the streaming floor measured
in the same run, peak memory in a fresh process, and `run` over a grid of cases."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

import kdkernels

from .cases import (
    DTYPES,
    Case,
    _compiled,
    estimated_bytes,
    providers,
    reference_loss,
    resident_bytes,
)


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def training_step(fn, case: Case, device: str = "cpu") -> tuple[Callable[[], Tensor], Tensor]:
    """(step, student): one call of provider `fn` on the case's inputs (made once), forward
    and, when case.backward, backward, returning the loss; the student it differentiates."""
    student, teachers, labels = case.inputs(device)
    student.requires_grad_(case.backward)

    def once() -> Tensor:
        student.grad = None
        loss = fn(student, teachers, labels)
        if case.backward:
            loss.backward()
        return loss

    return once, student


def calls_per_sample(once: Callable[[], Tensor], device: str, warmup: int = 3) -> int:
    """Warm `once` up and say how many back-to-back calls a timed sample makes. Warm-up:
    `warmup` calls, and more until 50 ms have passed (a small batch's first calls pay for cold
    caches and lazy initialisation; a long row's first few calls, for faulting in and settling
    fresh memory: N=2048 C=32000 M=4 took 424, 86, 76, 72, then 62-65 ms). A sample then lasts
    about a millisecond (one call of a small batch, tens of microseconds, is mostly timer
    noise)."""
    calls, start = 0, time.perf_counter()
    while calls < warmup or (time.perf_counter() - start < 0.05 and calls < 10_000):
        once()
        _sync(device)
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    return max(1, min(1000, int(1e-3 / per_call)))


def time_calls(once: Callable[[], Tensor], device: str, calls: int) -> tuple[float, Tensor]:
    """Seconds per call of `calls` back-to-back calls of `once()`, and the last loss."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        loss = once()
    _sync(device)
    return (time.perf_counter() - start) / calls, loss


def median_time(once: Callable[[], Tensor], device: str, repeats: int, warmup: int = 3):
    """Median seconds of `once()` (which returns the loss) over `repeats` samples, and the
    loss."""
    calls = calls_per_sample(once, device, warmup)
    samples = [time_calls(once, device, calls) for _ in range(repeats)]
    return statistics.median(s for s, _ in samples), float(samples[-1][1].detach())


def interleaved_median_times(
    steps: dict[str, Callable[[], Tensor]], device: str, repeats: int
) -> dict[str, tuple[float, float]]:
    """{name: (median seconds of one call, loss)} for several providers' steps, their samples
    taken in turns (one of each provider per round, `repeats` rounds, each after an untimed
    call) so that a slow spell of the machine falls on a sample of each rather than on all of
    one provider's: timed one provider after another, a spell as long as one provider's
    samples moved its median alone (N=256 C=10 M=5, kdkernels 122 us in one run against 55-59
    us in two others, its eager and torch.compile times unchanged)."""
    calls = {name: calls_per_sample(once, device) for name, once in steps.items()}
    # What warming up left for the garbage collector (torch.compile leaves a lot) is collected
    # now, not during a sample: the first case's kdkernels row took 64 us at N=1 C=10 right
    # after compiling, 43 us a case later.
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, Tensor] = {}
    for _ in range(repeats):
        for name, once in steps.items():
            # One call first, untimed: a sample starts from the provider's own state, as its
            # calls back to back would, not from what the previous provider left (a long row's
            # kdkernels call took 27-40 ms after an eager call, 26-30 ms after its own).
            once()
            seconds, losses[name] = time_calls(once, device, calls[name])
            samples[name].append(seconds)
    return {
        name: (statistics.median(samples[name]), float(losses[name].detach())) for name in steps
    }


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


def child_peak_memory(provider: str, case_json: str) -> None:
    case = Case(**json.loads(case_json))
    step, student = training_step(providers("cpu", case)[provider], case)

    def once() -> None:
        step()
        student.grad = None  # the gradient is the call's memory, not the inputs'

    print(peak_rss_above(once))


def peak_rss_above(once: Callable[[], object]) -> float:
    """MB of resident memory one call of `once()` peaks at above what the process held before
    it; one warm-up call first (compilation and allocator start-up are not its memory), after
    which the gradient buffers kdkernels keeps for reuse are freed: a fresh process has none."""
    once()
    kdkernels.empty_cache()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) to the current resident size
    base = _rss_kb("VmRSS:")
    once()
    return (_rss_kb("VmHWM:") - base) / 1024


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


def _cuda_free_bytes() -> int:
    """Free device memory, counting what PyTorch's caching allocator holds unused (without
    emptying it first, a reference check at 8192 x 128256 left too little "free" on an H200
    for any case to run)."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def _measure_case(
    case: Case, fns: dict[str, Callable], device: str, repeats: int, memory: bool
) -> dict[str, Row]:
    """The rows of the providers `fns` on one case: their times taken in turns, the streaming
    floor and the float64 reference, and each call's peak memory above the inputs if asked (on
    CUDA always: one more call each, after the timing)."""
    if not fns:
        return {}
    # A fresh, static compilation per case, as a training run with fixed shapes gets:
    # without the reset, dynamo's recompile limit (8) silently falls back to eager.
    torch._dynamo.reset()
    _compiled.clear()
    floor = case.minimal_bytes() / copy_bandwidth(case, device)
    small = case.n * case.c * (1 + case.m) <= 2**29  # the float64 reference fits
    reference = reference_loss(case) if small else float("nan")
    # Each provider its own inputs: a step frees its own last gradient (a large one is returned
    # to the operating system, which costs what a fast kernel does), not another provider's.
    steps = {name: training_step(fn, case, device) for name, fn in fns.items()}
    timed = interleaved_median_times({n: step for n, (step, _) in steps.items()}, device, repeats)
    rows = {}
    for name, (seconds, loss) in timed.items():
        row = Row(case.name, name, seconds * 1e3, loss, reference)
        row.gbps = case.minimal_bytes() / seconds / 1e9
        row.floor_ms = floor * 1e3
        row.times_floor = seconds / floor
        if device == "cuda":  # one more call: its peak above what the process held before it
            step, student = steps[name]
            student.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            row.peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows[name] = row
    del steps  # the fresh processes of peak_memory_mb find this one's memory free
    if memory and device == "cpu":
        for row in rows.values():
            row.peak_mb = peak_memory_mb(row.provider, case)
    return rows


def run(
    cases: list[Case],
    device: str = "cpu",
    repeats: int = 5,
    memory: bool = False,
    progress: bool = True,
) -> list[Row]:
    """Time every provider on every case; ratios are within one case, its providers timed in
    turns (interleaved_median_times). A provider whose estimated working set would not fit in
    this machine's memory is skipped, with a note saying so."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra brings tqdm; without it, no progress bar

        def tqdm(it, **_):
            return it

    rows: list[Row] = []
    free = available_bytes() if device == "cpu" else _cuda_free_bytes()
    for case in tqdm(cases, desc="kdkernels bench", disable=not progress, leave=False):
        names = providers(device, case)
        # Timed in turns, each provider holds its inputs and gradient while the others run.
        # kdkernels first: its rows are what the bench is for.
        skipped, held = {}, 0
        for name in sorted(names, key=lambda name: not name.startswith("kdkernels")):
            need = estimated_bytes(case, name)
            if held + need > 0.6 * free:
                gib = need / 2**30
                skipped[name] = f"skipped: needs about {gib:.0f} GiB beside the others' inputs"
            else:
                held += resident_bytes(case)
        fits = {n: f for n, f in names.items() if n not in skipped}
        measured = _measure_case(case, fits, device, repeats, memory)
        for name in names:
            if name in skipped:
                nan = float("nan")
                rows.append(Row(case.name, name, nan, nan, nan, note=skipped[name]))
            else:
                rows.append(measured[name])
    for row in rows:
        same = {r.provider: r.ms for r in rows if r.case == row.case}
        row.speedup_vs_eager = same.get("eager", float("nan")) / row.ms
        row.speedup_vs_compile = same.get("compile", float("nan")) / row.ms
    return rows
