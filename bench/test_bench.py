"""pytest-benchmark suite over the cases defined in kdkernels.bench (the same as `kdkernels bench`).

    pytest bench/                                  # time the quick grid
    KDKERNELS_BENCH_GRID=targets pytest bench/     # or any grid of kdkernels.bench.GRIDS
    pytest bench/ --benchmark-disable              # CI: one run each, loss checked, no timing

Nothing here asserts speed (machines are noisy); every provider must run and agree with the
float64 reference on the loss value.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkernels.bench import GRIDS, Case, providers, reference_loss, run
from kdkernels.bench.measure import interleaved_median_times, training_step

CASES = GRIDS[os.environ.get("KDKERNELS_BENCH_GRID", "quick")]
DEVICE = os.environ.get("KDKERNELS_BENCH_DEVICE", "cpu")


@pytest.mark.parametrize(
    ("case", "provider"),
    [(case, name) for case in CASES for name in providers(DEVICE, case)],
    ids=lambda x: x if isinstance(x, str) else x.name,
)
def test_provider(benchmark, case, provider):
    step, student = training_step(providers(DEVICE, case)[provider], case, DEVICE)

    benchmark.group = case.name
    loss = benchmark(step).item()
    reference = reference_loss(case)
    assert math.isclose(loss, reference, rel_tol=1e-4), f"{provider}: {loss} vs {reference}"
    if case.backward:
        assert student.grad is not None and student.grad.isfinite().all()


@pytest.mark.parametrize(
    "script",
    [
        ["kernel_phases.py", "--rows", "64", "--classes", "1000", "--repeats", "1"],
        ["fixed_cost.py", "--blocks", "1", "--block", "2"],
    ],
    ids=lambda s: s[0],
)
def test_script_runs(script):
    """The bench scripts the README quotes still run (small sizes, nothing timed)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / script[0]), *script[1:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert " ms " in done.stdout or " us" in done.stdout


def test_run_measures_every_provider_of_a_case():
    """`kdkernels bench`'s run: a row per provider in the providers' order, each loss the
    reference's, the ratios taken within the case."""
    case = Case(8, 10, m=2, as_list=True)
    rows = run([case], DEVICE, repeats=1, progress=False)
    assert [r.provider for r in rows] == list(providers(DEVICE, case))
    eager = next(r for r in rows if r.provider == "eager")
    for row in rows:
        assert row.ms > 0 and row.floor_ms > 0 and not row.note
        assert math.isclose(row.loss, row.reference, rel_tol=1e-4), row
        assert math.isclose(row.speedup_vs_eager, eager.ms / row.ms)


def test_providers_are_timed_in_turns():
    """After warming each up, one sample of each provider per round (an untimed call, then the
    timed ones), `repeats` rounds."""
    log: list[str] = []

    def step(name: str):
        def once() -> torch.Tensor:
            log.append(name)
            return torch.zeros(())

        return once

    times = interleaved_median_times({"a": step("a"), "b": step("b")}, "cpu", repeats=3)
    assert set(times) == {"a", "b"} and all(t > 0 for t, _ in times.values())
    turns = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert turns == ["a", "b"] * 4  # the warm-ups, then three rounds
