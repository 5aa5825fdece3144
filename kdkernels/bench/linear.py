"""The hidden-state loss (`linear_distillation_loss`) against the ways users compute it today:
eager PyTorch forming the logits and then the loss (F.kl_div + F.cross_entropy), the same
with kdkernels' logits kernel, torch.compile of the eager code, and Liger-Kernel's chunked
`LigerFusedLinearJSDLoss` at beta=0 (forward KL; when importable). Forward+backward, float32
or bfloat16, the medians of repeats; peak memory above the inputs and the gradients that must
exist anyway, each provider in a fresh process (CPU) or from the allocator's peak (CUDA).

    kdkernels bench --grid linear [--memory] [--device cuda]
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

import kdkernels

from .cases import DTYPES, HARD_WEIGHT, SOFT_WEIGHT, TEMPERATURE, eager_kd_loss
from .measure import _sync, median_time, peak_rss_above


@dataclass(frozen=True)
class LinearCase:
    n: int  # rows (batch x sequence)
    h: int  # hidden size (student and teacher)
    v: int  # vocabulary
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} {self.dtype}"

    def inputs(self, device: str = "cpu", seed: int = 0) -> dict[str, Tensor]:
        g = torch.Generator(device=device).manual_seed(seed)
        dtype = DTYPES[self.dtype]

        def randn(*shape: int, scale: float = 1.0) -> Tensor:
            x = torch.randn(*shape, generator=g, device=device)
            return (x * scale).to(dtype)

        scale = 4.0 / self.h**0.5  # logits of spread about 4, as a trained lm_head gives
        return dict(
            hidden=randn(self.n, self.h).requires_grad_(True),
            weight=randn(self.v, self.h, scale=scale).requires_grad_(True),
            teacher_hidden=randn(self.n, self.h),
            teacher_weight=randn(self.v, self.h, scale=scale),
            labels=torch.randint(0, self.v, (self.n,), generator=g, device=device),
        )


GRIDS = {
    "cpu": [
        LinearCase(n, h, v)
        for v in (32000, 128256)
        for h in (1024,)
        for n in (512, 2048, 8192)
        if n * v <= 2048 * 128256  # the eager baseline's [N, V] buffers must fit in 24 GiB
    ],
    # A Llama-3-sized vocabulary and hidden size in bfloat16, and the N = 8192.
    "cuda": [
        LinearCase(2048, 4096, 128256, "bfloat16"),
        LinearCase(8192, 4096, 128256, "bfloat16"),
        LinearCase(8192, 2048, 32000, "bfloat16"),
    ],
}


def _logits(x: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    student = x["hidden"] @ x["weight"].T
    with torch.no_grad():
        teacher = x["teacher_hidden"] @ x["teacher_weight"].T
    return student, teacher


def eager(x: dict[str, Tensor]) -> Tensor:
    student, teacher = _logits(x)
    return eager_kd_loss(student, teacher.unsqueeze(0), x["labels"])


def eager_kdkernels(x: dict[str, Tensor]) -> Tensor:
    student, teacher = _logits(x)
    return kdkernels.distillation_loss(student, teacher, x["labels"], **_OPTIONS)


def matmuls_only(x: dict[str, Tensor]) -> Tensor:
    """The four matmuls every provider needs (student and teacher logits, the hidden-state and
    weight gradients) and nothing else: the floor the loss-side work is measured against."""
    student, _ = _logits(x)
    return student.sum()  # its backward is the two gradient matmuls (of an expanded ones)


def fused(x: dict[str, Tensor]) -> Tensor:
    return kdkernels.linear_distillation_loss(
        x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"], **_OPTIONS
    )


_OPTIONS = dict(temperature=TEMPERATURE, soft_weight=SOFT_WEIGHT, hard_weight=HARD_WEIGHT)


@functools.cache
def _liger() -> Callable[[dict[str, Tensor]], Tensor] | None:
    """Liger's chunked JSD at beta=0 is KL(p || q) at temperature T; its soft weight takes
    T^2 (Liger applies none) so that it computes the same loss as the others."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=HARD_WEIGHT,
        weight_soft_loss=SOFT_WEIGHT * TEMPERATURE**2,
        beta=0.0,
        temperature=TEMPERATURE,
    )
    return lambda x: loss(
        x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"]
    )


def providers() -> dict[str, Callable[[dict[str, Tensor]], Tensor]]:
    found = {
        "eager": eager,
        "eager logits + kdkernels": eager_kdkernels,
        "compile": torch.compile(eager),
        "kdkernels linear": fused,
        "matmuls only": matmuls_only,
    }
    if _liger() is not None:
        found["liger chunked"] = _liger()
    return found


@dataclass
class LinearRow:
    case: str
    provider: str
    ms: float
    loss: float
    peak_mb: float = float("nan")
    x_eager: float = float("nan")
    x_compile: float = float("nan")
    x_liger: float = float("nan")


def _step(fn, x: dict[str, Tensor]) -> Tensor:
    x["hidden"].grad = x["weight"].grad = None
    loss = fn(x)
    loss.backward()
    return loss


def time_one(fn, x: dict[str, Tensor], device: str, repeats: int) -> tuple[float, float]:
    return median_time(lambda: _step(fn, x), device, repeats)


def peak_mb(provider: str, case: LinearCase, device: str) -> float:
    """Peak memory of one forward+backward above the inputs and the gradients of hidden and
    weight (which every provider must produce)."""
    if device == "cuda":
        x = case.inputs(device)
        fn = providers()[provider]
        _step(fn, x)
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # inputs and the gradients of the last step
        _step(fn, x)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    out = subprocess.run(
        [sys.executable, "-m", "kdkernels.bench.linear", provider, json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _child_peak(provider: str, case_json: str) -> None:
    case = LinearCase(**json.loads(case_json))
    x = case.inputs()
    fn = providers()[provider]
    # After the warm-up step the gradients exist, as they must after any step.
    print(peak_rss_above(lambda: _step(fn, x)))


def run(
    cases: list[LinearCase], device: str = "cpu", repeats: int = 5, memory: bool = False
) -> list[LinearRow]:
    rows = []
    for case in cases:
        x = case.inputs(device)
        mine = []
        for name, fn in providers().items():
            torch._dynamo.reset()
            seconds, loss = time_one(fn, x, device, repeats)
            row = LinearRow(case.name, name, seconds * 1e3, loss)
            if memory:
                row.peak_mb = peak_mb(name, case, device)
            mine.append(row)
        by_name = {r.provider: r.ms for r in mine}
        for r in mine:
            r.x_eager = by_name["eager"] / r.ms
            r.x_compile = by_name["compile"] / r.ms
            r.x_liger = by_name.get("liger chunked", float("nan")) / r.ms
        rows += mine
    return rows


def format_table(rows: list[LinearRow]) -> str:
    memory = any(r.peak_mb == r.peak_mb for r in rows)
    columns = ["case", "provider", "ms", "x eager", "x compile", "x liger"]
    columns += ["peak MB above inputs"] * memory + ["loss"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.case, r.provider, f"{r.ms:.1f}", f"{r.x_eager:.2f}", f"{r.x_compile:.2f}"]
        cells += [f"{r.x_liger:.2f}"] + [f"{r.peak_mb:.0f}"] * memory + [f"{r.loss:.6f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[LinearRow], path) -> None:
    """Time, and peak memory when measured, per provider for each case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = any(r.peak_mb == r.peak_mb for r in rows)
    panels = [("ms", "forward+backward (ms)")] + [("peak_mb", "peak MB above inputs")] * memory
    cases = list(dict.fromkeys(r.case for r in rows))
    names = list(dict.fromkeys(r.provider for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    width = 0.8 / len(names)
    for ax, (field, label) in zip(axes[0], panels, strict=True):
        for i, name in enumerate(names):
            values = {r.case: getattr(r, field) for r in rows if r.provider == name}
            xs = [c + i * width for c in range(len(cases))]
            ax.bar(xs, [values.get(c, 0.0) for c in cases], width, label=name)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([c.replace(" float32", "") for c in cases], rotation=20, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # one provider's peak memory in a fresh process (peak_mb runs it)
    _child_peak(sys.argv[1], sys.argv[2])
