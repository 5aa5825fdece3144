"""Faults found by replaying other libraries' bug reports, each tested as a kind on every backend
present here (cpu, the reference, Triton, the CUDA kernel on a GPU or on the host emulator)."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels as kd
from kdkernels import _C
from kdkernels.testing import backends_here, device_of, loss_on, rel_error

BACKENDS = backends_here()
KERNELS = [b for b in BACKENDS if b != "torch"]


def loss_and_grad(backend, student, teachers, labels=None, **options):
    """Loss and student gradient of `backend` (inputs moved to its device), back on the CPU."""
    device = device_of(backend)
    s = student.detach().to(device).requires_grad_(True)
    ts = [t.to(device) for t in teachers] if isinstance(teachers, list) else teachers.to(device)
    y = None if labels is None else labels.to(device)
    out = loss_on(backend, s, ts, y, **options)
    out.sum().backward()
    return out.detach().cpu(), s.grad.cpu()


def reference_loss_and_grad(student, teachers, labels=None, **options):
    s = student.detach().double().requires_grad_(True)
    if not isinstance(teachers, list):
        teachers = [teachers] if teachers.dim() == student.dim() else list(teachers.unbind(0))
    ts = [t.double() for t in teachers]
    out = kd.kd_loss_reference(s, ts, labels, **options)
    out.sum().backward()
    return out.detach(), s.grad


# Fault 1: 64-bit offsets. Teachers 2^30 elements apart in one untouched 8 GiB storage, and a
# teacher whose rows are 2^31 elements apart: only the rows read are ever paged in.
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["members-2^30-apart", "rows-2^31-apart"])
def test_offsets_beyond_2_to_the_31_elements(backend, layout):
    if device_of(backend) != "cpu":
        pytest.skip("the untouched storage trick is for host memory")
    n, c = 2, 64
    storage = torch.empty(2**32 + 2 * c, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    if layout == "members-2^30-apart":
        teachers = [storage[k * 2**30 : k * 2**30 + n * c].view(n, c) for k in range(3)]
    else:
        teachers = [storage.as_strided((n, c), (2**31, 1), 2**31 - c)]
    for t in teachers:
        t.copy_(torch.randn(n, c, generator=gen) * 3)
    student = torch.randn(n, c, generator=gen)
    labels = torch.tensor([3, 7])
    out, grad = loss_and_grad(backend, student, teachers, labels, ensemble="arithmetic")
    dense = [t.clone() for t in teachers]
    ref, ref_grad = reference_loss_and_grad(student, dense, labels, ensemble="arithmetic")
    assert rel_error(out, ref) < 1e-5 and rel_error(grad, ref_grad) < 1e-5


# Fault 3: every logit enters relative to its row, so a constant added to a row changes nothing
# beyond float32 rounding (the error stays that of offset 0).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ensemble", ["geometric", "arithmetic"])
@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_shift_invariance(backend, ensemble, offset):
    gen = torch.Generator().manual_seed(1)
    teachers = torch.randn(2, 4, 512, generator=gen) * 3
    student = teachers[0] + 0.3 * torch.randn(4, 512, generator=gen)
    labels = torch.tensor([1, 100, -100, 511])
    s, t = student + offset, teachers + offset  # rounded to float32: the reference sees the same
    options = dict(temperature=3.0, ensemble=ensemble)
    out, grad = loss_and_grad(backend, s, t, labels, **options)
    ref, ref_grad = reference_loss_and_grad(s, t, labels, **options)
    assert rel_error(out, ref) < 1e-5
    assert rel_error(grad, ref_grad) < 1e-5


# Fault 4 (clusters chosen from the loaded binary's architecture) is a host-side decision:
# tests/test_cuda_emulated.py::test_clusters_only_with_cluster_code.


class _HostTraffic(TorchDispatchMode):
    """Records the ops that synchronise with the host or copy host data to a device, and every
    tensor an op creates (to catch a stacked copy of the teachers)."""

    SYNCS = frozenset(
        {
            "_local_scalar_dense",
            "item",
            "nonzero",
            "is_nonzero",
            "lift_fresh",
            "lift_fresh_copy",
        }
    )

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCS:
            self.syncs.append(name)
        if name in ("_to_copy", "copy_") and isinstance(args[0], torch.Tensor):
            dst = (kwargs or {}).get("device") or (args[1].device if name == "copy_" else None)
            if dst is not None and torch.device(dst) != args[0].device:
                self.syncs.append(f"{name} {args[0].device} -> {dst}")
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


GPU_HOST_PATHS = [b for b in BACKENDS if b == "triton" or b == "cuda"]


@pytest.mark.parametrize("backend", GPU_HOST_PATHS)
@pytest.mark.parametrize("labels", [None, "mixed"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_host_code_never_syncs_copies_or_stacks(backend, labels, reduction):
    """Faults 5 and 6: the host side of a GPU backend's forward and backward makes no host
    synchronisation and no host-to-device copy, and reads a list of teachers in place."""
    from kdkernels._backends import select
    from kdkernels._validate import Options, validate

    device = device_of(backend)
    n, c, m = 6, 40, 4
    student = torch.randn(n, c, device=device, requires_grad=True)
    teachers = [torch.randn(n, c, device=device) for _ in range(m)]
    y = None if labels is None else torch.tensor([0, -100, 5, -1, 39, 2], device=device)
    options = Options(reduction=reduction, unlabeled_index=-1, ensemble="arithmetic")
    problem = validate(student, teachers, y, None, options)  # host-side checks of CPU labels
    chosen = select(backend, problem)
    assert chosen.name == backend
    with _HostTraffic() as traffic:
        chosen.loss(problem).sum().backward()
    assert traffic.syncs == []
    assert traffic.largest <= n * c  # the gradient; never an [M, N, C] stack


def test_auto_refuses_more_teachers_than_the_kernels_take():
    """Fault 8: 65 teachers are refused with the reason, not served by a silent fallback."""
    student, many = torch.randn(2, 8), torch.randn(65, 2, 8)
    with pytest.raises(ValueError, match=r"at most 64 teachers.*backend='torch'"):
        kd.distillation_loss(student, many)
    ref = kd.distillation_loss(student, many, backend="torch")
    assert torch.isfinite(ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_rows_contribute_exactly_nothing(backend):
    """Fault 8: ignored rows holding values whose math is NaN or infinite (an all -inf teacher
    row, infinite student logits) leave the loss and every gradient entry untouched."""
    out, grad = loss_and_grad(
        backend, torch.zeros(1, 1), torch.tensor([[float("-inf")]]), torch.tensor([-100])
    )
    assert out.item() == 0.0 and torch.equal(grad, torch.zeros(1, 1))

    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    student[1] = float("inf")
    teacher[1] = float("-inf")
    student[3, 2] = float("-inf")
    teacher[3] = float("-inf")
    labels = torch.tensor([2, -100, 4, -100, 6])
    for reduction in ("mean", "sum", "none"):
        out, grad = loss_and_grad(backend, student, teacher, labels, reduction=reduction)
        keep = torch.tensor([0, 2, 4])
        ref, ref_grad = reference_loss_and_grad(
            student[keep], teacher[keep], labels[keep], reduction=reduction
        )
        assert rel_error(out[keep] if reduction == "none" else out, ref) < 1e-5
        assert torch.equal(grad[[1, 3]], torch.zeros(2, 7))
        assert rel_error(grad[keep], ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_teacher_dtypes_are_read_at_their_own_precision(backend):
    """Fault 9: never rounded to the first teacher's dtype; the order of the list is immaterial."""
    cases = [
        [torch.zeros(1, 2, dtype=torch.bfloat16), torch.tensor([[1.001, 0.0]])],
        [torch.zeros(1, 2, dtype=torch.float16), torch.tensor([[7e4, 0.0]])],
        [torch.zeros(1, 2, dtype=torch.float16), torch.tensor([[0.3, 0.0]], dtype=torch.bfloat16)],
    ]
    for teachers in cases:
        ref, _ = reference_loss_and_grad(torch.zeros(1, 2), teachers)
        for order in (teachers, teachers[::-1]):
            out, _ = loss_and_grad(backend, torch.zeros(1, 2), list(order))
            assert torch.isfinite(out) and rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_range(backend):
    """Fault 10: temperatures float32 cannot carry are refused; the ends of the range work."""
    low, high = kd.TEMPERATURE_RANGE
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    for bad in (1e-40, low / 2, high * 2):
        with pytest.raises(ValueError, match=r"temperature must be in \[0.0001, 10000\]"):
            loss_on(backend, s, t, temperature=bad)
    for temperature in (low, high):
        out, grad = loss_and_grad(backend, s, t, torch.tensor([0, 1, 2]), temperature=temperature)
        assert torch.isfinite(out) and torch.isfinite(grad).all()


def test_temperature_range_is_the_kernels():
    from kernel_args import raw_kernel_args

    low, high = kd.TEMPERATURE_RANGE
    for t, ok in ((low, True), (high, True), (low * 0.99, False), (high * 1.01, False)):
        _keep, args = raw_kernel_args(2, 5, temperature=t)
        if ok:
            _C.make_args(**args)
        else:
            with pytest.raises(ValueError, match="temperature must be in"):
                _C.make_args(**args)


@pytest.mark.parametrize("threads", [1, 2])
def test_sum_rows_is_the_float64_sum_of_the_rows_in_order(threads):
    """sum_rows writes one value: the row losses added in float64 in row order and rounded once,
    the same whatever the thread count (the eager path's "mean"/"sum" on the CPU)."""
    from kernel_args import raw_kernel_args

    (_s, _t, rows), args = raw_kernel_args(3000, 7, num_threads=threads)
    _C.forward_cpu(_C.make_args(**args))
    total = torch.full((), float("nan"))
    _C.forward_cpu(_C.make_args(**{**args, "row_loss": total.data_ptr(), "sum_rows": True}))
    in_order = 0.0
    for v in rows.tolist():
        in_order += v
    assert total.item() == torch.tensor(in_order, dtype=torch.float32).item()


def near_convergence(seed, n, c, m, spread=5.0, noise=1e-3):
    gen = torch.Generator().manual_seed(seed)
    teachers = torch.randn(m, n, c, generator=gen) * spread
    student = teachers.mean(0) + noise * torch.randn(n, c, generator=gen)
    return student, teachers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ensemble", ["geometric", "arithmetic"])
@pytest.mark.parametrize("m", [1, 3])
def test_soft_term_near_convergence_is_never_negative_and_accurate(backend, ensemble, m):
    """Fault 11: the soft term of every row is >= 0 and agrees with float64 on the same float32
    inputs to 1e-4 relative or 1e-9 absolute, for T in [0.5, 100]."""
    options = dict(soft_weight=1.0, hard_weight=0.0, scale_soft_by_t2=False, reduction="none")
    inputs = [
        (torch.tensor([[-1.9619348, 0.7601088]]), torch.tensor([[[-1.9607511, 0.7595745]]])),
        near_convergence(3, 64, 10, m),
        near_convergence(4, 16, 1000, m, noise=1e-2),
        near_convergence(5, 16, 1000, m, spread=1.0, noise=0.3),  # far from convergence
    ]
    device = device_of(backend)
    for student, teachers in inputs:
        teachers = teachers[:m] if teachers.shape[0] >= m else teachers.expand(m, -1, -1)
        for temperature in (0.5, 1.0, 2.0, 4.0, 20.0, 100.0):
            kwargs = dict(options, temperature=temperature, ensemble=ensemble)
            with torch.no_grad():
                out = loss_on(backend, student.to(device), teachers.to(device), **kwargs).cpu()
            ref = kd.kd_loss_reference(student.double(), teachers.double(), **kwargs)
            assert (out >= 0).all(), f"T={temperature}: negative soft term {out.min().item()}"
            err = (out.double() - ref).abs()
            assert (err <= torch.clamp(1e-4 * ref, min=1e-9)).all(), (
                f"T={temperature}: worst error {err.max().item():.3g} "
                f"at reference {ref[err.argmax()].item():.3g}"
            )


COMPILE_FIRST = """
import torch, kdkernels as kd
s = torch.randn(8, 16, requires_grad=True)
t = [torch.randn(8, 16), torch.randn(8, 16)]
y = torch.randint(0, 16, (8,))
BACKEND = {backend!r}
step = lambda s, t, y: kd.distillation_loss(s, t, y, backend=BACKEND, ensemble="arithmetic")
compiled = torch.compile(step, fullgraph=True, backend={compiler!r})
loss = compiled(s, t, y)
loss.backward()
grad, s.grad = s.grad.clone(), None
step(s, t, y).backward()
torch.testing.assert_close(grad, s.grad)
print("ok")
"""


@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "cuda-emulated"])
def test_compile_as_the_first_call_of_a_fresh_process(backend, tmp_path):
    """Fault 7: every op, fake and autograd is registered at import, so torch.compile with
    fullgraph=True works as the very first call (Dynamo refuses to trace a registration)."""
    if device_of(backend) != "cpu":
        pytest.skip("this fresh process runs on CPU tensors")
    # AOT autograd traces the op's implementation on fake tensors, which Triton's interpreter
    # cannot run; Dynamo alone ("eager") still traces the call and must find it registered.
    compiler = "eager" if backend == "triton" else "aot_eager"
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_FIRST.format(backend=backend, compiler=compiler)],
        env=os.environ.copy(),
        cwd=tmp_path,  # import the installed package, not the source tree
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
