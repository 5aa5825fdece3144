"""The CPU kernel's one-pass form of a long row with one teacher or a geometric ensemble
(C > 1024): no pass for the maxima, the references found on the way and moved up when a block of
the row exceeds them by 2^8, the sums rescaled and each stretch of the gradient scaled on its own
(csrc/kd_cpu_kernel.cpp, one_pass_exp). Rows built to move the references many times, late, from
a first vector of -inf, under a large common offset, and with the student near its teacher (the
accurate KL), against the float64 reference, with every temperature path (T a power of two or
not) and divergence."""

import pytest
import torch

import kdkernels as kd
from kdkernels.reference import kd_loss_reference
from kdkernels.testing import rel_error, tolerance

C = 2011  # > 1024 and not a whole number of vectors


NEAR = 5  # the row whose student is near its teacher


def rows(gen: torch.Generator, offsets=(-5e3, 1e4)) -> tuple[torch.Tensor, ...]:
    """(student, teacher, labels) in float64, one kind of row each; `offsets`: the student's and
    the teacher's common offset in row 4."""
    noise = lambda scale=3.0: torch.randn(C, generator=gen, dtype=torch.float64) * scale  # noqa: E731
    ramp = torch.linspace(-60, 60, C, dtype=torch.float64)
    s, t, y = [], [], []

    def add(student, teacher, label):
        s.append(student)
        t.append(teacher)
        y.append(label)

    add(ramp + noise(), ramp.flip(0) * 0.5 + noise(), 5)  # the student's max last, moved often
    add(ramp * 2 + noise(), ramp * 2 + noise(), C - 3)  # both moved often, label in the last
    spiked_s, spiked_t = noise(), noise()
    spiked_s[1700] += 40
    spiked_t[1990] += 45
    add(spiked_s, spiked_t, 1000)  # one late move each
    ruled_out_s, ruled_out_t = noise(), noise()
    ruled_out_t[:40] = ruled_out_s[:40] = float("-inf")  # first vectors: the reference far below
    add(ruled_out_s, ruled_out_t, 45)
    add(noise() + offsets[0], noise() + offsets[1], 77)  # common offsets, cancelled exactly
    near_t = noise()
    near_t[1500] += 30
    add(near_t + 1e-3 * noise(), near_t, C - 1)  # KL near 0 (the accurate pass), unlabeled
    add(noise(), noise(), 100)
    return torch.stack(s), torch.stack(t), torch.tensor(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("soft_loss", ["kl", "cross_entropy", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0, 3.3, 0.5])
def test_one_pass_rows_match_the_reference(dtype, soft_loss, temperature):
    # The reverse KL and JSD keep their digits under one offset of both rows only: under two, d is
    # read from t - s (soft_terms), which rounds at their size (float32 1e-4 of the gradient at
    # -5e3 and 1e4, whichever form the row takes).
    offsets = (-5e3, 1e4) if soft_loss in ("kl", "cross_entropy") else (1e4, 1e4)
    gen = torch.Generator().manual_seed(int(temperature * 10))
    student64, teacher64, labels = rows(gen, offsets)
    student, teacher = student64.to(dtype), teacher64.to(dtype)
    if dtype == torch.bfloat16:  # rounded: the offsets rebuilt exactly
        student[4], teacher[4] = student[6] + offsets[0], teacher[6] + offsets[1]
        student[5] = teacher[5] + 0.0625 * torch.sign(student64[5] - teacher64[5]).to(dtype)
    kwargs = dict(
        temperature=temperature, soft_loss=soft_loss, reduction="none", unlabeled_index=C - 1
    )
    ref_student = student.double().requires_grad_(True)
    ref = kd_loss_reference(ref_student, [teacher.double()], labels, **kwargs)
    grad_out = torch.rand(
        ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    (ref * grad_out).sum().backward()

    student.requires_grad_(True)
    out = kd.distillation_loss(student, teacher, labels, backend="cpu", **kwargs)
    (out.double() * grad_out).sum().backward()
    with torch.no_grad():  # the forward alone (no exponentials stored) agrees with it
        forward_only = kd.distillation_loss(student, teacher, labels, backend="cpu", **kwargs)
    torch.testing.assert_close(forward_only, out.detach(), rtol=0, atol=0)

    tol = tolerance(dtype)
    # Each row on its own (a norm over all would hide one). The losses within tol or, the KL near
    # 0, 1e-9 (docs/DESIGN.md section 5; the cross-entropy's closing formula subtracts terms of
    # size log C: its float32 error is absolute, 1e-7). The gradients within tol over the batch
    # and 4 tol of each row's norm, but the near row's, whose q - p cancels in float32 (as in
    # PyTorch's).
    atol = 1e-7 if soft_loss == "cross_entropy" else 1e-9
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=tol, atol=atol)
    assert rel_error(student.grad, ref_student.grad) < tol
    for row in range(len(labels)):
        grad, ref_grad = student.grad[row], ref_student.grad[row]
        floor = 2 * rel_error(ref_grad.to(dtype), ref_grad)  # storing it in dtype alone
        assert row == NEAR or rel_error(grad, ref_grad) < max(4 * tol, floor), row


@pytest.mark.parametrize(
    "student_dtype, teacher_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
    ],
)
def test_one_pass_other_dtypes_and_whole_blocks(student_dtype, teacher_dtype):
    """Half (the one-pass form) and mixed dtypes (pass 1), C a whole number of blocks (no
    partial vector), a first block and more of -inf (the far reference kept through a whole
    stretch), and NaN and +inf inside long rows."""
    c = 2048
    gen = torch.Generator().manual_seed(3)
    student64 = torch.randn(5, c, generator=gen, dtype=torch.float64) * 3
    teacher64 = torch.randn(5, c, generator=gen, dtype=torch.float64) * 3
    student64[1, :600] = teacher64[1, :600] = float("-inf")
    student64[2, 1500] += 25  # a late move
    student64[3, 1700] = float("nan")
    teacher64[4, 900] = float("inf")
    labels = torch.tensor([7, 1000, 1500, 3, 4])
    student, teacher = student64.to(student_dtype), teacher64.to(teacher_dtype)
    ref_student = student.double().requires_grad_(True)
    ref = kd_loss_reference(ref_student, [teacher.double()], labels, reduction="none")
    ref.sum().backward()
    student.requires_grad_(True)
    out = kd.distillation_loss(student, teacher, labels, reduction="none", backend="cpu")
    out.sum().backward()
    tol = max(tolerance(student_dtype), tolerance(teacher_dtype))
    assert out[3].isnan() and out[4].isnan()  # NaN and +inf logits: NaN, as the reference
    assert ref[3].isnan() and ref[4].isnan()
    assert rel_error(out[:3], ref[:3]) < tol
    for row in range(3):
        grad, ref_grad = student.grad[row], ref_student.grad[row]
        floor = 2 * rel_error(ref_grad.to(student_dtype), ref_grad)
        assert rel_error(grad, ref_grad) < max(4 * tol, floor), row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("soft_loss", ["kl", "cross_entropy", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [4.0, 3.3])
def test_one_pass_geometric_ensembles_match_the_reference(dtype, soft_loss, temperature):
    """A geometric ensemble of three members of unequal weights takes the one-pass form too, its
    members combined in registers: the same rows, each member the teacher moved by noise of its
    own (and, for the KL and the cross-entropy, by a common offset in row 4: the reverse KL and
    JSD of an ensemble lose digits under one in either form, from soft_terms' weighted sum of
    the members' references, rounded at its size: 3e-5 of the loss at 1e4)."""
    offsets = (-5e3, 1e4) if soft_loss in ("kl", "cross_entropy") else (0.0, 0.0)
    gen = torch.Generator().manual_seed(int(temperature * 10) + 1)
    student64, teacher64, labels = rows(gen, offsets)
    members64 = [
        teacher64 + torch.randn(teacher64.shape, generator=gen, dtype=torch.float64)
        for _ in range(3)
    ]
    student, members = student64.to(dtype), [m.to(dtype) for m in members64]
    weights = [0.5, 0.3, 0.2]
    kwargs = dict(
        temperature=temperature,
        soft_loss=soft_loss,
        reduction="none",
        unlabeled_index=C - 1,
        teacher_weights=weights,
    )
    ref_student = student.double().requires_grad_(True)
    ref = kd_loss_reference(ref_student, [m.double() for m in members], labels, **kwargs)
    ref.sum().backward()
    student.requires_grad_(True)
    out = kd.distillation_loss(student, members, labels, backend="cpu", **kwargs)
    out.sum().backward()
    tol = tolerance(dtype)
    atol = 1e-7 if soft_loss == "cross_entropy" else 1e-9
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=tol, atol=atol)
    for row in range(len(labels)):
        grad, ref_grad = student.grad[row], ref_student.grad[row]
        floor = 2 * rel_error(ref_grad.to(dtype), ref_grad)
        assert rel_error(grad, ref_grad) < max(4 * tol, floor), row


@pytest.mark.parametrize("temperature", [1.0, 8.0, 3.3])
def test_one_pass_logits_of_billions(temperature):
    """Logits so large that the fused offsets' origin, fl(r a), is off from r a by more than the
    offsets' range (from a review: NaN): such rows take the two-pass form."""
    gen = torch.Generator().manual_seed(7)
    for base, step in ((3e9, 256.0), (1e12, 131072.0)):
        s = base + step * torch.randint(0, 3, (2, 2048), generator=gen).float()
        t = base + step * torch.randint(0, 3, (2, 2048), generator=gen).float()
        y = torch.tensor([7, 2000])
        out = kd.distillation_loss(
            s, t, y, temperature=temperature, reduction="none", backend="cpu"
        )
        ref = kd_loss_reference(
            s.double(), [t.double()], y, temperature=temperature, reduction="none"
        )
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("c", [1025, 2050, 2048])
def test_one_pass_ensemble_member_scale_underflows(c):
    """A member whose weight / T underflows to 0 in float32 (from a review: its -inf padding of
    the last partial vector times 0 was NaN)."""
    gen = torch.Generator().manual_seed(5)
    s, t1, t2 = (torch.randn(3, c, generator=gen) for _ in range(3))
    y = torch.tensor([3, c - 1, 17])
    for weights in ([1.0, 1e-46], [1.0, 1e-300]):
        kwargs = dict(temperature=2.0, teacher_weights=weights, reduction="none")
        out = kd.distillation_loss(s, [t1, t2], y, backend="cpu", **kwargs)
        ref = kd_loss_reference(s.double(), [t1.double(), t2.double()], y, **kwargs)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-9)
