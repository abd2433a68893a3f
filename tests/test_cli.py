"""The CLI as a user runs it: outputs of a run, and each bad input refused before any work."""

import csv
import json

import numpy as np
import pytest
import torch

from cnnexp.config.checks import validate_config
from cnnexp.errors import ConfigError
from cnnexp.results.metrics import COLUMNS
from conftest import SMALL, run_cli

RUN_PLOTS = ["train_loss", "test_loss", "train_acc", "test_acc", "confusion_matrix", "per_class_accuracy",
             "predictions"]


@pytest.mark.slow
def test_the_readme_demo_writes_everything_and_learns(tmp_path):
    # The README's offline demo, run from a directory that is not the repo.
    result = run_cli(["data=synthetic", "trainer.max_epochs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state["conv1.weight"].shape == (6, 3, 5, 5)
    with open(run_dir / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert sum(int(r["total"]) for r in per_class) == 1000
    # The last epoch's test accuracy is the final model's: the correct test images out of 1000.
    assert float(rows[-1]["test_acc"]) == sum(int(r["correct"]) for r in per_class) / 1000
    assert all(float(r["test_acc"]) * 1000 == round(float(r["test_acc"]) * 1000) for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns
    for name in RUN_PLOTS:
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((run_dir / "run.json").read_text())
    auto = "cuda" if torch.cuda.is_available() else "cpu"  # what trainer.device=auto picks here
    assert record["status"] == "completed" and record["device"].split(":")[0] == auto and record["seed"] == 0
    assert set(record["versions"]) >= {"cnnexp", "torch", "torchvision", "hydra"}
    assert record["ended_at"] >= record["started_at"] and record["epochs_completed"] == 2
    assert record["final_test_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert record["final_test_acc"] > 0.5  # chance is 0.1
    assert "epoch 2/2" in (run_dir / "cnnexp.log").read_text()
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 2


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One short CPU run, shared by the tests that read or re-render its outputs."""
    tmp = tmp_path_factory.mktemp("small")
    run_dir = tmp / "run"
    result = run_cli([*SMALL, "trainer.max_epochs=1", "trainer.device=cpu", f"hydra.run.dir={run_dir}"], cwd=tmp)
    assert result.returncode == 0, result.stderr
    return run_dir


def read_confusion(path):
    with open(path) as f:
        return np.array([[int(c) for c in row[1:]] for row in list(csv.reader(f))[1:]])


@pytest.mark.slow
def test_confusion_and_per_class_results_match_an_independent_evaluation(small_run, compose_cfg):
    from cnnexp.data import synthetic_splits
    from cnnexp.models import TutorialCNN

    splits = synthetic_splits(compose_cfg(SMALL).data)  # the same images, generated again
    model = TutorialCNN()
    model.load_state_dict(torch.load(small_run / "model.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        predicted = model((splits.test_images.float() / 255 - 0.5) / 0.5).argmax(1).numpy()
    truth = splits.test_labels.numpy()
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (truth, predicted), 1)
    assert (read_confusion(small_run / "confusion.csv") == expected).all()
    with open(small_run / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == splits.classes
    assert [int(r["correct"]) for r in per_class] == np.diag(expected).tolist()
    assert [int(r["total"]) for r in per_class] == np.bincount(truth, minlength=10).tolist()
    record = json.loads((small_run / "run.json").read_text())
    assert record["final_test_acc"] == pytest.approx((predicted == truth).mean())
    assert record["device"] == "cpu"


@pytest.mark.slow
def test_replotting_a_run_from_its_csvs(small_run, tmp_path):
    for png in (small_run / "plots").glob("*.png"):
        png.unlink()
    result = run_cli([str(small_run)], cwd=tmp_path, module="cnnexp.plot")
    assert result.returncode == 0, result.stderr
    assert {p.stem for p in (small_run / "plots").glob("*.png")} >= set(RUN_PLOTS)


@pytest.mark.slow
def test_plot_against_the_original_experiment(small_run, tmp_path):
    result = run_cli([str(small_run), "--against-original"], cwd=tmp_path, module="cnnexp.plot")
    assert result.returncode == 0, result.stderr
    assert (small_run / "plots" / "test_acc_vs_original.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    ("trainer.lr_schedule=triangle", "trainer.lr_schedule"),
    ("trainer.num_threads=0", "trainer.num_threads"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
    ("data.n_train=0", "data.n_train"),
]
if not torch.cuda.is_available():
    INVALID.append(("trainer.device=cuda", "trainer.device"))


@pytest.mark.parametrize("override, key", INVALID)
def test_invalid_values_are_config_errors_naming_the_key(compose_cfg, override, key):
    cfg = compose_cfg([*SMALL, override])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert str(info.value).startswith(f"{key}=") and info.value.exit_code == 2


def test_an_invalid_value_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "optim.lr=-1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    # The README's own example of such an error, word for word, and nothing else.
    assert result.stderr.strip() == "error: optim.lr=-1.0 is not allowed: the learning rate must be > 0."
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
    assert result.returncode == 2  # named before Hydra composes, as any other config error
    assert "trainer.epochs: no such key in trainer" in result.stderr and "Traceback" not in result.stderr
    assert "the closest key is trainer.max_epochs" in result.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_unwritable_output_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli([*SMALL, f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot be written" in result.stderr and "hydra.run.dir" in result.stderr
    assert "Traceback" not in result.stderr and "Training" not in result.stderr


@pytest.mark.slow
def test_diverging_loss_stops_the_run_and_marks_it_failed(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "optim.lr=1e4", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 1
    assert "NaN or infinite at epoch 1, step" in result.stderr and "lower learning rate" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert (run_dir / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)


@pytest.mark.slow
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
