"""The CPU gradient buffer, kept between calls for reuse.

The fused ops write the student's gradient [N, C] in the forward pass. On the CPU, PyTorch
allocates a tensor that large straight from the operating system (glibc maps anything above
32 MiB) and returns it when freed, so every training step's gradient lands on fresh pages that
the OS zeroes on first touch: at N=2048, C=32000 float32 that took longer than the whole fused
kernel on the development machine (a 262 MB copy: 16-18 ms into reused memory, 75-79 ms into a
fresh tensor). CUDA tensors need none of this: PyTorch's caching allocator already reuses them.

So a large CPU gradient is written into the storage of an earlier call's gradient when no
tensor or handle refers to that storage any more (its reference counts say so: only this
module holds it), as PyTorch's CUDA caching allocator reuses freed blocks. A storage something
still refers to (a leaf's .grad kept for gradient accumulation, a view or the storage object the
user holds) is never written.
`empty_cache()` frees what is kept.
"""

from __future__ import annotations

import sys
import threading

import torch
from torch import Tensor

# Below this the allocator's own free lists serve the gradient again (and the first touch of a
# small buffer is cheap); above it a buffer is worth keeping.
MIN_BYTES = 16 << 20
# Storages kept at most (a training loop with two distillation losses keeps one for each, of
# the same size or not); the least recently used goes first.
MAX_KEPT = 2

# The number of references to a storage (private to PyTorch: without it, nothing is reused).
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_lock = threading.Lock()
_kept: list[torch.UntypedStorage] = []  # least recently used first


def _references_of_a_local() -> int:
    """sys.getrefcount of an object one local name holds (what the interpreter adds for the
    call itself differs between Python versions, so it is measured, not assumed)."""
    storage = torch.UntypedStorage(0)
    return sys.getrefcount(storage)


_ALONE = _references_of_a_local()


def _free(storage: torch.UntypedStorage, python_references: int, nbytes: int) -> bool:
    """Whether nothing but this module can reach `storage`: no tensor (each holds a reference
    the storage counts), no Python handle (`grad.untyped_storage()` returns this very object,
    which that count does not see; `python_references` does), no other process (shared
    memory), and nobody shrank it (storage.resize_)."""
    return (
        _use_count(storage._cdata) == 1
        and python_references == _ALONE
        and not storage.is_shared()
        and storage.nbytes() == nbytes
    )


def new_gradient(student: Tensor) -> Tensor:
    """An uninitialised contiguous tensor shaped and typed like `student`, for the kernel to
    write the gradient into: on the CPU from a kept storage of its size that nothing refers to
    any more, when there is one."""
    nbytes = student.nbytes
    if not student.is_cpu or nbytes < MIN_BYTES or _use_count is None:
        # empty_like: a microsecond less than new_empty(shape), which parses the shape; its
        # memory_format keyword, 0.2 us more, only where the student's layout is not the one.
        if student.is_contiguous():
            return torch.empty_like(student)
        return torch.empty_like(student, memory_format=torch.contiguous_format)
    with _lock:
        for i in range(len(_kept)):  # not enumerate: its tuple would hold one more reference
            storage = _kept[i]
            # Counted before the call below (whose arguments would add one) and without the
            # list's own reference: then it reads as _ALONE when no one else holds the storage.
            references = sys.getrefcount(storage) - 1
            if _free(storage, references, nbytes):
                del _kept[i]
                break
        else:
            storage = torch.UntypedStorage(nbytes)
        _kept.append(storage)
        del _kept[:-MAX_KEPT]
        return student.new_empty(0).set_(storage, 0, student.shape)


def empty_cache() -> None:
    """Free the CPU gradient buffers kdkernels keeps for reuse between calls (at most two, each
    a gradient of at least 16 MiB; a buffer still in use is freed when its last tensor goes), as
    torch.cuda.empty_cache() frees the blocks PyTorch's CUDA allocator keeps."""
    with _lock:
        _kept.clear()
