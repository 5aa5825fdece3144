"""The `kdkernels` command: `kdkernels info` (build and backends)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import kdkernels

from ._backends import load_extension
from .bench import GRIDS


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
    for name, status in kdkernels.backends().items():
        mark = "yes" if status.available else "no "
        print(f"  {name:<7} {mark}  {status.reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build configuration and available backends")
    b = sub.add_parser("bench", help="time every provider against eager and torch.compile")
    b.add_argument("--grid", default="targets", choices=sorted(GRIDS), help="which cases")
    b.add_argument("--quick", action="store_true", help="the small grid (under a minute)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--memory", action="store_true", help="peak memory, one process per provider")
    b.add_argument("--out", help="folder for results.json")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "bench":
        return bench(args)
    return 2


def bench(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from .bench import GRIDS, format_table, run

    cases = GRIDS["quick" if args.quick else args.grid]
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
        print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
