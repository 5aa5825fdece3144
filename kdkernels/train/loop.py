"""The models and training loops: regularised MLP teachers, and one small MLP student trained
on hard labels alone or with `kdkernels.DistillationLoss`, with early stopping on the
validation split."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdkernels

from .data import Data


def mlp(inputs: int, hidden: int, layers: int, dropout: float = 0.0) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        width = hidden
    mods.append(nn.Linear(width, 10))
    return nn.Sequential(*mods)


def jitter(x: Tensor, side: int, pixels: int, gen: torch.Generator) -> Tensor:
    """Shift a batch by one random offset of up to `pixels` each way (zero fill): the jitter."""
    if pixels == 0:
        return x
    images = x.reshape(-1, 1, side, side)
    padded = F.pad(images, (pixels,) * 4)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=gen).tolist()
    return padded[..., dy : dy + side, dx : dx + side].reshape(x.shape)


@torch.no_grad()
def errors(logits: Tensor, y: Tensor) -> int:
    return int((logits.argmax(-1) != y).sum())


def batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=gen)
    return [order[i : i + size] for i in range(0, n, size)]


def train_teacher(
    data: Data, hidden: int, epochs: int, dropout: float, pixels: int, seed: int, tick: Callable
) -> nn.Module:
    """A regularised teacher (dropout, input jitter) on hard labels; `tick()` once per epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(data.x_train.shape[1], hidden, 2, dropout)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in batches(len(data.y_train), 64, gen):
            x = jitter(data.x_train[idx], data.side, pixels, gen)
            loss = F.cross_entropy(model(x), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        tick()
    return model.eval()


@dataclass
class StudentRun:
    model: nn.Module  # at the epoch of fewest validation errors (early stopping)
    best_epoch: int
    test_curve: list[int] = field(default_factory=list)  # test errors every eval_every epochs
    val_curve: list[int] = field(default_factory=list)
    eval_every: int = 1
    first_loss: float = 0.0  # the training loss over the transfer set, before and after
    last_loss: float = 0.0


def train_student(
    data: Data,
    init: dict,
    epochs: int,
    seed: int,
    tick: Callable,
    teacher_logits: Tensor | None = None,
    criterion: kdkernels.DistillationLoss | None = None,
) -> StudentRun:
    """The small MLP from `init` on data's training rows: hard labels alone (no
    regularisation) when teacher_logits is None, else `criterion` against the teachers' logits
    [M, N_train, C] of those rows. Keeps the weights of the epoch with the fewest validation
    errors, checked every epoch or, over many short epochs, 200 times in all; `tick()` once per
    epoch."""
    gen = torch.Generator().manual_seed(seed)
    model = mlp(data.x_train.shape[1], init["0.weight"].shape[0], 2)
    model.load_state_dict(init)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_of(x: Tensor, rows: Tensor) -> Tensor:
        if teacher_logits is None:
            return F.cross_entropy(model(x), data.y_train[rows])
        return criterion(model(x), teacher_logits[:, rows], data.y_train[rows])

    every = torch.arange(len(data.y_train))
    with torch.no_grad():
        run = StudentRun(model, 0, first_loss=float(loss_of(data.x_train, every)))
    run.eval_every = max(1, epochs // 200)
    best = (len(data.y_val) + 1, None)
    for epoch in range(epochs):
        model.train()
        for idx in batches(len(data.y_train), 64, gen):
            loss = loss_of(data.x_train[idx], idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        tick()
        if (epoch + 1) % run.eval_every:
            continue
        model.eval()
        with torch.no_grad():
            run.val_curve.append(errors(model(data.x_val), data.y_val))
            run.test_curve.append(errors(model(data.x_test), data.y_test))
        if run.val_curve[-1] < best[0]:
            best = (run.val_curve[-1], copy.deepcopy(model.state_dict()))
            run.best_epoch = epoch + 1
    model.load_state_dict(best[1])
    with torch.no_grad():
        run.last_loss = float(loss_of(data.x_train, every))
    return run
