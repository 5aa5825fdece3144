"""Sample inputs shared by the tests and benchmarks: one source of cases for correctness,
gradient, opcheck and compile checks on every backend and device.

A `Sample` holds float64 master tensors; `Sample.inputs(dtype, device)` gives the tensors a backend
sees, and the reference runs on those same values cast to float64, so the comparison measures
the kernel's arithmetic, not the rounding of its inputs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .loss import distillation_loss
from .reference import kd_loss_reference


@dataclass
class Sample:
    name: str
    student: Tensor  # float64 master, [..., C] (may be a strided view)
    teachers: Tensor | list[Tensor]  # float64 master: stacked [M, ..., C] or a list
    labels: Tensor | None = None
    kwargs: dict = field(default_factory=dict)

    def inputs(self, dtype: torch.dtype, device: str | torch.device = "cpu"):
        """(student, teachers, labels) in `dtype` on `device`, strides kept."""

        def cast(x: Tensor) -> Tensor:
            # Keep non-contiguous layouts: cast the storage-owning base, then take the same view.
            return (
                x.to(device=device, dtype=dtype, copy=True)
                if x.is_contiguous()
                else _restride(x, dtype, device)
            )

        teachers = (
            [cast(t) for t in self.teachers]
            if isinstance(self.teachers, list)
            else cast(self.teachers)
        )
        labels = None if self.labels is None else self.labels.to(device)
        return cast(self.student), teachers, labels

    def reference(self, student: Tensor, teachers, labels) -> Tensor:
        """The float64 reference on the given (possibly rounded) inputs."""
        ts = [t.double() for t in (teachers if isinstance(teachers, list) else teachers.unbind(0))]
        kw = {k: v for k, v in self.kwargs.items()}
        return kd_loss_reference(student.double(), ts, labels, **kw)


def _restride(x: Tensor, dtype: torch.dtype, device) -> Tensor:
    """Copy a strided view into a new buffer of `dtype` with the same shape and row strides."""
    c = x.shape[-1]
    base = torch.full((*x.shape[:-1], x.stride(-2)), float("nan"), dtype=dtype, device=device)
    base[..., :c] = x.to(device=device, dtype=dtype)
    return base[..., :c]


def _logits(gen: torch.Generator, *shape: int, scale: float = 3.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _labels(gen: torch.Generator, n: int, c: int, mode: str) -> Tensor | None:
    if mode == "none":
        return None
    y = torch.randint(0, c, (n,), generator=gen)
    if mode in ("ignore", "mixed"):
        y[torch.rand(n, generator=gen) < 0.3] = -100
    if mode in ("unlabeled", "mixed"):
        y[torch.rand(n, generator=gen) < 0.3] = -1
    if mode == "all_ignored":
        y[:] = -100
    if mode == "all_unlabeled":
        y[:] = -1
    return y


SHAPES = [
    (1, 1),
    (1, 2),
    (3, 10),
    (37, 10),
    (257, 2),
    (3, 1000),
    (37, 1000),
    (3, 4097),
    (3, 32000),
    (257, 1000),
]
OPTION_SHAPE = (37, 1000)


def sample_inputs(seed: int = 0, *, small: bool = False) -> Iterator[Sample]:
    """The docs/DESIGN.md section 5 grid: shapes, every option, edge values, strides, layouts.

    `small=True` keeps C <= 1000 and N <= 37 (for slow backends such as Triton's interpreter).
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for s in SHAPES if not small or (s[0] <= 37 and s[1] <= 1000)]
    n0, c0 = (13, 100) if small else OPTION_SHAPE

    # Shapes with default options, one teacher and labels.
    for n, c in shapes:
        yield Sample(
            f"shape-{n}x{c}", _logits(gen, n, c), _logits(gen, 1, n, c), _labels(gen, n, c, "plain")
        )

    # Every option on one shape: the product of the options that interact, and T^2 scaling
    # (a factor on one term) off for cross-entropy's sum and none, on elsewhere.
    for ens, soft, red, mode, m in itertools.product(
        ("geometric", "arithmetic"),
        ("kl", "cross_entropy"),
        ("mean", "sum", "none"),
        ("none", "plain", "mixed"),
        (1, 2, 5),
    ):
        t2 = not (soft == "cross_entropy" and red != "mean")
        kwargs = dict(
            ensemble=ens,
            soft_loss=soft,
            reduction=red,
            scale_soft_by_t2=t2,
            temperature=float(torch.empty(1).uniform_(0.5, 8.0, generator=gen)),
            soft_weight=0.7,
            hard_weight=0.3,
        )
        if mode == "mixed":
            kwargs["unlabeled_index"] = -1
        if m > 1:
            kwargs["teacher_weights"] = torch.rand(m, generator=gen).add(0.1).tolist()
        yield Sample(
            f"opt-{ens}-{soft}-{red}-t2{int(t2)}-{mode}-M{m}",
            _logits(gen, n0, c0),
            _logits(gen, m, n0, c0),
            _labels(gen, n0, c0, mode),
            kwargs,
        )

    # The divergences beyond the paper's KL, each with both ensembles and every reduction; jsd
    # at its endpoints (exactly KL and reverse KL) and inside.
    divergences = [("reverse_kl", None)] + [("jsd", b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
    for i, ((soft, beta), ens, red) in enumerate(
        itertools.product(divergences, ("geometric", "arithmetic"), ("mean", "sum", "none"))
    ):
        mode, m = ("none", "plain", "mixed")[i % 3], (1, 3)[i % 2]
        kwargs = dict(
            ensemble=ens,
            soft_loss=soft,
            reduction=red,
            temperature=float(torch.empty(1).uniform_(0.5, 8.0, generator=gen)),
        )
        if beta is not None:
            kwargs["beta"] = beta
        if mode == "mixed":
            kwargs["unlabeled_index"] = -1
        yield Sample(
            f"div-{soft}{'' if beta is None else beta}-{ens}-{red}-{mode}-M{m}",
            _logits(gen, n0, c0),
            _logits(gen, m, n0, c0),
            _labels(gen, n0, c0, mode),
            kwargs,
        )

    # num_items_in_batch: the mean's denominators given (an int, a pair, a tensor, zero).
    for name, items in [("int", 50), ("pair", (40, 25)), ("tensor", torch.tensor(7)), ("zero", 0)]:
        yield Sample(
            f"num-items-{name}",
            _logits(gen, n0, c0),
            _logits(gen, 2, n0, c0),
            _labels(gen, n0, c0, "mixed"),
            dict(unlabeled_index=-1, num_items_in_batch=items, soft_loss="jsd"),
        )

    n, c = n0, c0
    for mode in ("all_ignored", "all_unlabeled"):
        for red in ("mean", "sum", "none"):
            yield Sample(
                f"{mode}-{red}",
                _logits(gen, n, c),
                _logits(gen, 2, n, c),
                _labels(gen, n, c, mode),
                dict(unlabeled_index=-1, reduction=red),
            )
    yield Sample(
        "empty-batch", _logits(gen, 0, c), _logits(gen, 1, 0, c), torch.zeros(0, dtype=torch.long)
    )
    yield Sample(
        "leading-dims",
        _logits(gen, 2, 3, 5, c),
        _logits(gen, 2, 2, 3, 5, c),
        _labels(gen, 30, c, "mixed").reshape(2, 3, 5),
        dict(unlabeled_index=-1, reduction="none"),
    )
    yield Sample(
        "teacher-list",
        _logits(gen, n, c),
        list(_logits(gen, 3, n, c)),
        _labels(gen, n, c, "plain"),
        dict(teacher_weights=[0.5, 0.0, 2.0]),
    )
    yield Sample(
        "ignore-index-is-a-class",
        _logits(gen, n, c),
        _logits(gen, 1, n, c),
        _labels(gen, n, c, "plain"),
        dict(ignore_index=3),
    )

    # Extreme values: logits of +-1e4, -inf teacher entries (masked vocabulary), every
    # divergence. Reverse KL is +inf where only the teacher is masked (its gradient is not
    # finite): it is tested with the student masked where the teacher is, as documented.
    for ens, (soft, beta) in itertools.product(
        ("geometric", "arithmetic"), [("kl", None), ("reverse_kl", None), ("jsd", 0.3)]
    ):
        divergence = dict(soft_loss=soft) if beta is None else dict(soft_loss=soft, beta=beta)
        big = _logits(gen, n, c).sign() * 1e4
        yield Sample(
            f"extreme-1e4-{ens}-{soft}",
            big,
            _logits(gen, 2, n, c).sign() * 1e4,
            _labels(gen, n, c, "plain"),
            dict(ensemble=ens, **divergence),
        )
        masked = _logits(gen, 2, n, c)
        masked[..., c // 2 :] = float("-inf")
        student = _logits(gen, n, c)
        if soft == "reverse_kl":
            student[..., c // 2 :] = float("-inf")
        yield Sample(
            f"teacher-neg-inf-{ens}-{soft}",
            student,
            masked,
            _labels(gen, n, c // 2, "plain"),
            dict(ensemble=ens, **divergence),
        )

    # Non-unit row strides: views into wider buffers (a teacher with a padded vocabulary).
    wide_s = _logits(gen, n, c + 7)[:, :c]
    wide_t = _logits(gen, 2, n, c + 64)[..., :c]
    yield Sample(
        "row-strides", wide_s, wide_t, _labels(gen, n, c, "plain"), dict(ensemble="geometric")
    )


def rel_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| over the finite entries of ref (absolute where ref is all zero);
    non-finite entries must match exactly (inf where ref is inf, NaN where ref is NaN)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.equal(out.isnan(), ref.isnan()), "NaN positions differ from the reference"
    inf = ref.isinf()
    assert torch.equal(out.isinf(), inf) and torch.equal(out[inf], ref[inf]), "infinities differ"
    finite = ref.isfinite()
    err = (out[finite] - ref[finite]).norm().item()
    scale = ref[finite].norm().item()
    return err / scale if scale > 0 else err


def tolerance(dtype: torch.dtype) -> float:
    """docs/DESIGN.md section 5: 1e-5 for float32 (and float64), 1e-2 for float16/bfloat16."""
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5


def backends_here() -> list[str]:
    """Every backend this machine can run, as names for `loss_on`: the compiled CPU kernel, the
    reference, Triton (on a GPU, or under TRITON_INTERPRET=1 on CPU tensors), the CUDA kernel on
    a GPU, and the CUDA kernel's source on the host emulator (a test build)."""
    from ._backends import REGISTRY, missing

    return [name for name in REGISTRY if missing(name) is None]


def device_of(backend: str) -> str:
    """Where `backend`'s inputs live here."""
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return "cuda"
    return "cpu"


def loss_on(backend: str, *args, **kwargs) -> Tensor:
    """`distillation_loss` on a name from `backends_here()` (inputs already on its device)."""
    return distillation_loss(*args, backend=backend, **kwargs)


def run_against_reference(backend: str, case: Sample, dtype: torch.dtype, seed: int = 0):
    """(loss, reference loss, gradient, reference gradient) of `backend` (a name from
    `backends_here()`) on `case` in `dtype`, with a random grad_output (the loss used inside a
    larger expression); the reference runs in float64 on the same rounded inputs."""
    student, teachers, labels = case.inputs(dtype, device_of(backend))
    student.requires_grad_(True)
    out = loss_on(backend, student, teachers, labels, **case.kwargs)
    ref_student = student.detach().double().requires_grad_(True)
    ref = case.reference(ref_student, teachers, labels)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64).add(0.5).to(ref.device)
    (out.double() * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    return out, ref, student.grad, ref_student.grad


def assert_matches_reference(backend: str, case: Sample, dtype: torch.dtype) -> None:
    """docs/DESIGN.md section 5: loss and gradient within tolerance(dtype) of the reference."""
    out, ref, grad, ref_grad = run_against_reference(backend, case, dtype)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_error(out, ref) < tolerance(dtype)
    assert grad.dtype == dtype
    # A gradient stored in float16 can sit in its subnormal range (|g| < 6e-5, as with small
    # weights over many rows), where storing even the exact value loses more than 1e-2: there
    # the bound is twice the error of that rounding alone.
    floor = 2 * rel_error(ref_grad.to(dtype), ref_grad)
    assert rel_error(grad, ref_grad) < max(tolerance(dtype), floor)
