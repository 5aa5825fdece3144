"""Reporting: the markdown table, the CSV and the figure of a benchmark run."""

from __future__ import annotations

import math
from dataclasses import asdict

from .cases import Case
from .measure import Row


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
