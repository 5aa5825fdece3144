"""The CPU gradient buffer, kept between calls for reuse.

The fused ops write the student's gradient [N, C] in the forward pass. On the CPU, PyTorch
allocates a tensor that large straight from the operating system (glibc maps anything above
32 MiB) and returns it when freed, so every training step's gradient lands on fresh pages that
the OS zeroes on first touch: at N=2048, C=32000 float32 that took longer than the whole fused
kernel on the development machine (a 262 MB copy: 16-18 ms into reused memory, 75-79 ms into a
fresh tensor). CUDA tensors need none of this: PyTorch's caching allocator already reuses them.

So a large CPU gradient is written into the storage of an earlier call's gradient when no
tensor refers to that storage any more (its reference count says so: only this module holds
it), as PyTorch's CUDA caching allocator reuses freed blocks. A storage something still refers
to (a leaf's .grad kept for gradient accumulation, a view the user holds) is never written.
`empty_cache()` frees what is kept.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

# Below this the allocator's own free lists serve the gradient again (and the first touch of a
# small buffer is cheap); above it a buffer is worth keeping.
MIN_BYTES = 16 << 20
# Storages kept at most, one per gradient size in bytes (a training loop with two distillation
# losses of different shapes keeps both); the least recently used goes first.
MAX_KEPT = 2

# The number of references to a storage (private to PyTorch: without it, nothing is reused).
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_lock = threading.Lock()
_kept: dict[int, torch.UntypedStorage] = {}  # by size in bytes, least recently used first


def new_gradient(student: Tensor) -> Tensor:
    """An uninitialised contiguous tensor shaped and typed like `student`, for the kernel to
    write the gradient into: on the CPU from a kept storage no tensor refers to any more, when
    there is one of its size."""
    nbytes = student.numel() * student.element_size()
    if not student.is_cpu or nbytes < MIN_BYTES or _use_count is None:
        return student.new_empty(student.shape)
    with _lock:
        storage = _kept.pop(nbytes, None)
        # One reference (ours): free. nbytes() checks that nobody shrank it (storage.resize_).
        if storage is None or _use_count(storage._cdata) != 1 or storage.nbytes() != nbytes:
            storage = torch.UntypedStorage(nbytes)
        _kept[nbytes] = storage
        while len(_kept) > MAX_KEPT:
            del _kept[next(iter(_kept))]
        return student.new_empty(0).set_(storage, 0, student.shape)


def empty_cache() -> None:
    """Free the CPU gradient buffers kdkernels keeps for reuse between calls (at most two, one
    per gradient size of at least 16 MiB; a buffer still in use is freed when its last tensor
    goes), as torch.cuda.empty_cache() frees the blocks PyTorch's CUDA allocator keeps."""
    with _lock:
        _kept.clear()
