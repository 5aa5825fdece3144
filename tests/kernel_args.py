"""Raw keyword arguments of the extensions' `make_args`: what the tests of the C++ boundary
checks build by hand (a test tool, so it lives here, not in the wheel)."""

import torch
from torch import Tensor


def raw_kernel_args(n: int, c: int, **change) -> tuple[tuple[Tensor, ...], dict]:
    """Keyword arguments of `_C.make_args` for a float32 [n, c] problem with one teacher (T = 2,
    mean), with `change` applied, and the tensors they point into (keep them alive)."""
    s, t = torch.randn(n, c), torch.randn(n, c)
    row_loss = torch.empty(n)
    args = dict(
        student=s.data_ptr(),
        student_row_stride=c,
        student_dtype=0,
        teachers=[t.data_ptr()],
        teacher_row_strides=[c],
        teacher_dtype=0,
        teacher_weights=[1.0],
        labels=0,
        ignore_index=-100,
        unlabeled_index=None,
        num_rows=n,
        num_classes=c,
        temperature=2.0,
        soft_weight=0.9,
        hard_weight=0.1,
        scale_soft_by_t2=True,
        ensemble=0,
        soft_loss=0,
        beta=0.5,
        reduction=0,
        row_counts=0,
        row_loss=row_loss.data_ptr(),
        sum_rows=False,
        grad=0,
        num_threads=1,
    )
    args.update(change)
    return (s, t, row_loss), args
