"""The benchmark's cases and providers: what is timed (shapes, dtypes, divergences) and who is
timed (eager PyTorch, torch.compile, each kdkernels backend present, Liger on a GPU)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import kdkernels

from .._backends import REGISTRY, missing
from ..reference import kd_loss_reference

TEMPERATURE, SOFT_WEIGHT, HARD_WEIGHT = 4.0, 0.9, 0.1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DIVERGENCES = {"kl": None, "reverse_kl": None, "jsd": 0.5}  # soft_loss: beta


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    m: int = 1
    dtype: str = "float32"
    backward: bool = True
    soft_loss: str = "kl"  # a key of DIVERGENCES
    as_list: bool = False  # the teachers as a list of M tensors rather than one tensor

    @property
    def name(self) -> str:
        mode = "fwd+bwd" if self.backward else "fwd"
        divergence = "" if self.soft_loss == "kl" else f" {self.soft_loss}"
        teachers = f"M={self.m} list" if self.as_list else f"M={self.m}"
        return f"N={self.n} C={self.c} {teachers} {self.dtype} {mode}{divergence}"

    def options(self) -> dict:
        """The loss options of the case, as distillation_loss takes them."""
        beta = DIVERGENCES[self.soft_loss]
        divergence = {} if beta is None else {"beta": beta}
        return dict(
            temperature=TEMPERATURE,
            soft_weight=SOFT_WEIGHT,
            hard_weight=HARD_WEIGHT,
            soft_loss=self.soft_loss,
            **divergence,
        )

    def minimal_bytes(self) -> int:
        """Read the student and the M teachers once; write the gradient once (if backward)."""
        size = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return self.n * self.c * size * (1 + self.m + (1 if self.backward else 0))

    def inputs(self, device: str = "cpu", seed: int = 0) -> tuple[Tensor, Teachers, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        dtype = DTYPES[self.dtype]
        student = (torch.randn(self.n, self.c, generator=gen) * 2).to(device, dtype)
        teachers = (torch.randn(self.m, self.n, self.c, generator=gen) * 2).to(device, dtype)
        labels = torch.randint(0, self.c, (self.n,), generator=gen).to(device)
        if self.as_list:
            return student, list(teachers.clone()), labels
        # One teacher: its [N, C] logits, as a user with one teacher passes them (a [1, N, C]
        # tensor costs a view per call, several microseconds of a small batch's call).
        return student, teachers[0].clone() if self.m == 1 else teachers, labels


# One teacher [N, C], M stacked [M, N, C], or M tensors [N, C] (the bench's students are [N, C])
Teachers = Tensor | list[Tensor]


def teacher_list(teachers: Teachers) -> list[Tensor]:
    """The teachers as a list of [N, C] tensors, whatever the form."""
    if isinstance(teachers, Tensor):
        return [teachers] if teachers.dim() == 2 else list(teachers)
    return list(teachers)


def mean_teacher(teachers: Teachers) -> Tensor:
    """The teachers' mean logits in float32, the way users write it for each form."""
    if isinstance(teachers, Tensor) and teachers.dim() == 2:
        return teachers.float()
    if len(teachers) == 1:
        return teachers[0].float()
    stacked = torch.stack(teachers) if isinstance(teachers, list) else teachers
    return stacked.float().mean(0)


# The grids. "targets" are the shapes of the CPU performance contract (docs/DESIGN.md section 4).
def _product(ns, cs, ms, dtypes) -> list[Case]:
    return [Case(n, c, m, d) for d in dtypes for m in ms for n in ns for c in cs]


GRIDS: dict[str, list[Case]] = {
    "quick": [Case(256, 10), Case(256, 1000, m=4), Case(64, 32000, dtype="bfloat16")],
    # Image classifiers' batches: small rows, where the fixed cost of a call decides (an
    # ensemble as a list, the way it comes from M separate models).
    "classification": [
        Case(n, c, m, as_list=m > 1) for m in (1, 5) for n in (64, 256) for c in (10, 100, 1000)
    ],
    "default": _product((256, 65536), (10, 100, 1000), (1, 4), ("float32", "bfloat16"))
    + _product((2048, 8192), (32000, 128256), (1, 4), ("float32", "bfloat16")),
    "targets": [
        Case(1, 10),  # the fixed cost of a call, and what each extra teacher adds to it
        Case(1, 10, m=5, as_list=True),
        Case(64, 10, m=5, as_list=True),
        Case(2048, 32000),
        Case(2048, 32000, m=4),
        Case(65536, 10),
        Case(2048, 32000, dtype="bfloat16"),
        Case(2048, 32000, m=4, dtype="bfloat16"),
        Case(65536, 10, dtype="bfloat16"),
    ],
    # The cost of each divergence against forward KL, long rows and classifier rows.
    "divergences": [
        Case(n, c, soft_loss=d) for n, c in ((2048, 32000), (256, 1000)) for d in DIVERGENCES
    ],
}


# Rough peak working set of each provider beyond its inputs, in [N, C] float32 buffers: --memory
# on the targets grid measured eager at 5-7 and compile at 1.5-2 after warm-up, but compiling
# itself peaks higher (an 8192 x 128256 bfloat16 case at an estimate of 3 was killed for memory).
_WORKING_SET = {"eager": 8.0, "compile": 6.0}


def estimated_bytes(case: Case, provider: str) -> int:
    """Bytes one call of `provider` needs at its peak: its inputs and its working set."""
    inputs = case.n * case.c * _element_size(case) * (1 + case.m)
    return int(inputs + case.n * case.c * 4 * _WORKING_SET.get(provider, 1.0))


def resident_bytes(case: Case) -> int:
    """Bytes a provider holds between its calls: its inputs and its last gradient."""
    return case.n * case.c * _element_size(case) * (2 + case.m)


def _element_size(case: Case) -> int:
    return torch.empty((), dtype=DTYPES[case.dtype]).element_size()


def _eager_divergence(log_q: Tensor, log_p: Tensor, soft_loss: str) -> Tensor:
    """Each divergence the way users write it: F.kl_div (whose kl_div(a, b) is KL(b || a)),
    and the generalised JSD as TRL's GKD trainer does."""

    def kl(log_target: Tensor, log_input: Tensor) -> Tensor:  # KL(target || input)
        return F.kl_div(log_input, log_target, log_target=True, reduction="batchmean")

    if soft_loss == "kl":
        return kl(log_p, log_q)
    if soft_loss == "reverse_kl":
        return kl(log_q, log_p)
    beta = DIVERGENCES[soft_loss]
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def eager_kd_loss(student: Tensor, teachers: Teachers, labels: Tensor, soft_loss: str = "kl"):
    """The distillation loss the way users write it in PyTorch (one teacher, or the geometric
    mean of an ensemble: the softmax of the mean logits)."""
    s = student.float()
    t = mean_teacher(teachers)
    log_q, log_p = F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1)
    soft = _eager_divergence(log_q, log_p, soft_loss)
    return SOFT_WEIGHT * TEMPERATURE**2 * soft + HARD_WEIGHT * F.cross_entropy(s, labels)


def _kdkernels_provider(backend: str, case: Case) -> Callable[[Tensor, Teachers, Tensor], Tensor]:
    def loss(student: Tensor, teachers: Teachers, labels: Tensor) -> Tensor:
        return kdkernels.distillation_loss(
            student, teachers, labels, backend=backend, **case.options()
        )

    return loss


_compiled: dict[str, Callable] = {}


def providers(
    device: str = "cpu", case: Case | None = None
) -> dict[str, Callable[[Tensor, Teachers, Tensor], Tensor]]:
    """Every provider that can run here on `device` for `case`'s loss options: eager, compile,
    each kdkernels backend, and Liger on a GPU (forward KL only)."""
    case = case or Case(1, 1)
    soft_loss = case.soft_loss
    if soft_loss not in _compiled:
        _compiled[soft_loss] = torch.compile(functools.partial(eager_kd_loss, soft_loss=soft_loss))
    found = {
        "eager": functools.partial(eager_kd_loss, soft_loss=soft_loss),
        "compile": _compiled[soft_loss],
    }
    # Each kernel on its own device (the first it serves: Triton on CPU is the test interpreter).
    for name, backend in REGISTRY.items():
        # auto=False marks test tools (the CUDA emulator): correct, but not worth timing.
        timed = backend.kernel and backend.auto and backend.devices[0] == device
        if timed and missing(name) is None:
            found[f"kdkernels-{name}"] = _kdkernels_provider(name, case)
    if device == "cuda" and soft_loss == "kl":
        liger = _liger_provider()
        if liger is not None:
            found["liger"] = liger
    return found


def _liger_provider() -> Callable[[Tensor, Teachers, Tensor], Tensor] | None:
    """Liger-Kernel's KL-divergence and cross-entropy losses composed into the same loss (its
    KL takes log-probabilities, so the softmaxes stay eager), when Liger is installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    kl, ce = LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerCrossEntropyLoss()

    def loss(student: Tensor, teachers: Teachers, labels: Tensor) -> Tensor:
        t = mean_teacher(teachers)
        soft = kl(
            F.log_softmax(student.float() / TEMPERATURE, -1),
            F.log_softmax(t.float() / TEMPERATURE, -1),
        )
        return SOFT_WEIGHT * TEMPERATURE**2 * soft + HARD_WEIGHT * ce(student, labels)

    return loss


def reference_loss(case: Case) -> float:
    student, teachers, labels = case.inputs("cpu")
    teachers = [t.double() for t in teacher_list(teachers)]
    return float(kd_loss_reference(student.double(), teachers, labels, **case.options()))
