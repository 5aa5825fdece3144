"""Reference training runs: the three effects of Hinton, Vinyals & Dean (2015) end to end through
kdkernels, on scikit-learn's bundled 8x8 digits by default or on MNIST-format IDX files
(`--data-dir`: MNIST, Fashion-MNIST). See experiments.py for the three experiments and the
paper's figures.

The student's training step is the part to copy into your own loop (loop.py):

    criterion = kdkernels.DistillationLoss(temperature=T, soft_weight=0.9, hard_weight=0.1)
    loss = criterion(student(x), teacher_logits[:, idx], y)   # teacher logits [M, B, C]
    loss.backward()
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .data import Data, load_digits_split, load_idx_dir
from .experiments import EXPERIMENTS, TABLES, Settings, planned_cost, run_seed
from .report import plot


@dataclass
class Config:
    """The paper's MNIST set-up: teachers with two hidden layers of 1200 ReLUs, regularised by
    dropout and input jitter; a student with two hidden layers of 800 ReLUs and no
    regularisation; T = 20; the hard term weighted well below the soft one. None means the
    default of the data: on the bundled digits (1,000 training images) three teachers, 5% of
    the rows for the small-data experiment (50 images, 5 a class: the regime where hard labels
    over-fit within a few epochs); on 28x28 images jitter of 2 pixels and 3%, the paper's."""

    experiment: str = "all"  # one of EXPERIMENTS, or "all"
    seeds: int = 3
    teachers: int = 3
    teacher_hidden: int = 1200
    teacher_epochs: int = 20
    teacher_dropout: float = 0.3
    jitter: int | None = None  # pixels; None: 2 on 28x28 images, 0 on 8x8 ones
    student_hidden: int = 800
    student_epochs: int = 60
    temperature: float = 20.0
    soft_weight: float = 0.9
    hard_weight: float = 0.1
    ensemble: str = "geometric"
    backend: str = "auto"
    omitted_class: int = 3
    small_fraction: float | None = None  # None: 0.05 on the digits, 0.03 on 28x28 images
    small_epochs: int | None = None  # None: as many steps as student_epochs on every row
    data_dir: str | None = None
    out: str = "runs/train"
    progress: bool = True

    def settings(self, data: Data) -> Settings:
        big = data.side >= 28
        fraction = self.small_fraction or (0.03 if big else 0.05)
        values = {f.name: getattr(self, f.name) for f in fields(Settings)}
        values["jitter"] = self.jitter if self.jitter is not None else (2 if big else 0)
        values["small_fraction"] = fraction
        values["small_epochs"] = self.small_epochs or round(self.student_epochs / fraction)
        return Settings(**values)


class _Stages:
    """One progress bar per stage with the stage's name, under a bar of the whole run counted in
    multiply-adds, whose rate gives an estimate of the time left (stages differ 50-fold in the
    cost of an epoch)."""

    def __init__(self, total_cost: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._tqdm, self.enabled = tqdm, enabled
        self.total = tqdm(
            total=total_cost,
            desc="whole run (multiply-adds)",
            unit="MAC",
            unit_scale=True,
            disable=not enabled,
        )

    def __call__(self, name: str, epochs: int, cost: int):
        bar = self._tqdm(
            total=epochs, desc=name, unit="epoch", leave=False, position=1, disable=not self.enabled
        )

        def tick() -> None:
            bar.update(1)
            self.total.update(cost)
            if bar.n >= epochs:
                bar.close()

        return tick


def main(cfg: Config) -> dict:
    if cfg.experiment not in (*EXPERIMENTS, "all"):
        raise ValueError(
            f"experiment must be one of {[*EXPERIMENTS, 'all']}, got {cfg.experiment!r}"
        )
    experiments = EXPERIMENTS if cfg.experiment == "all" else (cfg.experiment,)
    start = time.perf_counter()
    data = load_idx_dir(cfg.data_dir) if cfg.data_dir else load_digits_split()
    s = cfg.settings(data)
    stages = _Stages(cfg.seeds * planned_cost(data, s, experiments), cfg.progress)
    results = [run_seed(data, s, seed, experiments, stages) for seed in range(cfg.seeds)]
    stages.total.close()
    seconds = time.perf_counter() - start
    tables = {name: TABLES[name](results) for name in experiments}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config": asdict(cfg),
        "settings": asdict(s),
        "data": {
            "source": data.source,
            "train": len(data.y_train),
            "validation": len(data.y_val),
            "test": len(data.y_test),
        },
        "seconds": seconds,
        "results": results,
        "tables": tables,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plot(results, experiments, out / "results.png")
    print(
        f"data: {data.source}; {s.teachers} teachers, T={s.temperature}, {s.ensemble} ensemble, "
        f"{cfg.seeds} seeds; {seconds:.0f} s"
    )
    for name, table in tables.items():
        print(f"\n## {name}\n{table}")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")
    return report


__all__ = ["Config", "main"]
