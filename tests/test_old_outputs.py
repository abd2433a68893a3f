"""Outputs of the release before the package reorganisation (tests/fixtures/release_0_2,
written by commit 2997393) still resume, plot, summarise and skip with the current code."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "release_0_2"
# The sweep command that wrote fixtures/release_0_2/sweep, less its hydra.sweep.dir.
SWEEP_ARGS = ["-m", "data=synthetic", "data.n_train=200", "data.n_test=100", "data.image_size=8", "data.val_size=40",
              "model=wide_cnn", "model.width=2", "trainer.max_epochs=2", "trainer.progress=none",
              "trainer.num_threads=1", "optim.lr=0.001,0.01"]
# What the old release drew for a run with a validation split.
RUN_FIGURES = ["overview.png", "train_loss.png", "train_acc.png", "val_loss.png", "val_acc.png", "test_loss.png",
               "test_acc.png", "confusion_matrix.png", "per_class_accuracy.png", "predictions.png"]

pytestmark = pytest.mark.slow


@pytest.fixture
def old(tmp_path):
    """A private copy of the fixture: the tests write into it."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    return tmp_path / "old"


def test_an_old_run_plots_then_resumes(old, tmp_path):
    run_dir = old / "run"
    assert not (run_dir / "plots").exists()
    plotted = run_cli([str(run_dir)], cwd=tmp_path, module="cnnexp.plot")
    assert plotted.returncode == 0, plotted.stdout + plotted.stderr
    for name in RUN_FIGURES:
        assert (run_dir / "plots" / name).stat().st_size > 0, name

    before = pd.read_csv(FIXTURE / "run" / "metrics.csv")
    result = run_cli([f"trainer.resume={run_dir}", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'resume'}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    after = pd.read_csv(run_dir / "metrics.csv")
    assert after["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(after.iloc[:2][before.columns], before, check_exact=True)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["epochs_completed"] == 3
    (resume,) = record["resumes"]
    assert resume["from_epoch"] == 3


def test_an_old_sweep_is_summarised_and_its_jobs_skipped(old, tmp_path):
    sweep_dir = old / "sweep"
    summary = sweep_dir / "summary.csv"
    old_mtime = summary.stat().st_mtime_ns  # copytree keeps it
    plotted = run_cli([str(sweep_dir)], cwd=tmp_path, module="cnnexp.plot")
    assert plotted.returncode == 0, plotted.stdout + plotted.stderr
    assert summary.stat().st_mtime_ns != old_mtime  # written again, not the fixture's
    table = pd.read_csv(summary).sort_values("job")
    assert table["job"].tolist() == [0, 1]
    expected = [pd.read_csv(sweep_dir / str(job) / "metrics.csv")["test_acc"].iloc[-1] for job in (0, 1)]
    assert table["final_test_acc"].tolist() == expected
    assert (sweep_dir / "compare_test_acc.png").stat().st_size > 0
    for job in ("0", "1"):
        assert (sweep_dir / job / "plots" / "test_acc.png").stat().st_size > 0

    kept = {path: path.read_bytes() for job in ("0", "1")
            for path in (sweep_dir / job / "metrics.csv", sweep_dir / job / "run.json")}
    result = run_cli([*SWEEP_ARGS, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for path, content in kept.items():
        assert path.read_bytes() == content, f"{path} changed: the completed job ran again"
        assert not (path.parent / "checkpoints").exists()  # the fixture keeps none: nothing was trained
    for job in ("0", "1"):
        record = json.loads((sweep_dir / job / "run.json").read_text())
        assert record["status"] == "completed" and "resumes" not in record
