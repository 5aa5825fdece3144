"""The CPU fast path (kdkernels/_eager_cpu.py) against the general path it shortcuts: bitwise the
same loss and gradient on the contract's samples with the teachers as a list of plain tensors
(the samples stack them, which only the general path takes), the decision itself (taken exactly
where the rules say), and every input it must leave to the general path."""

import pytest
import torch

import kdkernels as kd
from kdkernels import _eager_cpu, loss
from kdkernels._gradient_buffers import MIN_BYTES
from kdkernels._validate import validate_options
from kdkernels.testing import sample_inputs

OPTION_KEYS = {"temperature", "soft_weight", "hard_weight", "ensemble", "soft_loss", "beta"}
OPTION_KEYS |= {"scale_soft_by_t2", "ignore_index", "unlabeled_index", "reduction"}
SAMPLES = list(sample_inputs(small=True))


def _plain_inputs(sample, dtype):
    """The sample's student as [N, C] and its teachers as a list of contiguous [N, C] tensors."""
    student, teachers, labels = sample.inputs(dtype)
    c = student.shape[-1]
    student = student.reshape(-1, c).contiguous().requires_grad_(True)
    if isinstance(teachers, torch.Tensor):
        teachers = list(teachers.unbind(0))
    teachers = [t.reshape(-1, c).contiguous() for t in teachers]
    return student, teachers, None if labels is None else labels.reshape(-1)


def _expected_to_take(sample, student, labels) -> bool:
    """The fast path's own rule on plain inputs (distillation_loss calls it only without
    teacher_weights and num_items_in_batch)."""
    c = student.shape[-1]
    return sample.kwargs.get("reduction", "mean") != "none" and (
        labels is None or bool(((labels >= 0) & (labels < c)).all())
    )


def _fast_and_general(student, teachers, labels, monkeypatch, **kwargs):
    """(loss, gradient) by the fast path (where it takes the call) and by the general path."""

    def loss_and_grad():
        student.grad = None
        value = kd.distillation_loss(student, teachers, labels, **kwargs)
        value.sum().backward()
        return value, student.grad

    fast = loss_and_grad()
    with monkeypatch.context() as patch:
        patch.setattr(loss, "eager_cpu_loss", lambda *args: None)
        general = loss_and_grad()
    return fast, general


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fast_path_matches_the_general_path(sample, dtype, monkeypatch):
    student, teachers, labels = _plain_inputs(sample, dtype)
    kwargs = sample.kwargs
    options = validate_options(**{k: v for k, v in kwargs.items() if k in OPTION_KEYS})
    with torch.no_grad():
        taken = _eager_cpu.eager_cpu_loss(student, teachers, labels, options) is not None
    assert taken == _expected_to_take(sample, student, labels)
    (fast, fast_grad), (general, general_grad) = _fast_and_general(
        student, teachers, labels, monkeypatch, **kwargs
    )
    assert torch.equal(fast, general)
    assert torch.equal(fast_grad, general_grad)


def _odd_inputs(kind: str):
    """Inputs the samples do not reach: each kernel dtype's loss dtype, rows whose stride is not
    C (a [1, C] tensor is contiguous whatever its first stride)."""
    c, y = 7, torch.tensor([3])
    if kind == "1xC":
        return torch.randn(c, 1).t(), torch.randn(1, c).as_strided((1, c), (5, 1)), y
    dtype = getattr(torch, kind)
    return torch.randn(5, c, dtype=dtype), [torch.randn(5, c, dtype=dtype)] * 2, None


@pytest.mark.parametrize("kind", ["float64", "float16", "1xC"])
def test_the_fast_path_matches_the_general_path_on_odd_inputs(kind, monkeypatch):
    student, teachers, labels = _odd_inputs(kind)
    assert student.is_contiguous()
    student.requires_grad_(True)
    with torch.no_grad():
        taken = _eager_cpu.eager_cpu_loss(
            student, teachers, labels, validate_options(temperature=2.0)
        )
    assert taken is not None
    (fast, fast_grad), (general, general_grad) = _fast_and_general(
        student, teachers, labels, monkeypatch, temperature=2.0
    )
    assert fast.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert fast.dim() == 0 and fast_grad.dtype == student.dtype
    assert torch.equal(fast, general) and torch.equal(taken, fast.detach())
    assert torch.equal(fast_grad, general_grad)


def _declines(student, teachers, labels=None, **options) -> bool:
    return _eager_cpu.eager_cpu_loss(student, teachers, labels, validate_options(**options)) is None


def test_the_fast_path_takes_the_common_call():
    s, t, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert not _declines(s, t, y)
    assert not _declines(s, [t, t], y, reduction="sum", ensemble="arithmetic")
    assert not _declines(s.detach(), (t,))  # no gradient, a tuple, no labels
    with torch.no_grad():
        assert not _declines(s, t, y)


class _Subclass(torch.Tensor):
    pass


def test_the_fast_path_leaves_everything_else_to_the_general_path():
    s, t, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ignored = y.clone()
    ignored[0] = -100
    assert _declines(s, t, y, reduction="none")
    assert _declines(s, t, ignored)  # ignore_index: the general path counts the rows
    assert _declines(s, t, torch.full((8,), 10))  # out of range: the general path's error
    assert _declines(s, t, y.int())
    assert _declines(s, t, y[:4])
    assert _declines(s, torch.stack([t, t]), y)  # stacked: the general path unbinds
    assert _declines(s, [t, t.double()], y)  # mixed dtypes: the general path promotes
    assert _declines(s, t.t().contiguous().t(), y)  # not contiguous
    assert _declines(s.reshape(2, 4, 10), t.reshape(2, 4, 10), y.reshape(2, 4))
    assert _declines(s, t.clone().requires_grad_(True), y)  # the general path warns
    assert _declines(s, [], y)
    assert _declines(s, [t] * 65, y)  # more teachers than the kernel takes: the error
    assert _declines(s, t.as_subclass(_Subclass), y)
    assert _declines(torch.randn(8, 0), torch.randn(8, 0))  # no classes: the general error
    assert _declines(torch.randint(0, 5, (8, 10)), t, y)  # integer logits
    assert _declines(s, "teacher", y)


def test_the_fast_path_writes_a_large_gradient_into_a_kept_buffer(monkeypatch):
    """A gradient of MIN_BYTES or more goes to the storage of an earlier one nothing holds."""
    shape = (64, (MIN_BYTES // 4) // 64)
    student, teacher = torch.randn(shape, requires_grad=True), torch.randn(shape)
    labels = torch.randint(0, shape[1], (64,))
    (fast, fast_grad), (general, general_grad) = _fast_and_general(
        student, teacher, labels, monkeypatch
    )
    assert torch.equal(fast, general) and torch.equal(fast_grad, general_grad)
    pointers = {fast_grad.data_ptr(), general_grad.data_ptr()}
    del fast, general, fast_grad, general_grad
    student.grad = None
    kd.distillation_loss(student, teacher, labels).backward()
    assert student.grad.data_ptr() in pointers
