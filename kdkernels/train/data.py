"""The data of the reference runs: scikit-learn's bundled 8x8 digits (the default), or any
MNIST-format IDX files on disk (MNIST, Fashion-MNIST). Nothing is ever downloaded."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    side: int  # images are side x side
    source: str = ""

    def train_rows(self, rows: Tensor) -> Data:
        """The same data with only these training rows (the transfer set of an experiment)."""
        return replace(self, x_train=self.x_train[rows], y_train=self.y_train[rows])


def load_digits_split() -> Data:
    """scikit-learn's digits with a fixed split: 1,000 train, 297 validation, 500 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    train, val, test = order[:1000], order[1000:1297], order[1297:]
    return Data(x[train], y[train], x[val], y[val], x[test], y[test], 8, "sklearn digits (8x8)")


def read_idx(path: Path) -> Tensor:
    """One IDX file of unsigned bytes (raw or .gz) as a uint8 tensor of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[:3] != b"\x00\x00\x08":
            raise ValueError(
                f"{path} is not an IDX file of unsigned bytes (magic {header.hex() or 'missing'}, "
                "expected 000008xx)"
            )
        ndim = header[3]
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        body = f.read()
    count = 1
    for s in shape:
        count *= s
    if len(body) != count:
        raise ValueError(f"{path}: header says {count} bytes of data {shape}, found {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_idx_dir(data_dir: str) -> Data:
    """MNIST-format data (MNIST, Fashion-MNIST) from its four IDX files (raw or .gz) in
    `data_dir`: the last 5,000 training images are the validation split."""
    root = Path(data_dir)

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (root / name).exists():
                return root / name
        raise FileNotFoundError(f"{stem}[.gz] not found in {root} (kdkernels never downloads data)")

    x = read_idx(find("train-images-idx3-ubyte"))
    side = x.shape[-1]
    x = x.reshape(len(x), -1).float() / 255.0
    y = read_idx(find("train-labels-idx1-ubyte")).long()
    x_test = read_idx(find("t10k-images-idx3-ubyte")).reshape(-1, side * side).float() / 255.0
    y_test = read_idx(find("t10k-labels-idx1-ubyte")).long()
    n = len(y) - 5000
    return Data(x[:n], y[:n], x[n:], y[n:], x_test, y_test, side, f"IDX files in {root}")
