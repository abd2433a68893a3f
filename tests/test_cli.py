"""The CLI as a user runs it: outputs of a run, and each bad input refused before any work."""

import csv
import json

import pytest
import torch

from cnnexp.metrics import COLUMNS
from conftest import SMALL, run_cli

RUN_PLOTS = ["train_loss", "test_loss", "train_acc", "test_acc", "confusion_matrix", "per_class_accuracy",
             "predictions"]


def test_two_epoch_synthetic_run_writes_everything(tmp_path):
    # The README's offline demo, run from a directory that is not the repo.
    result = run_cli(["data=synthetic", "trainer.max_epochs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["test_acc"]) <= 1 for r in rows)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state["conv1.weight"].shape == (6, 3, 5, 5)
    with open(run_dir / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert len(per_class) == 10 and sum(int(r["total"]) for r in per_class) == 1000
    with open(run_dir / "confusion.csv") as f:
        confusion = [[int(c) for c in row[1:]] for row in list(csv.reader(f))[1:]]
    assert len(confusion) == 10 and sum(map(sum, confusion)) == 1000  # every test image counted once
    assert sum(confusion[i][i] for i in range(10)) == sum(int(r["correct"]) for r in per_class)
    for name in RUN_PLOTS:
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["device"] == "cpu" and record["seed"] == 0
    assert set(record["versions"]) >= {"cnnexp", "torch", "torchvision", "hydra"}
    assert record["started_at"] and record["ended_at"]
    assert (run_dir / "cnnexp.log").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_replotting_a_run_from_its_csvs(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli([*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path).returncode == 0
    for png in (run_dir / "plots").glob("*.png"):
        png.unlink()
    result = run_cli([str(run_dir)], cwd=tmp_path, module="cnnexp.plot")
    assert result.returncode == 0, result.stderr
    assert {p.stem for p in (run_dir / "plots").glob("*.png")} >= set(RUN_PLOTS)


def test_plot_command_rejects_a_directory_without_results(tmp_path):
    result = run_cli([str(tmp_path)], cwd=tmp_path, module="cnnexp.plot")
    assert result.returncode == 2 and "neither metrics.csv" in result.stderr


INVALID = [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("optim.momentum=-0.5", "optim.momentum"),
    ("data.batch_size=0", "data.batch_size"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.lr_schedule=linear", "trainer.lr_schedule"),
]
if not torch.cuda.is_available():
    INVALID.append(("trainer.device=cuda", "trainer.device"))


@pytest.mark.parametrize("override, key", INVALID)
def test_invalid_values_are_refused_before_any_work(tmp_path, override, key):
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, override, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    assert key in result.stderr and "Traceback" not in result.stderr
    assert "Training" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "cnnexp.log"]  # Hydra's own files only


def test_imagefolder_faults_are_refused_before_any_work(tmp_path):
    missing = run_cli(["data=imagefolder", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'a'}"],
                      cwd=tmp_path)
    assert missing.returncode == 2 and "data.root" in missing.stderr and "does not exist" in missing.stderr
    for split, name in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "emu")):
        (tmp_path / "imgs" / split / name).mkdir(parents=True)
    mismatch = run_cli(["data=imagefolder", f"data.root={tmp_path / 'imgs'}", f"hydra.run.dir={tmp_path / 'b'}"],
                       cwd=tmp_path)
    assert mismatch.returncode == 2 and "different classes" in mismatch.stderr and "emu" in mismatch.stderr
    assert not (tmp_path / "b" / "run.json").exists()


def test_unknown_key_is_refused_naming_it(tmp_path):
    result = run_cli([*SMALL, "trainer.epochs=3", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0 and "trainer.epochs" in result.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_unwritable_output_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli([*SMALL, f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot be written" in result.stderr and "hydra.run.dir" in result.stderr
    assert "Traceback" not in result.stderr and "Training" not in result.stderr


def test_diverging_loss_stops_the_run_and_marks_it_failed(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "optim.lr=1e4", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 1
    assert "NaN or infinite at epoch 1, step" in result.stderr and "lower learning rate" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert (run_dir / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)


def test_short_training_learns_well_above_chance(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "data.n_train=2000", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    final = json.loads((run_dir / "run.json").read_text())["final_test_acc"]
    assert final > 0.5  # chance is 0.1


def test_plot_against_the_original_experiment(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli([*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path).returncode == 0
    result = run_cli([str(run_dir), "--against-original"], cwd=tmp_path, module="cnnexp.plot")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "plots" / "test_acc_vs_original.png").read_bytes()[:4] == b"\x89PNG"


def test_an_optimiser_without_momentum_settings_trains_and_a_bad_combination_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "optim._target_=torch.optim.RMSprop", "trainer.max_epochs=1",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RMSprop" in (run_dir / "cnnexp.log").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    bad = run_cli([*SMALL, "optim._target_=torch.optim.Adagrad", "optim.nesterov=true",
                   f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "nesterov" in bad.stderr
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == [".hydra", "cnnexp.log"]
