"""The CPU gradient buffer kept between calls (kdkernels/_gradient_buffers.py): reused only when
no tensor refers to it, and every element of a reused buffer is written again."""

import pytest
import torch

import kdkernels as kd
from kdkernels import _fused, _gradient_buffers
from kdkernels.testing import assert_matches_reference, sample_inputs


@pytest.fixture
def keep_every_size(monkeypatch):
    """Keep gradients of any size, so that small test shapes take the reuse path."""
    monkeypatch.setattr(_gradient_buffers, "MIN_BYTES", 0)
    kd.empty_cache()
    yield
    kd.empty_cache()


def _bytes_of(storage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _poison_kept_buffers() -> None:
    for storage in _gradient_buffers._kept:
        _bytes_of(storage).fill_(0xFF)  # NaN in every float dtype


def _inputs():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(16, 100, generator=gen).requires_grad_(True)
    teachers = torch.randn(2, 16, 100, generator=gen)
    return student, teachers, torch.randint(0, 100, (16,), generator=gen)


def _loss(student, teachers, labels) -> torch.Tensor:
    return kd.distillation_loss(student, teachers, labels, backend="cpu", temperature=2.0)


def _gradient(student, teachers, labels) -> torch.Tensor:
    student.grad = None
    _loss(student, teachers, labels).backward()
    return student.grad


def test_this_torch_reports_storage_references():
    # Without it nothing is ever reused (correct, but slow): a torch upgrade should say so here.
    assert _gradient_buffers._use_count is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_every_element_of_a_reused_buffer_is_written(keep_every_size, dtype):
    cases = list(sample_inputs(small=True))
    reused = 0
    for case in cases:
        assert_matches_reference("cpu", case, dtype)  # its gradient's storage is now kept, free
        _poison_kept_buffers()
        before = _kept_pointers()  # addresses only: holding the storages would keep them busy
        assert_matches_reference("cpu", case, dtype)
        # The buffer used last is kept last; a new one would differ from every kept address.
        reused += _gradient_buffers._kept[-1].data_ptr() in before
    assert reused == len(cases)


def test_a_gradient_still_referenced_is_never_written(keep_every_size):
    student, teachers, labels = _inputs()
    first = _gradient(student, teachers, labels)
    row = first[0]  # a view alone keeps the storage in use
    expected = row.clone()
    del first
    second = _gradient(student, teachers, labels)
    assert second.untyped_storage().data_ptr() != row.untyped_storage().data_ptr()
    assert torch.equal(row, expected)


def _kept_pointer() -> int:
    (storage,) = _gradient_buffers._kept
    return storage.data_ptr()


def _kept_pointers() -> set[int]:
    return {storage.data_ptr() for storage in _gradient_buffers._kept}


def test_the_buffer_is_reused_once_free(keep_every_size):
    student, teachers, labels = _inputs()
    _gradient(student, teachers, labels)
    pointer = _kept_pointer()
    # Were it not reused, the new buffer would be allocated while the kept one still lives.
    assert _gradient(student, teachers, labels).data_ptr() == pointer == _kept_pointer()


def test_two_losses_of_one_step_each_reuse_a_buffer(keep_every_size):
    student, teachers, labels = _inputs()

    def step():  # both forward passes run before the backward pass
        student.grad = None
        (_loss(student, teachers, labels) + _loss(student, teachers, labels)).backward()

    step()
    before = _kept_pointers()
    step()
    assert len(before) == 2 and _kept_pointers() == before


def test_a_storage_handle_the_user_holds_is_never_written(keep_every_size):
    student, teachers, labels = _inputs()
    handle = _gradient(student, teachers, labels).untyped_storage()  # the kept object itself
    expected = _bytes_of(handle).clone()
    student.grad = None  # no tensor refers to the storage now, only the handle
    second = _gradient(student, teachers, labels)
    assert second.untyped_storage().data_ptr() != handle.data_ptr()
    assert torch.equal(_bytes_of(handle), expected)


def test_the_chunks_of_the_hidden_state_loss_share_one_buffer(keep_every_size, monkeypatch):
    pointers = []

    def recording(student):
        grad = _gradient_buffers.new_gradient(student)
        pointers.append(grad.data_ptr())
        return grad

    monkeypatch.setattr(_fused, "new_gradient", recording)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 16, generator=gen, requires_grad=True)
    weight, teacher_weight = torch.randn(2, 40, 16, generator=gen)
    loss = kd.linear_distillation_loss(
        hidden, weight, hidden.detach(), teacher_weight, chunk_size=2, backend="cpu"
    )
    loss.backward()
    assert len(pointers) == 4 and len(set(pointers)) == 1


def test_gradient_accumulation_adds_into_the_kept_gradient(keep_every_size):
    student, teachers, labels = _inputs()
    once = _gradient(student, teachers, labels).clone()
    for _ in range(2):  # .grad is not cleared: autograd adds each call's gradient into it
        _loss(student, teachers, labels).backward()
    torch.testing.assert_close(student.grad, 3 * once)


def test_a_shrunk_storage_is_replaced(keep_every_size):
    student, teachers, labels = _inputs()
    expected = _gradient(student, teachers, labels).clone()
    student.grad.untyped_storage().resize_(0)  # as FSDP frees a parameter's memory
    torch.testing.assert_close(_gradient(student, teachers, labels), expected)


def test_small_gradients_are_not_kept_and_empty_cache_frees():
    kd.empty_cache()
    student, teachers, labels = _inputs()
    _gradient(student, teachers, labels)
    assert not _gradient_buffers._kept  # 16 x 100 float32: far below MIN_BYTES
    big = torch.randn(1024, _gradient_buffers.MIN_BYTES // 4096, requires_grad=True)
    _gradient(big, big.detach() * 0.5, None)
    assert len(_gradient_buffers._kept) == 1
    kd.empty_cache()
    assert not _gradient_buffers._kept
