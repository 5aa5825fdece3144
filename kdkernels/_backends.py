"""The backend registry: the one place that knows the backends. Each is one record (which devices
it serves, why it is missing here, checked once and cached, why it cannot serve a problem, and its
loss function); `select` picks the named one or, for "auto", the first present one that fits in
order of speed, and when nothing fits the error lists every backend's reason (as xformers does).

Adding a backend: its module, and one record in REGISTRY.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import _emulated, _triton
from ._extension import load_extension
from ._fused import device_type
from ._ops import _fused_kd_impl, fused_loss
from ._validate import Problem
from .reference import kd_loss_reference

MAX_TEACHERS = 64  # the C++ and CUDA kernels take teacher pointers in a fixed array (kd_args.h)


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # what it serves, or why it is unavailable here


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...] | None  # device types it serves, its own first (None: any)
    serves: str  # the same in words, for error messages
    missing: Callable[[], str | None]  # why it is not usable on this machine (None: usable)
    cannot_serve: Callable[[Problem], str | None]  # why not these inputs (None: it can)
    loss: Callable[[Problem], Tensor]  # the loss, reduced as the options say
    kernel: bool = True  # False for the pure-PyTorch reference
    auto: bool = True  # whether "auto" may choose it
    # The fused op's checked implementation, impl(logits, teachers, labels, num_items, weights,
    # *OpOptions) -> (row losses, gradient), which the hidden-state loss runs per chunk (None:
    # the reference)
    impl: Callable | None = None


def _reference_loss(problem: Problem) -> Tensor:
    o = problem.options
    loss = kd_loss_reference(
        problem.student,
        problem.teachers,
        problem.labels,
        teacher_weights=problem.weights,
        num_items_in_batch=problem.num_items,
        **o.as_dict(),
    )
    return loss.reshape(problem.lead_shape if o.reduction == "none" else ())


def _cpu_missing() -> str | None:
    return load_extension()[1] or None


def _cuda_missing() -> str | None:
    ext, why = load_extension()
    if ext is None:
        return why
    build = ext.build_info()
    if not build["cuda"]:
        return "not compiled: this build has no CUDA kernels (nvcc not found or KDKERNELS_CUDA=OFF)"
    compiled = f"compiled (CUDA {build['cuda_version']}, sm {build['cuda_architectures']})"
    if not torch.cuda.is_available():  # the common case: a machine without a GPU
        return f"{compiled}, but this machine has no GPU that torch can use"
    devices, why = ext.cuda_status()
    if devices == 0:
        return f"{compiled}, but no GPU is usable here: {why}"
    return None


def _too_many(limit: int) -> Callable[[Problem], str | None]:
    def check(problem: Problem) -> str | None:
        m = len(problem.teachers)
        return f"it takes at most {limit} teachers; got {m}" if m > limit else None

    return check


def _no_float64(problem: Problem) -> str | None:
    dtypes = {problem.student.dtype} | {t.dtype for t in problem.teachers}
    if torch.float64 in dtypes:
        return "float64 inputs are not supported (float32/float16/bfloat16)"
    return None


def _all(*checks: Callable[[Problem], str | None]) -> Callable[[Problem], str | None]:
    def check(problem: Problem) -> str | None:
        return next((why for c in checks if (why := c(problem)) is not None), None)

    return check


# In order of speed: "auto" takes the first present one that serves the inputs' device.
REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "cuda",
            ("cuda",),
            "CUDA tensors",
            _cuda_missing,
            _all(_no_float64, _too_many(MAX_TEACHERS)),
            fused_loss,
            impl=_fused_kd_impl,
        ),
        Backend(
            "triton",
            _triton.devices(),
            "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)",
            _triton.missing,
            _all(_no_float64, _too_many(_triton.MAX_TEACHERS)),
            _triton.triton_loss,
            impl=_triton._fused_kd_triton_impl,
        ),
        Backend(
            "cpu",
            ("cpu",),
            "CPU tensors",
            _cpu_missing,
            _too_many(MAX_TEACHERS),
            fused_loss,
            impl=_fused_kd_impl,
        ),
        Backend("torch", None, "any tensors", lambda: None, lambda _: None, _reference_loss, False),
        # The CUDA kernel's source on the host emulator (a test build), for tests only.
        Backend(
            "cuda-emulated",
            ("cpu",),
            "CPU tensors (the CUDA kernel on the host emulator)",
            _emulated.missing,
            _all(_no_float64, _too_many(MAX_TEACHERS)),
            _emulated.emulated_loss,
            auto=False,
            impl=_emulated._fused_kd_emulated_impl,
        ),
    )
}
NAMES = ("auto", *REGISTRY)


_MISSING: dict[str, str | None] = {}


# A constant to torch.compile: dynamo calls it while tracing and keeps the answer, instead of
# tracing into the extension's build_info (which it cannot: fullgraph=True failed on a GPU).
@torch.compiler.assume_constant_result
def missing(name: str) -> str | None:
    """Why backend `name` is not usable on this machine (None: usable). Checked once."""
    if name not in _MISSING:
        _MISSING[name] = REGISTRY[name].missing()
    return _MISSING[name]


def why_not(name: str, problem: Problem) -> str | None:
    """Why backend `name` cannot serve `problem` (None: it can)."""
    backend = REGISTRY[name]
    if (why := missing(name)) is not None:
        return why
    if backend.devices is not None and device_type(problem.student) not in backend.devices:
        return f"it serves {backend.serves}; the inputs are on {problem.student.device}"
    return backend.cannot_serve(problem)


def backends() -> dict[str, BackendStatus]:
    """Which backends this installation has, and for each missing one why."""
    return {
        name: BackendStatus(missing(name) is None, missing(name) or "available")
        for name in REGISTRY
    }


def select(name: str, problem: Problem) -> Backend:
    if name != "auto":
        reason = why_not(name, problem)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot serve these inputs: {reason}")
        return REGISTRY[name]
    # The reference serves "auto" only where no kernel for the device is present at all: a
    # kernel that is present but cannot serve these inputs (65 teachers, say) is an error that
    # says why, never a silent fallback to the reference's several [N, C] temporaries.
    device = device_type(problem.student)
    reasons = {}
    for backend in REGISTRY.values():
        # Only a backend's own device counts for "auto" (Triton on CPU is the test interpreter).
        if not backend.auto or (backend.devices is not None and backend.devices[0] != device):
            continue
        if not backend.kernel and any(missing(k) is None for k in reasons):
            break
        reason = why_not(backend.name, problem)
        if reason is None:
            return backend
        reasons[backend.name] = reason
    listed = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise ValueError(
        f"no kdkernels kernel can serve these inputs ({listed}); backend='torch' runs the "
        "pure-PyTorch reference (several [N, C] float32 temporaries)"
    )
