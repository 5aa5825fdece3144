"""The `kdkernels` command: `kdkernels info` (build and backends)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import kdkernels

from ._backends import load_extension


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
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
