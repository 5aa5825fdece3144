"""kdkernels.integrations.trl.generalized_jsd_loss against TRL's own GKDTrainer method (the
optional `trl` test extra; CI installs it)."""

import os

import pytest
import torch

from kdkernels.integrations.trl import generalized_jsd_loss
from kdkernels.testing import rel_error

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip(
    "trl.experimental.gkd", reason="TRL is not installed (pip install '.[trl]')"
)
trl_loss = gkd.GKDTrainer.generalized_jsd_loss

B, T, V = 3, 7, 50


def inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, 5:] = -100  # padding
    labels[2, :2] = -100  # a prompt
    return student.to(dtype), teacher.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_matches_trl(beta, with_labels, reduction, num_items, dtype):
    student, teacher, labels = inputs(dtype)
    labels = labels if with_labels else None
    items = torch.tensor(17) if num_items == "tensor" else num_items
    options = dict(beta=beta, temperature=1.7, reduction=reduction, num_items_in_batch=items)
    ours_s = student.clone().requires_grad_(True)
    ours = generalized_jsd_loss(ours_s, teacher, labels, **options)
    ours.backward()
    theirs_s = student.clone().requires_grad_(True)
    theirs = trl_loss(theirs_s, teacher, labels, **options)
    theirs.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_error(ours, theirs) < tol
    assert rel_error(ours_s.grad, theirs_s.grad) < tol


def test_zero_items_gives_zero_where_trl_divides_by_zero():
    student, teacher, labels = inputs(torch.float32)
    student.requires_grad_(True)
    out = generalized_jsd_loss(student, teacher, labels, num_items_in_batch=0)
    out.backward()
    assert out.item() == 0.0 and not student.grad.any()
    assert not trl_loss(student, teacher, labels, num_items_in_batch=0).isfinite()


def test_reduction_none_is_refused_with_the_alternative():
    student, teacher, labels = inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction='none'"):
        generalized_jsd_loss(student, teacher, labels, reduction="none")
