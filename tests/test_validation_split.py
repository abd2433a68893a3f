"""Validation split: sizes, stratification, determinism, no overlap; the objective;
val columns, model_best.pt and run.json; sweep summaries ranked by validation."""

from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pytest
import torch
import yaml

from cnnexp.config.checks import validate_config
from cnnexp.data import ImageSplits, check_val_size, split_validation, to_device
from cnnexp.engine.evaluate import evaluate
from cnnexp.errors import ConfigError
from cnnexp.models import TutorialCNN
from cnnexp.results import objective
from cnnexp.results.metrics import COLUMNS, COLUMNS_WITH_VAL
from cnnexp.run.build import seed_everything
from cnnexp.run.job import run_job
from cnnexp.run.loop import train
from cnnexp.run.resume import Checkpoint
from cnnexp.run.signals import Interrupted
from cnnexp.sweep.table import best_by_validation_line, summarise
from conftest import SMALL, run_cli


def indexed_splits(class_sizes: list[int]) -> ImageSplits:
    """Training images whose pixels spell their own index, classes in blocks of the given sizes."""
    n = sum(class_sizes)
    index = torch.arange(n)
    images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 1, 0, 0] = index // 256, index % 256
    labels = torch.cat([torch.full((size,), c) for c, size in enumerate(class_sizes)])
    return ImageSplits(images, labels, images[:5].clone(), labels[:5].clone(),
                       classes=[f"c{i}" for i in range(len(class_sizes))])


def image_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 1, 0, 0].long()).tolist()


# ----------------------------------------------------------------- the split
@pytest.mark.parametrize(("val_size", "expected"), [(30, 30), (0.1, 40), (2, 2), (0.5, 200)])  # 1 is refused as ambiguous
def test_split_holds_out_the_requested_count_or_fraction(val_size, expected):
    splits = split_validation(indexed_splits([100, 100, 100, 100]), val_size, split_seed=0)
    assert splits.val_images.shape[0] == expected == splits.val_labels.numel()
    assert splits.train_images.shape[0] == 400 - expected == splits.train_labels.numel()


def test_split_is_stratified_per_class_with_the_exact_total():
    sizes = [300, 120, 50, 30]  # imbalanced: each class gives its share
    splits = split_validation(indexed_splits(sizes), 50, split_seed=3)
    per_class = torch.bincount(splits.val_labels, minlength=4).tolist()
    assert sum(per_class) == 50
    for count, size in zip(per_class, sizes):
        assert abs(count - 50 * size / 500) < 1
    assert torch.bincount(splits.train_labels, minlength=4).tolist() == [s - c for s, c in zip(sizes, per_class)]


def test_split_never_overlaps_training_and_keeps_every_image_once():
    original = indexed_splits([60, 40, 25])
    splits = split_validation(original, 0.2, split_seed=7)
    train_ids, val_ids = image_ids(splits.train_images), image_ids(splits.val_images)
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(125))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)  # original order kept
    # Each image keeps its own label.
    ids_to_label = dict(zip(image_ids(original.train_images), original.train_labels.tolist()))
    assert [ids_to_label[i] for i in val_ids] == splits.val_labels.tolist()
    assert torch.equal(splits.test_images, original.test_images)


def test_split_depends_on_split_seed_alone():
    held = []
    for trainer_seed in (0, 1, 12345):  # what trainer.seed changes: the global generators
        seed_everything(trainer_seed)
        held.append(image_ids(split_validation(indexed_splits([100, 100]), 20, split_seed=5).val_images))
    assert held[0] == held[1] == held[2]
    other = image_ids(split_validation(indexed_splits([100, 100]), 20, split_seed=6).val_images)
    assert other != held[0]


def test_no_split_returns_the_data_unchanged():
    splits = indexed_splits([10, 10])
    assert split_validation(splits, 0, split_seed=0) is splits
    assert splits.val_images is None


@pytest.mark.parametrize(("val_size", "n_train", "message"), [
    (-1, None, "data.val_size=-1 is not allowed"),
    (2.5, None, "data.val_size=2.5 is not allowed"),
    (400, 400, "only 400 images"),
    (1000, 400, "only 400 images"),
])
def test_bad_val_sizes_are_refused(val_size, n_train, message):
    with pytest.raises(ConfigError, match=message):
        check_val_size(val_size, n_train)


def test_a_class_left_without_training_images_is_refused():
    with pytest.raises(ConfigError, match="data.val_size=0.6 leaves class 'c1' with no training image"):
        split_validation(indexed_splits([100, 1]), 0.6, split_seed=0)
    with pytest.raises(ConfigError, match="holds out no image"):
        split_validation(indexed_splits([100, 100]), 0.001, split_seed=0)


def test_config_checks_name_the_key(compose_cfg):
    for overrides, message in [
        (["data.val_size=-0.5"], "data.val_size=-0.5"),
        (["data.val_size=400"], "data.val_size=400"),
        (["trainer.objective=best_val_acc"], "trainer.objective='best_val_acc' needs a validation split"),
        (["trainer.objective=best_test_acc", "data.val_size=40"], "trainer.objective='best_test_acc' is not allowed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_config(compose_cfg([*SMALL, *overrides]))
    validate_config(compose_cfg([*SMALL, "data.val_size=40", "trainer.objective=final_val_loss"]))


def test_cifar10_and_imagefolder_configs_have_the_split_keys(compose_cfg):
    for data in ("cifar10", "imagefolder"):
        cfg = compose_cfg([f"data={data}", "data.val_size=5000", "data.split_seed=2"])
        assert cfg.data.val_size == 5000 and cfg.data.split_seed == 2
    assert compose_cfg([]).data.val_size == 0  # the original experiment holds nothing out


# ----------------------------------------------------------------- objectives
ROWS = [
    {"epoch": 1, "train_loss": 2.0, "val_loss": 1.5, "val_acc": 0.40, "test_loss": 1.6, "test_acc": 0.38},
    {"epoch": 2, "train_loss": 1.5, "val_loss": 1.2, "val_acc": 0.55, "test_loss": 1.3, "test_acc": 0.50},
    {"epoch": 3, "train_loss": 1.2, "val_loss": 1.3, "val_acc": 0.55, "test_loss": 1.4, "test_acc": 0.52},
    {"epoch": 4, "train_loss": 1.0, "val_loss": 1.4, "val_acc": 0.50, "test_loss": 1.5, "test_acc": 0.53},
]


def test_objective_directions_and_values_per_epoch():
    assert objective.direction("best_val_acc") == "maximize"
    assert objective.direction("final_test_loss") == "minimize"
    per_epoch = [objective.epoch_value("best_val_acc", ROWS[:n]) for n in range(1, 5)]
    assert per_epoch == [0.40, 0.55, 0.55, 0.55]  # the best so far: never worse
    assert [objective.epoch_value("final_val_acc", ROWS[:n]) for n in range(1, 5)] == [0.40, 0.55, 0.55, 0.50]
    assert objective.final_value("best_val_loss", ROWS) == 1.2
    assert objective.final_value("final_test_loss", ROWS) == 1.5
    assert objective.final_value("final_train_loss", ROWS) == 1.0
    assert math.isnan(objective.final_value("best_val_acc", []))
    assert math.isnan(objective.final_value("final_val_acc", [{"epoch": 1, "test_acc": 0.3}]))
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        objective.direction("auto")


def test_auto_objective_follows_the_split():
    assert objective.resolve("auto", has_split=True) == "best_val_acc"
    assert objective.resolve("auto", has_split=False) == "final_test_loss"
    assert objective.is_better("final_test_loss", 1.0, 1.2) and not objective.is_better("best_val_acc", 0.1, 0.2)


def test_selection_takes_the_first_of_equal_validation_accuracies():
    assert objective.selected_row(ROWS)["epoch"] == 2
    assert objective.selected_row([{"epoch": 1, "test_acc": 0.5}]) is None
    fields = objective.record_fields("best_val_acc", ROWS)
    assert fields == {"objective": "best_val_acc", "objective_value": 0.55, "selected_by": "val_acc",
                      "best_epoch": 2, "best_val_acc": 0.55, "test_acc_at_best": 0.50}


# ----------------------------------------------------------------- training with a split
TRAIN = [*SMALL, "trainer.device=cpu", "trainer.progress=none", "data.val_size=0.25", "optim.lr=0.01"]


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def val_accuracy_of(state: dict, cfg) -> float:
    """Accuracy of saved weights on the run's validation split, recomputed from scratch."""
    from cnnexp.data import read_splits

    splits = split_validation(read_splits(cfg.data), cfg.data.val_size, cfg.data.split_seed)
    data = to_device(splits, cfg.data, torch.device("cpu"))
    model = TutorialCNN()
    model.load_state_dict(state)
    return evaluate(model, data.val_x, data.val_y, 1000, 10, data.normalize).accuracy


def test_training_with_a_split_records_val_columns_and_keeps_the_best_epoch(compose_cfg, tmp_path):
    cfg = compose_cfg([*TRAIN, "trainer.max_epochs=3"])
    result = train(cfg, tmp_path, torch.device("cpu"), lambda: None)
    rows = read_rows(tmp_path / "metrics.csv")
    assert list(rows[0]) == COLUMNS_WITH_VAL
    assert len(rows) == 3
    best = objective.selected_row(result.rows)
    assert val_accuracy_of(torch.load(tmp_path / "model_best.pt", weights_only=True), cfg) == best["val_acc"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    saved = torch.load(tmp_path / "model_best.pt", weights_only=True)
    assert all(torch.equal(saved[k], checkpoint["best_model"][k]) for k in saved)


def test_without_a_split_nothing_changes(compose_cfg, tmp_path):
    cfg = compose_cfg([*SMALL, "trainer.device=cpu", "trainer.progress=none", "trainer.max_epochs=1"])
    train(cfg, tmp_path, torch.device("cpu"), lambda: None)
    assert list(read_rows(tmp_path / "metrics.csv")[0]) == COLUMNS
    assert not (tmp_path / "model_best.pt").exists()


def test_selection_survives_a_mid_epoch_stop_and_resume(compose_cfg, tmp_path):
    cfg = compose_cfg([*TRAIN, "trainer.max_epochs=3"])
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    train(cfg, whole, torch.device("cpu"), lambda: None)

    class StopMidSecondEpoch:  # a SIGINT half-way through epoch 2
        def __init__(self):
            self.calls = 0

        def __call__(self):
            self.calls += 1
            return 2 if self.calls > 75 + 1 + 40 else None  # 300 training images: 75 steps an epoch

    with pytest.raises(Interrupted):
        train(cfg, stopped, torch.device("cpu"), StopMidSecondEpoch())
    (stopped / "model_best.pt").unlink()  # as if the stop came between the two writes
    checkpoint = Checkpoint.load(stopped / "checkpoints" / "last.pt")
    train(cfg, stopped, torch.device("cpu"), lambda: None, checkpoint=checkpoint)

    def without_timing(rows):
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "train_samples_per_s")} for r in rows]

    assert without_timing(read_rows(stopped / "metrics.csv")) == without_timing(read_rows(whole / "metrics.csv"))
    a = torch.load(whole / "model_best.pt", weights_only=True)
    b = torch.load(stopped / "model_best.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_json_and_the_returned_objective(compose_cfg, tmp_path):
    cfg = compose_cfg([*TRAIN, "trainer.max_epochs=2"])
    outcome = {}
    assert run_job(cfg, tmp_path, multirun=False, overrides=[], outcome=outcome) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    rows = [{k: float(v) for k, v in r.items()} for r in read_rows(tmp_path / "metrics.csv")]
    best = max(rows, key=lambda r: r["val_acc"])
    assert record["selected_by"] == "val_acc" and record["objective"] == "best_val_acc"
    assert record["best_epoch"] == next(r["epoch"] for r in rows if r["val_acc"] == best["val_acc"])
    assert record["best_val_acc"] == best["val_acc"] == outcome["objective"] == record["objective_value"]
    assert record["test_acc_at_best"] == best["test_acc"]
    assert (tmp_path / "plots" / "val_acc.png").is_file() and (tmp_path / "plots" / "val_loss.png").is_file()


def test_a_failed_run_returns_nan(compose_cfg, tmp_path):
    cfg = compose_cfg([*SMALL, "trainer.device=cpu", "trainer.progress=none", "trainer.max_epochs=1",
                       "optim.lr=1e8"])
    outcome = {}
    run_job(cfg, tmp_path, multirun=True, overrides=[], outcome=outcome)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
    assert math.isnan(outcome["objective"])


# ----------------------------------------------------------------- sweep summaries
def fake_job(sweep_dir, job, overrides, val_accs, test_accs):
    job_dir = sweep_dir / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / "run.json").write_text(json.dumps({"status": "completed", "wall_seconds": 1.0}))
    frame = pd.DataFrame({"epoch": range(1, len(test_accs) + 1), "train_loss": 1.0, "train_acc": 0.5,
                          "test_loss": 1.0, "test_acc": test_accs, "lr": 0.1, "epoch_seconds": 1.0,
                          "train_samples_per_s": 1.0})
    if val_accs is not None:
        frame.insert(3, "val_loss", 1.0)
        frame.insert(4, "val_acc", val_accs)
    frame.to_csv(job_dir / "metrics.csv", index=False)


def test_summary_selects_and_ranks_by_validation(tmp_path):
    # Job 0 has the best test accuracy anywhere, job 1 the best validation accuracy.
    fake_job(tmp_path, 0, ["optim.lr=0.1"], [0.50, 0.60, 0.55], [0.70, 0.65, 0.90])
    fake_job(tmp_path, 1, ["optim.lr=0.2"], [0.70, 0.80, 0.75], [0.60, 0.62, 0.61])
    fake_job(tmp_path, 2, ["optim.lr=0.3"], [0.65, 0.40, 0.30], [0.55, 0.50, 0.40])
    table, curves, groups = summarise(tmp_path)
    assert groups is None
    assert list(table["rank"]) == [3, 1, 2] and set(table["ranked_by"]) == {"best_val_acc"}
    assert list(table["best_val_acc"]) == [0.60, 0.80, 0.65]
    assert list(table["best_epoch"]) == [2, 2, 1]
    assert list(table["test_acc_at_best"]) == [0.65, 0.62, 0.55]  # the test number at the selected epoch
    assert list(table["final_test_acc"]) == [0.90, 0.61, 0.40]
    assert "best_test_acc" not in table
    line = best_by_validation_line(table)
    assert line.startswith("Best by best_val_acc: job 1") and "test accuracy there 0.6200" in line


def test_seed_groups_rank_by_their_mean_validation_accuracy(tmp_path):
    fake_job(tmp_path, 0, ["optim.lr=0.1", "trainer.seed=0"], [0.5, 0.6], [0.9, 0.9])
    fake_job(tmp_path, 1, ["optim.lr=0.1", "trainer.seed=1"], [0.5, 0.4], [0.9, 0.9])
    fake_job(tmp_path, 2, ["optim.lr=0.2", "trainer.seed=0"], [0.55, 0.55], [0.5, 0.5])
    fake_job(tmp_path, 3, ["optim.lr=0.2", "trainer.seed=1"], [0.56, 0.5], [0.5, 0.5])
    table, _, groups = summarise(tmp_path)
    assert set(table["ranked_by"]) == {"group_mean_best_val_acc"}
    assert list(table["rank"]) == [3, 3, 1, 1]  # 0.55 and 0.555 beat 0.6 and 0.5
    assert list(table["group_mean_best_val_acc"]) == pytest.approx([0.55, 0.55, 0.555, 0.555])
    assert "group_mean_test_acc_at_best" in table and "group_mean_best_test_acc" not in table


def test_summary_without_a_split_is_unchanged(tmp_path):
    fake_job(tmp_path, 0, ["optim.lr=0.1"], None, [0.5, 0.6])
    fake_job(tmp_path, 1, ["optim.lr=0.2"], None, [0.7, 0.4])
    table, _, _ = summarise(tmp_path)
    assert not {"rank", "ranked_by", "best_val_acc", "test_acc_at_best"} & set(table.columns)
    assert best_by_validation_line(table) is None
    assert list(table["best_test_acc"]) == [0.6, 0.7]
    assert list(table["best_epoch"]) == [2, 1]


@pytest.mark.slow
def test_a_sweep_with_a_split_end_to_end(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", *SMALL, "data.n_train=200", "data.n_test=100", "trainer.max_epochs=2",
                      "data.val_size=40", "optim.lr=0.001,0.01", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert set(summary["ranked_by"]) == {"best_val_acc"} and sorted(summary["rank"]) in ([1, 2], [1, 1])
    for job in (0, 1):
        assert (sweep_dir / str(job) / "model_best.pt").is_file()
        record = json.loads((sweep_dir / str(job) / "run.json").read_text())
        assert record["best_val_acc"] == summary.loc[job, "best_val_acc"]
        assert record["test_acc_at_best"] == summary.loc[job, "test_acc_at_best"]
    assert (sweep_dir / "compare_val_acc.png").read_bytes()[:4] == b"\x89PNG"
    assert "Best by best_val_acc: job" in result.stdout + result.stderr
