"""Every backend against the float64 reference on the docs/DESIGN.md section 5 grid."""

import pytest
import torch

import kdkernels as kd
from kdkernels.testing import (
    assert_matches_reference,
    backends_here,
    device_of,
    loss_on,
    rel_error,
    run_against_reference,
    sample_inputs,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["cpu", "torch"]  # the backend-specific tests below
# Every backend present on the same data (one seed): the small grid on all of them, the full
# grid where a backend runs at full speed (not Triton's interpreter).
SMALL = list(sample_inputs(seed=1, small=True))
FULL = list(sample_inputs(seed=1))
EVERY = backends_here()
FAST = [b for b in EVERY if not (b == "triton" and device_of(b) == "cpu")]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", EVERY)
def test_every_backend_matches_reference_on_the_small_grid(backend, dtype, case):
    assert_matches_reference(backend, case, dtype)


@pytest.mark.parametrize("case", FULL, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_every_backend_matches_reference_on_the_full_grid(backend, dtype, case):
    assert_matches_reference(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_give_float64_loss(backend):
    case = next(c for c in FULL if c.name == "opt-arithmetic-kl-mean-t21-mixed-M2")
    out, ref, grad, ref_grad = run_against_reference(backend, case, torch.float64)
    assert out.dtype == torch.float64
    assert rel_error(out, ref) < 1e-12 and rel_error(grad, ref_grad) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_gradient_is_rounded_to_nearest(dtype):
    """The kernel rounds its float32 gradient to the student's dtype to nearest: it equals the
    rounded float64 gradient almost everywhere (truncation would miss about half)."""
    case = next(c for c in FULL if c.name == "shape-37x1000")
    student, teachers, labels = case.inputs(dtype)
    student.requires_grad_(True)
    kd.distillation_loss(student, teachers, labels, backend="cpu", reduction="sum").backward()
    ref_student = student.detach().double().requires_grad_(True)
    kd.kd_loss_reference(ref_student, teachers.double(), labels, reduction="sum").backward()
    same = (student.grad == ref_student.grad.to(dtype)).double().mean().item()
    assert same > 0.97


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_student_and_teacher_dtypes(backend):
    case = next(c for c in FULL if c.name == "opt-geometric-kl-mean-t21-plain-M2")
    student, teachers, labels = case.inputs(torch.bfloat16)
    t16, t32 = teachers[0].half(), teachers[1].float()
    student.requires_grad_(True)
    out = kd.distillation_loss(student, [t16, t32], labels, backend=backend, **case.kwargs)
    ref = case.reference(student.detach(), [t16, t32], labels)
    assert rel_error(out, ref) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_infinite_student_logit_gives_inf(backend):
    s = torch.randn(4, 10)
    s[1, 3] = float("-inf")  # the teacher gives class 3 positive probability
    loss = kd.distillation_loss(s, torch.randn(4, 10), reduction="none", backend=backend)
    assert loss[1].item() == float("inf")
    assert torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates(backend, where):
    s, t = torch.randn(4, 10), torch.randn(2, 4, 10)
    (s if where == "student" else t[1])[2, 5] = float("nan")
    loss = kd.distillation_loss(s, t, reduction="none", backend=backend)
    assert loss[2].isnan() and not loss[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_without_grad_is_forward_only(backend):
    case = FULL[4]
    student, teachers, labels = case.inputs(torch.float32)
    out = kd.distillation_loss(student, teachers, labels, backend=backend)
    assert not out.requires_grad
    assert rel_error(out, case.reference(student, teachers, labels)) < 1e-5


@pytest.mark.parametrize("backend", EVERY)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_grad_mode_is_forward_only(backend, reduction):
    """Under no_grad the eager path calls the kernel without an autograd node: the loss of the
    same kernel with its gradient."""
    case = SMALL[4]
    student, teachers, labels = case.inputs(torch.float32, device_of(backend))
    student.requires_grad_(True)
    with torch.no_grad():
        out = loss_on(backend, student, teachers, labels, reduction=reduction)
    assert not out.requires_grad
    expected = loss_on(backend, student, teachers, labels, reduction=reduction)
    assert expected.requires_grad and out.shape == expected.shape
    torch.testing.assert_close(out, expected.detach(), rtol=1e-6, atol=0)


def test_forward_mode_ad_says_it_is_not_supported():
    """A dual student (forward-mode AD) gets an error, never a loss without its tangent."""
    import torch.autograd.forward_ad as fwAD

    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    with fwAD.dual_level():
        dual = fwAD.make_dual(student, torch.randn(4, 10))
        with pytest.raises(NotImplementedError, match="jvp"):
            kd.distillation_loss(dual, teacher, backend="cpu")


def test_teacher_that_requires_grad_warns_and_gets_none():
    import kdkernels._validate as v

    v._warned_teacher_grad = False
    student = torch.randn(8, 16, requires_grad=True)
    teacher = torch.randn(8, 16, requires_grad=True)
    with pytest.warns(UserWarning, match="teacher_logits requires grad"):
        kd.distillation_loss(student, teacher, backend="cpu").backward()
    assert teacher.grad is None and student.grad is not None


def test_second_backward_after_an_in_place_scaling_says_what_to_do():
    """The saved gradient is scaled in place; a second backward must fail loudly, not be wrong,
    with an error that names kdkernels and the fix."""
    student = torch.randn(8, 16, requires_grad=True)
    loss = kd.distillation_loss(student, torch.randn(8, 16), backend="cpu")
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"kdkernels: .*allow_repeated_backward\(\)"):
        loss.backward()


@pytest.mark.parametrize("second_scale", [1.0, 2.0])
def test_second_backward_after_an_unscaled_one_says_what_to_do(second_scale):
    """loss.backward() on a CPU mean hands out the saved gradient itself (it becomes the leaf's
    .grad): a second backward through the graph must not scale it in place (that gave 4x for
    loss.backward(); (2 * loss).backward()), so it raises too."""
    student = torch.randn(8, 16, requires_grad=True)
    loss = kd.distillation_loss(student, torch.randn(8, 16), backend="cpu")
    loss.backward(retain_graph=True)
    once = student.grad.clone()
    with pytest.raises(RuntimeError, match=r"kdkernels: .*allow_repeated_backward\(\)"):
        (second_scale * loss).backward()
    torch.testing.assert_close(student.grad, once)


def test_allow_repeated_backward_keeps_the_saved_gradient():
    student = torch.randn(8, 16, requires_grad=True)
    loss = kd.distillation_loss(student, torch.randn(8, 16), backend="cpu")
    with kd.allow_repeated_backward():
        (g1,) = torch.autograd.grad(loss, student, retain_graph=True)
        (g2,) = torch.autograd.grad(loss * 3, student)
    torch.testing.assert_close(g2, 3 * g1)


def test_module_matches_function():
    student, teacher = torch.randn(6, 12), torch.randn(6, 12)
    y = torch.randint(0, 12, (6,))
    criterion = kd.DistillationLoss(temperature=2.0, hard_weight=0.5, backend="cpu")
    assert "temperature=2.0" in repr(criterion)
    expect = kd.distillation_loss(student, teacher, y, temperature=2.0, hard_weight=0.5)
    assert torch.equal(criterion(student, teacher, y), expect)


def test_auto_picks_cpu_for_cpu_tensors():
    student = torch.randn(2, 8)
    assert kd.backends()["cpu"].available
    out_auto = kd.distillation_loss(student, torch.randn(2, 8))
    out_cpu = kd.distillation_loss(student, torch.randn(2, 8).copy_(student), backend="cpu")
    assert out_auto.shape == out_cpu.shape == ()
    # Even where Triton serves CPU tensors (its interpreter, as in these tests), auto takes cpu.
    from kdkernels._backends import select
    from kdkernels._validate import Options, validate

    problem = validate(student, torch.randn(2, 8), None, None, Options())
    assert select("auto", problem).name == "cpu"
    # 65 teachers exceed the kernels' pointer array: an error that says so (tests/test_faults.py).
    with pytest.raises(ValueError, match="at most 64 teachers"):
        kd.distillation_loss(student, torch.randn(65, 2, 8), backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels_are_read_correctly(backend):
    s, t = torch.randn(5, 12), torch.randn(5, 12)
    wide = torch.randint(0, 12, (10,))
    out = kd.distillation_loss(s, t, wide[::2], backend=backend, reduction="none")
    ref = kd.kd_loss_reference(s.double(), [t.double()], wide[::2].clone(), reduction="none")
    assert rel_error(out, ref) < 1e-5
