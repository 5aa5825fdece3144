"""Reporting: the markdown table, the CSV and the figure of a benchmark run."""

from __future__ import annotations

import math
from dataclasses import asdict

from .cases import Case
from .measure import Row


def memory_measured(rows: list[Row]) -> bool:
    """Whether the run measured peak memory (--memory, or any run on a GPU)."""
    return any(not math.isnan(r.peak_mb) for r in rows)


def format_table(rows: list[Row]) -> str:
    """A markdown table; the peak-memory column only when the run measured it."""
    memory = memory_measured(rows)
    columns = ["case", "provider", "ms", "x eager", "x compile", "GB/s", "floor ms", "/ floor"]
    columns += ["peak MB"] * memory + ["loss rel. err"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r.note:
            lines.append(f"| {r.case} | {r.provider} | {r.note} |" + " |" * (len(columns) - 3))
            continue
        err = abs(r.loss - r.reference) / max(abs(r.reference), 1e-30)
        err_text = "n/a (too big for the float64 reference)" if math.isnan(err) else f"{err:.1e}"
        # Three significant digits: a small batch takes tenths of a millisecond.
        cells = [r.case, r.provider, f"{r.ms:.3g}", f"{r.speedup_vs_eager:.1f}"]
        cells += [f"{r.speedup_vs_compile:.1f}", f"{r.gbps:.1f}", f"{r.floor_ms:.3g}"]
        cells += [f"{r.times_floor:.1f}"] + [f"{r.peak_mb:.0f}"] * memory + [err_text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[Row], path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def plot(rows: list[Row], cases: list[Case], path) -> None:
    """Time per provider against the problem size N * C (log-log), and beside it peak memory
    when the run measured it (one panel otherwise: an empty one would say nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = memory_measured(rows)
    fig, axes = plt.subplots(1, 1 + memory, figsize=(5.5 * (1 + memory), 4), squeeze=False)
    panels = [("median time (ms)", "ms", "log")]
    if memory:  # symlog: 0 (nothing above the inputs) is a value too
        panels.append(("peak memory above inputs (MB)", "peak_mb", "symlog"))
    by_name = {c.name: c for c in cases}
    for color, provider in enumerate(dict.fromkeys(r.provider for r in rows)):
        for m, marker in zip(sorted({c.m for c in cases}), "osD^v", strict=False):
            mine = [
                r for r in rows if r.provider == provider and not r.note and by_name[r.case].m == m
            ]
            if not mine:
                continue
            sizes = [by_name[r.case].n * by_name[r.case].c for r in mine]
            style = dict(marker=marker, ls="", color=f"C{color}", label=f"{provider}, M={m}")
            for ax, (_, field, _) in zip(axes[0], panels, strict=True):
                ax.plot(sizes, [getattr(r, field) for r in mine], **style)
    for ax, (ylabel, _, scale) in zip(axes[0], panels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale(scale, **({"linthresh": 1.0} if scale == "symlog" else {}))
        ax.set_xlabel("N x C")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("kdkernels distillation loss vs eager PyTorch and torch.compile")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
