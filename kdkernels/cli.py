"""The `kdkernels` command: `info` (version, build, backends), `train` (the paper's three
effects, end to end through kdkernels) and `bench` (every provider against eager PyTorch and
torch.compile)."""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import fields

import torch

import kdkernels

from ._backends import NAMES
from ._extension import load_extension
from .bench import GRIDS
from .train import Config as TrainConfig
from .train.experiments import EXPERIMENTS


def info() -> int:
    print(f"kdkernels {kdkernels.__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__} (threads: {torch.get_num_threads()})")
    ext, why = load_extension()
    if ext is None:
        print(f"extension missing: {why}")
    else:
        build = ext.build_info()
        print(f"extension {build['compiler']}; flags: {build['cxx_flags']}")
        print(f"          CPU kernels: {build['cpu_isas_built']} (running: {build['cpu_isa']})")
        print(f"          OpenMP: {'yes' if build['openmp'] else 'no'}")
        if build["cuda"]:
            print(
                f"          CUDA {build['cuda_version']}, "
                f"architectures {build['cuda_architectures']}"
            )
        else:
            print("          CUDA: not compiled")
    print("backends:")
    statuses = kdkernels.backends()
    width = max(map(len, statuses))
    for name, status in statuses.items():
        mark = "yes" if status.available else "no "
        print(f"  {name:<{width}} {mark}  {status.reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build configuration and available backends")
    b = sub.add_parser("bench", help="time every provider against eager and torch.compile")
    b.add_argument(
        "--grid",
        default="targets",
        choices=[*sorted(GRIDS), "linear"],
        help="which cases ('linear': linear_distillation_loss from hidden states)",
    )
    b.add_argument("--quick", action="store_true", help="the small grid (under a minute)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--memory", action="store_true", help="peak memory, one process per provider")
    b.add_argument("--mode", default="fwd+bwd", choices=["fwd+bwd", "fwd", "both"])
    b.add_argument(
        "--out", default="results", help="folder for results.json, results.csv and results.png"
    )
    t = sub.add_parser(
        "train",
        help="reproduce the paper's three effects (bundled digits; --data-dir for IDX files)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        if f.name == "progress":
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        t.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=f.default,
            choices=_TRAIN_CHOICES.get(f.name),
            help=_TRAIN_HELP.get(f.name, f.name.replace("_", " ")),
        )
    t.add_argument("--quick", action="store_true", help="a tiny configuration (seconds)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train(args)
    if args.command == "info":
        return info()
    return bench(args)  # the only other command (argparse requires one)


_TRAIN_CHOICES = {
    "experiment": [*EXPERIMENTS, "all"],
    "ensemble": ["geometric", "arithmetic"],
    "backend": list(NAMES),
}
_TRAIN_HELP = {
    "experiment": "which of the paper's effects to run",
    "seeds": "independent repetitions (tables give mean and std over them)",
    "teachers": "ensemble size M",
    "jitter": "teachers' input jitter in pixels (default: 2 on 28x28 images, 0 on 8x8)",
    "small_fraction": "fraction of the training rows in experiment 'small' (default: 0.05 on "
    "the digits, 0.03 on 28x28 images)",
    "small_epochs": "epochs in experiment 'small' (default: as many steps as student-epochs on "
    "all rows)",
    "data_dir": "folder with MNIST-format IDX files, raw or .gz (never downloaded)",
    "out": "folder for results.json and results.png",
}


def train(args: argparse.Namespace) -> int:
    from .train import main as train_main

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "progress"}
    cfg = TrainConfig(**values, progress=not args.no_progress)
    if args.quick:
        cfg.seeds, cfg.teachers, cfg.teacher_hidden, cfg.student_hidden = 1, 2, 64, 64
        cfg.teacher_epochs, cfg.student_epochs, cfg.small_epochs = 3, 4, 8
    train_main(cfg)
    return 0


def bench(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict, replace
    from pathlib import Path

    from .bench import format_table, plot, run, write_csv

    if args.grid == "linear":
        return bench_linear(args)
    cases = GRIDS["quick" if args.quick else args.grid]
    if args.mode != "fwd+bwd":
        forward = [replace(c, backward=False) for c in cases]
        cases = (
            forward
            if args.mode == "fwd"
            else [x for p in zip(cases, forward, strict=True) for x in p]
        )
    rows = run(cases, args.device, args.repeats, args.memory)
    print(
        f"kdkernels {kdkernels.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(format_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        write_csv(rows, out / "results.csv")
        plot(rows, cases, out / "results.png")
        print(f"wrote {out / 'results.json'}, results.csv and results.png")
    return 0


def bench_linear(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from .bench import linear

    cases = linear.GRIDS[args.device][: 1 if args.quick else None]
    rows = linear.run(cases, args.device, args.repeats, args.memory)
    print(f"kdkernels {kdkernels.__version__}, torch {torch.__version__}, {args.device}")
    print(linear.format_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-linear.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    linear.plot(rows, out / "results-linear.png")
    print(f"wrote {out / 'results-linear.json'} and results-linear.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
