"""The paper's three MNIST-scale effects (Hinton, Vinyals & Dean 2015, sections 3 and 5), each
run per seed on teachers trained once per seed:

1. "ensemble": a small net distilled from an ensemble against the same net on hard labels
   (paper, MNIST: 146 test errors alone, 74 distilled at T = 20, 67 for the large net).
2. "omit": a class never seen in the transfer set (every 3 removed), learned from the teachers'
   soft targets alone; its output bias is then raised by a shift chosen on the validation split
   (paper: 206 errors, 133 of them on the 1,010 test 3s; 98.6% of the 3s right after +3.5).
3. "small": a few percent of the training rows, hard labels against soft targets from teachers
   trained on every row, both with early stopping (paper, speech, Table 5: 44.5% frame
   accuracy with hard targets on 3%, 57.0% with soft targets, 58.9% with all the data).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import kdkernels

from .data import Data
from .loop import errors, mlp, train_student, train_teacher

EXPERIMENTS = ("ensemble", "omit", "small")


@dataclass
class Settings:
    """What the three experiments need from the configuration."""

    teachers: int
    teacher_hidden: int
    teacher_epochs: int
    teacher_dropout: float
    jitter: int
    student_hidden: int
    student_epochs: int
    temperature: float
    soft_weight: float
    hard_weight: float
    ensemble: str
    backend: str
    omitted_class: int
    small_fraction: float
    small_epochs: int

    def criterion(self) -> kdkernels.DistillationLoss:
        return kdkernels.DistillationLoss(
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            hard_weight=self.hard_weight,
            ensemble=self.ensemble,
            backend=self.backend,
        )


def epoch_cost(rows: int, inputs: int, hidden: int, eval_rows: int = 0, eval_every: int = 1) -> int:
    """Multiply-adds of one epoch of a 2-hidden-layer MLP (forward and backward on `rows`, a
    forward on `eval_rows` every `eval_every` epochs): the unit of the run's time estimate."""
    params = inputs * hidden + hidden * hidden + hidden * 10
    return 3 * rows * params + eval_rows * params // eval_every


def planned_cost(data: Data, s: Settings, experiments: tuple[str, ...]) -> int:
    """epoch_cost summed over one seed's stages, as run_seed runs them."""
    n, d, h = len(data.y_train), data.x_train.shape[1], s.student_hidden
    held_out = len(data.y_val) + len(data.y_test)
    student = epoch_cost(n, d, h, held_out)
    total = s.teachers * s.teacher_epochs * epoch_cost(n, d, s.teacher_hidden)
    total += (
        s.student_epochs * student * (("ensemble" in experiments) + ("small" in experiments) > 0)
    )
    total += s.student_epochs * student * ("ensemble" in experiments)
    if "omit" in experiments:
        rows = int((data.y_train != s.omitted_class).sum())
        total += s.student_epochs * epoch_cost(rows, d, h, held_out)
    if "small" in experiments:
        k = _small_rows(s, n)
        every = max(1, s.small_epochs // 200)
        total += 2 * s.small_epochs * epoch_cost(k, d, h, held_out, every)
    return total


def _small_rows(s: Settings, n: int) -> int:
    return max(10, round(s.small_fraction * n))


def _logits(models: list[nn.Module], x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.stack([m(x) for m in models])


def run_seed(
    data: Data, s: Settings, seed: int, experiments: tuple[str, ...], stage: Callable
) -> dict:
    """Every asked experiment on one seed: teachers first, then one student run per arm.
    `stage(name, epochs, cost)` returns the per-epoch tick of a named progress stage whose
    epochs each cost `cost` (epoch_cost)."""
    teachers = [
        train_teacher(
            data,
            s.teacher_hidden,
            s.teacher_epochs,
            s.teacher_dropout,
            s.jitter,
            seed * 1000 + m,
            stage(
                f"seed {seed}: teacher {m + 1}/{s.teachers}",
                s.teacher_epochs,
                epoch_cost(len(data.y_train), data.x_train.shape[1], s.teacher_hidden),
            ),
        )
        for m in range(s.teachers)
    ]
    train_logits, test_logits = _logits(teachers, data.x_train), _logits(teachers, data.x_test)
    torch.manual_seed(seed + 10_000)
    init = mlp(data.x_train.shape[1], s.student_hidden, 2).state_dict()
    n_test = len(data.y_test)
    out: dict = {"seed": seed}

    def student(name: str, d: Data, epochs: int, logits: Tensor | None):
        held_out = len(data.y_val) + len(data.y_test)
        every = max(1, epochs // 200)  # train_student's evaluations
        cost = epoch_cost(len(d.y_train), d.x_train.shape[1], s.student_hidden, held_out, every)
        tick = stage(f"seed {seed}: {name}", epochs, cost)
        criterion = None if logits is None else s.criterion()
        return train_student(d, init, epochs, seed, tick, logits, criterion)

    if "ensemble" in experiments or "small" in experiments:
        alone = student("small net alone", data, s.student_epochs, None)
        out["alone_errors"] = errors(alone.model(data.x_test), data.y_test)
    if "ensemble" in experiments:
        distilled = student("small net distilled", data, s.student_epochs, train_logits)
        geometric = test_logits.mean(0)  # softmax of the mean logits: the geometric mean
        out["ensemble"] = {
            "teacher_errors": [errors(t, data.y_test) for t in test_logits],
            "ensemble_errors": errors(geometric, data.y_test),
            "alone_errors": out["alone_errors"],
            "distilled_errors": errors(distilled.model(data.x_test), data.y_test),
            "alone_curve": alone.test_curve,
            "distilled_curve": distilled.test_curve,
            "distilled_first_loss": distilled.first_loss,
            "distilled_last_loss": distilled.last_loss,
            "test_rows": n_test,
        }
    if "omit" in experiments:
        c = s.omitted_class
        keep = (data.y_train != c).nonzero().squeeze(1)
        run = student(
            f"{c}s omitted", data.train_rows(keep), s.student_epochs, train_logits[:, keep]
        )
        out["omit"] = _omitted_class_result(run.model, data, c) | {
            "distilled_first_loss": run.first_loss,
            "distilled_last_loss": run.last_loss,
        }
    if "small" in experiments:
        gen = torch.Generator().manual_seed(seed + 20_000)
        k = _small_rows(s, len(data.y_train))
        rows = torch.randperm(len(data.y_train), generator=gen)[:k]
        small = data.train_rows(rows)
        hard = student(f"{k} rows, hard labels", small, s.small_epochs, None)
        soft = student(f"{k} rows, soft targets", small, s.small_epochs, train_logits[:, rows])
        out["small"] = {
            "rows": k,
            "fraction": k / len(data.y_train),
            "full_hard_accuracy": 1 - out["alone_errors"] / n_test,
            "hard_accuracy": 1 - errors(hard.model(data.x_test), data.y_test) / n_test,
            "soft_accuracy": 1 - errors(soft.model(data.x_test), data.y_test) / n_test,
            "hard_best_epoch": hard.best_epoch,
            "soft_best_epoch": soft.best_epoch,
            "eval_every": hard.eval_every,
            "hard_curve": [1 - e / n_test for e in hard.test_curve],
            "soft_curve": [1 - e / n_test for e in soft.test_curve],
        }
    return out


@torch.no_grad()
def _omitted_class_result(model: nn.Module, data: Data, c: int) -> dict:
    """Test errors and the omitted class's test accuracy before and after raising its output
    bias by the shift (0 to 20 in steps of 0.1) with the fewest validation errors."""
    val, test = model(data.x_val), model(data.x_test)
    shifts = torch.arange(0, 20.05, 0.1)
    raise_c = torch.zeros(10)
    val_errors = []
    for b in shifts:
        raise_c[c] = b
        val_errors.append(errors(val + raise_c, data.y_val))
    shift = float(shifts[min(range(len(shifts)), key=val_errors.__getitem__)])
    raise_c[c] = shift
    is_c = data.y_test == c
    return {
        "omitted_class": c,
        "omitted_test_rows": int(is_c.sum()),
        "test_errors": errors(test, data.y_test),
        "errors_on_omitted": errors(test[is_c], data.y_test[is_c]),
        "omitted_right_before": float((test[is_c].argmax(-1) == c).float().mean()),
        "shift": shift,
        "test_errors_after": errors(test + raise_c, data.y_test),
        "omitted_right_after": float(((test + raise_c)[is_c].argmax(-1) == c).float().mean()),
        "test_rows": len(data.y_test),
    }


# ---- tables in the paper's form, with the paper's figures beside ours -----------------------


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], percent: bool = False) -> str:
    mean, std = _stats(values)
    scale, unit = (100, "%") if percent else (1, "")
    if len(values) == 1:
        return f"{scale * mean:.1f}{unit}"
    return f"{scale * mean:.1f} ± {scale * std:.1f}{unit}"


def paired_verdict(gain: list[float], what: str, unit: str = "") -> str:
    """A plain-words line on a paired comparison over seeds: the mean gain and its spread; the
    effect counts as reproduced when the mean gain is positive and outside one standard
    deviation of the per-seed gains."""
    mean, std = _stats(gain)
    if len(gain) < 2:
        return f"{what}: {mean:+.1f}{unit} on one seed (no spread to compare against)."
    clear = mean > 0 and mean > std
    head = "Reproduced" if clear else ("Within the noise" if mean > 0 else "Not reproduced")
    return (
        f"{head}: {what} by {mean:+.1f}{unit} (paired over {len(gain)} seeds, std {std:.1f}; "
        f"{'outside' if clear else 'not outside'} one standard deviation)."
    )


def ensemble_table(results: list[dict]) -> str:
    r = [x["ensemble"] for x in results]
    n = r[0]["test_rows"]
    lines = [
        f"| model | paper (MNIST, test errors of 10,000) | ours (test errors of {n}) |",
        "|---|---|---|",
        f"| each teacher (mean) | — | {_cell([statistics.mean(x['teacher_errors']) for x in r])} |",
        f"| large net / ensemble (geometric mean) | 67 | "
        f"{_cell([x['ensemble_errors'] for x in r])} |",
        f"| small net alone (hard labels) | 146 | {_cell([x['alone_errors'] for x in r])} |",
        f"| small net distilled | 74 | {_cell([x['distilled_errors'] for x in r])} |",
        "",
        paired_verdict(
            [x["alone_errors"] - x["distilled_errors"] for x in r],
            "distillation cut the small net's test errors",
            " errors",
        ),
    ]
    return "\n".join(lines)


def omit_table(results: list[dict]) -> str:
    r = [x["omit"] for x in results]
    c, n, n_c = r[0]["omitted_class"], r[0]["test_rows"], r[0]["omitted_test_rows"]
    lines = [
        f"| every {c} omitted from the transfer set | paper (MNIST, 3s) | ours ({n} test rows, "
        f"{n_c} of them {c}s) |",
        "|---|---|---|",
        f"| test errors | 206 | {_cell([x['test_errors'] for x in r])} |",
        f"| of them on the {c}s | 133 of 1,010 | {_cell([x['errors_on_omitted'] for x in r])} |",
        f"| {c}s right, no shift | 86.8% | {_cell([x['omitted_right_before'] for x in r], True)} |",
        f"| bias shift of class {c} (ours: chosen on validation) | +3.5 | "
        f"{_cell([x['shift'] for x in r])} |",
        f"| {c}s right after the shift | 98.6% | "
        f"{_cell([x['omitted_right_after'] for x in r], True)} |",
        f"| test errors after the shift | 109 | {_cell([x['test_errors_after'] for x in r])} |",
        "",
    ]
    right = [100 * x["omitted_right_after"] for x in r]
    mean, std = _stats(right)
    clear = mean - std > 50 and len(r) > 1
    if len(r) < 2:
        lines.append(f"{mean:.0f}% of the test {c}s right after the shift, on one seed.")
        return "\n".join(lines)
    lines.append(
        f"{'Reproduced' if clear else 'Not clearly reproduced'}: the student never saw a {c} and "
        f"gets {mean:.0f}% (std {std:.0f}) of the test {c}s right after the bias shift "
        f"({'more than half, outside one standard deviation' if clear else 'not clearly most'})."
    )
    return "\n".join(lines)


def small_table(results: list[dict]) -> str:
    r = [x["small"] for x in results]
    pct = f"{100 * r[0]['fraction']:.0f}%"
    lines = [
        f"| training rows | paper (speech, frame accuracy, Table 5) | ours (test accuracy, "
        f"{r[0]['rows']} rows = {pct}) |",
        "|---|---|---|",
        f"| all, hard labels | 58.9% | {_cell([x['full_hard_accuracy'] for x in r], True)} |",
        f"| {pct}, hard labels (early stopping) | 44.5% (3%) | "
        f"{_cell([x['hard_accuracy'] for x in r], True)} |",
        f"| {pct}, soft targets (early stopping) | 57.0% (3%) | "
        f"{_cell([x['soft_accuracy'] for x in r], True)} |",
        "",
        paired_verdict(
            [100 * (x["soft_accuracy"] - x["hard_accuracy"]) for x in r],
            "soft targets raised the accuracy on the small transfer set",
            " points",
        ),
    ]
    return "\n".join(lines)


TABLES = {"ensemble": ensemble_table, "omit": omit_table, "small": small_table}
