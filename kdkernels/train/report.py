"""The figure of a reference run: each experiment's effect at a glance."""

from __future__ import annotations

from pathlib import Path

import torch


def _bars(ax, labels: list[str], per_seed: list[list[float]], title: str, ylabel: str) -> None:
    values = torch.tensor(per_seed, dtype=torch.float64)  # [seeds, bars]
    std = values.std(0) if len(per_seed) > 1 else torch.zeros(values.shape[1])
    ax.bar(
        range(len(labels)),
        values.mean(0),
        yerr=std,
        capsize=4,
        color=[f"C{i}" for i in range(len(labels))],
    )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8, rotation=15)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")


def plot(results: list[dict], experiments: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(experiments) + ("small" in experiments)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if "ensemble" in experiments:
        r = [x["ensemble"] for x in results]
        _bars(
            axes.pop(0),
            ["ensemble", "alone", "distilled"],
            [[x["ensemble_errors"], x["alone_errors"], x["distilled_errors"]] for x in r],
            "1. ensemble into a small net",
            "test errors",
        )
    if "omit" in experiments:
        r = [x["omit"] for x in results]
        c = r[0]["omitted_class"]
        _bars(
            axes.pop(0),
            ["no shift", "bias shifted"],
            [[100 * x["omitted_right_before"], 100 * x["omitted_right_after"]] for x in r],
            f"2. a class never seen ({c})",
            f"test {c}s right (%)",
        )
    if "small" in experiments:
        r = [x["small"] for x in results]
        _bars(
            axes.pop(0),
            ["all rows, hard", "few, hard", "few, soft"],
            [
                [100 * x["full_hard_accuracy"], 100 * x["hard_accuracy"], 100 * x["soft_accuracy"]]
                for x in r
            ],
            f"3. {r[0]['rows']} training rows",
            "test accuracy (%)",
        )
        ax = axes.pop(0)
        for key, label, color in (
            ("hard_curve", "hard labels", "C1"),
            ("soft_curve", "soft targets", "C2"),
        ):
            curves = torch.tensor([x[key] for x in r], dtype=torch.float64) * 100
            every = r[0]["eval_every"]
            epochs = torch.arange(1, curves.shape[1] + 1) * every
            ax.plot(epochs, curves.mean(0), color=color, label=label)
            if len(r) > 1:
                lo, hi = curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0)
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"3. learning curves on {r[0]['rows']} rows", fontsize=10)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
