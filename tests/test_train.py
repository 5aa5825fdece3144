"""The reference training runs, end to end in a tiny configuration, and the IDX reader."""

import gzip
import json
import math
import struct

import pytest
import torch

from kdkernels.train import Config, main
from kdkernels.train.data import load_idx_dir, read_idx


def _finite_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _finite_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _finite_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_tiny_run_of_the_three_experiments_writes_every_field(tmp_path):
    cfg = Config(
        seeds=2,
        teachers=2,
        teacher_hidden=32,
        teacher_epochs=2,
        student_hidden=32,
        student_epochs=3,
        small_epochs=4,
        out=str(tmp_path),
        progress=False,
        backend="cpu",
    )
    report = main(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert saved["tables"] == report["tables"] and set(saved["tables"]) == {
        "ensemble",
        "omit",
        "small",
    }
    assert all(math.isfinite(v) for v in _finite_numbers(saved["results"]))
    for seed in saved["results"]:
        ensemble, omit, small = seed["ensemble"], seed["omit"], seed["small"]
        assert len(ensemble["teacher_errors"]) == 2 and len(ensemble["distilled_curve"]) == 3
        assert ensemble["distilled_last_loss"] < ensemble["distilled_first_loss"]  # it learned
        assert omit["distilled_last_loss"] < omit["distilled_first_loss"]
        assert 0 <= omit["omitted_right_before"] <= 1 and 0 <= omit["shift"] <= 20
        assert small["rows"] == 50 and len(small["soft_curve"]) == 4
    assert "paired over 2 seeds" in saved["tables"]["ensemble"]


def test_one_experiment_alone(tmp_path):
    cfg = Config(
        experiment="omit",
        seeds=1,
        teachers=1,
        teacher_hidden=16,
        teacher_epochs=1,
        student_hidden=16,
        student_epochs=1,
        out=str(tmp_path),
        progress=False,
    )
    assert set(main(cfg)["tables"]) == {"omit"}
    with pytest.raises(ValueError, match="experiment must be one of"):
        main(Config(experiment="nope", out=str(tmp_path)))


def _idx(path, data: torch.Tensor, magic: bytes | None = None, compress: bool = False):
    header = magic or bytes([0, 0, 8, data.dim()])
    body = header + struct.pack(">" + "I" * data.dim(), *data.shape) + data.numpy().tobytes()
    path.write_bytes(gzip.compress(body) if compress else body)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_reader_raw_and_gzip(tmp_path, compress):
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,), dtype=torch.uint8)
    suffix = ".gz" if compress else ""
    assert torch.equal(read_idx(_idx(tmp_path / f"a{suffix}", images, compress=compress)), images)
    # A whole data folder: 5,000 validation rows need a training set larger than that.
    train = torch.randint(0, 256, (5003, 28, 28), dtype=torch.uint8)
    train_labels = torch.randint(0, 10, (5003,), dtype=torch.uint8)
    for stem, t in (
        ("train-images-idx3-ubyte", train),
        ("train-labels-idx1-ubyte", train_labels),
        ("t10k-images-idx3-ubyte", images),
        ("t10k-labels-idx1-ubyte", labels),
    ):
        _idx(tmp_path / (stem + suffix), t, compress=compress)
    data = load_idx_dir(str(tmp_path))
    assert data.x_train.shape == (3, 784) and data.x_val.shape == (5000, 784)
    assert data.side == 28 and torch.equal(data.y_test, labels.long())


def test_idx_reader_refuses_a_wrong_magic_number_and_a_short_file(tmp_path):
    data = torch.zeros(4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(_idx(tmp_path / "bad", data, magic=b"\x00\x00\x0d\x02"))
    path = _idx(tmp_path / "short", data)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="header says 12 bytes"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_idx_dir(str(tmp_path))


def test_the_time_estimate_counts_every_stage():
    """The whole-run bar's total (planned_cost) is exactly what the stages tick off."""
    from kdkernels.train.data import load_digits_split
    from kdkernels.train.experiments import EXPERIMENTS, planned_cost, run_seed

    data = load_digits_split()
    cfg = Config(
        teachers=1,
        teacher_hidden=8,
        teacher_epochs=1,
        student_hidden=8,
        student_epochs=2,
        small_epochs=3,
    )
    s = cfg.settings(data)
    ticked = []

    def stage(name, epochs, cost):
        return lambda: ticked.append(cost)

    run_seed(data, s, 0, EXPERIMENTS, stage)
    assert sum(ticked) == planned_cost(data, s, EXPERIMENTS)
