"""The reference training loop, end to end, in a tiny configuration."""

import json

from kdkernels.train import Config, main


def test_tiny_training_run_writes_every_field(tmp_path):
    cfg = Config(
        seeds=1,
        teachers=2,
        teacher_hidden=32,
        teacher_epochs=2,
        student_epochs=3,
        out=str(tmp_path),
        progress=False,
        backend="cpu",
    )
    report = main(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert saved["table"] == report["table"]
    (seed,) = saved["results"]
    assert len(seed["teacher_errors"]) == 2
    for key in (
        "ensemble_geometric_errors",
        "ensemble_arithmetic_errors",
        "student_errors",
        "distilled_errors",
    ):
        assert 0 <= seed[key] <= saved["data"]["test"]
    assert len(seed["student_curve"]) == len(seed["distilled_curve"]) == 3
    assert seed["distilled_last_loss"] < seed["distilled_first_loss"]  # the distilled net learned
