"""Backend selection, in one place. Each backend says why it cannot serve a problem (or None when
it can); `select` picks the named one or, for "auto", the first that fits in order of speed, and
when nothing fits the error lists every backend's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

from ._validate import Problem

MAX_TEACHERS = 64  # the kernels take teacher pointers in a fixed array (csrc/kd_args.h)


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # what it serves, or why it is unavailable here


def load_extension() -> tuple[ModuleType | None, str]:
    try:
        from . import _C
    except ImportError as exc:  # a source checkout that was never built, or a broken wheel
        return None, f"the compiled extension kdkernels._C is missing ({exc}); install the wheel"
    return _C, ""


def _cpu(problem: Problem | None) -> str | None:
    ext, why = load_extension()
    if ext is None:
        return why
    if problem is None:
        return None
    if problem.student.device.type != "cpu":
        return f"it serves CPU tensors; the inputs are on {problem.student.device}"
    if len(problem.teachers) > MAX_TEACHERS:
        return f"it takes at most {MAX_TEACHERS} teachers; got {len(problem.teachers)}"
    return None


def _cuda(problem: Problem | None) -> str | None:
    ext, why = load_extension()
    if ext is None:
        return why
    build = ext.build_info()
    if not build["cuda"]:
        return "not compiled: this build has no CUDA kernels (nvcc not found or KDKERNELS_CUDA=OFF)"
    devices, why = ext.cuda_status()
    if devices == 0 or not torch.cuda.is_available():
        return (
            f"compiled (CUDA {build['cuda_version']}, sm {build['cuda_architectures']}), "
            f"but no GPU is usable here: {why or 'torch sees no CUDA device'}"
        )
    if problem is None:
        return None
    if problem.student.device.type != "cuda":
        return f"it serves CUDA tensors; the inputs are on {problem.student.device}"
    dtypes = {problem.student.dtype} | {t.dtype for t in problem.teachers}
    if torch.float64 in dtypes:
        return "float64 inputs are not supported (float32/float16/bfloat16)"
    if len(problem.teachers) > MAX_TEACHERS:
        return f"it takes at most {MAX_TEACHERS} teachers; got {len(problem.teachers)}"
    return None


def _triton(problem: Problem | None) -> str | None:
    from ._triton import triton_unavailable

    return triton_unavailable(problem)


def _torch(problem: Problem | None) -> str | None:
    return None


_CHECKS: dict[str, Callable[[Problem | None], str | None]] = {
    "cuda": _cuda,
    "triton": _triton,
    "cpu": _cpu,
    "torch": _torch,
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def backends() -> dict[str, BackendStatus]:
    """Which backends this installation has, and for each missing one why."""
    status = {}
    for name, check in _CHECKS.items():
        reason = check(None)
        status[name] = BackendStatus(reason is None, reason or "available")
    return status


def select(name: str, problem: Problem) -> str:
    if name != "auto":
        reason = _CHECKS[name](problem)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot serve these inputs: {reason}")
        return name
    # The reference serves "auto" only where no kernel for the device is present at all: a
    # kernel that is present but cannot serve these inputs (65 teachers, say) is an error that
    # says why, never a silent fallback to the reference's several [N, C] temporaries.
    order = _AUTO_ORDER.get(problem.student.device.type, ("torch",))
    reasons = {}
    for candidate in order:
        if candidate == "torch" and any(_CHECKS[k](None) is None for k in reasons):
            break
        reason = _CHECKS[candidate](problem)
        if reason is None:
            return candidate
        reasons[candidate] = reason
    listed = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise ValueError(
        f"no kdkernels kernel can serve these inputs ({listed}); backend='torch' runs the "
        "pure-PyTorch reference (several [N, C] float32 temporaries)"
    )
