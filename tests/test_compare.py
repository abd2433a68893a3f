"""python -m cnnexp.compare: runs and sweeps side by side, from their files alone (no training here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from cnnexp.compare import main
from cnnexp.errors import ConfigError
from cnnexp.sweep.compare import collect, comparison_table, expand, readable


def make_run(run_dir: Path, test_acc: list[float], lr: float, val_acc: list[float] | None = None,
             name: str | None = None, tags=(), wall: float = 12.345678) -> Path:
    """A finished run's files as cnnexp writes them: metrics.csv, run.json, .hydra/config.yaml."""
    (run_dir / ".hydra").mkdir(parents=True)
    columns = ["epoch", "train_loss", "train_acc", *(["val_loss", "val_acc"] if val_acc else []), "test_loss",
               "test_acc", "lr"]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for i, acc in enumerate(test_acc):
            row = {"epoch": i + 1, "train_loss": 2.0 - i / 10, "train_acc": acc, "test_loss": 2.0 - acc,
                   "test_acc": acc, "lr": lr}
            if val_acc:
                row.update(val_loss=2.0 - val_acc[i], val_acc=val_acc[i])
            writer.writerow(row)
    record = {"status": "completed", "wall_seconds": wall, "tags": list(tags), **({"name": name} if name else {})}
    (run_dir / "run.json").write_text(json.dumps(record))
    config = {"model": {"_target_": "cnnexp.models.TutorialCNN"}, "optim": {"lr": lr, "momentum": 0.9},
              "trainer": {"max_epochs": len(test_acc), "progress": "none"}, "name": name, "tags": list(tags)}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture
def mixed(tmp_path):
    """A lone run and a two-job sweep, all with a validation split."""
    run = make_run(tmp_path / "outputs" / "run", [0.30, 0.52, 0.50], 0.001, val_acc=[0.3, 0.5, 0.49],
                   name="baseline", tags=["first"])
    sweep = tmp_path / "multirun" / "sweep"
    make_run(sweep / "0", [0.40, 0.45, 0.61234567], 0.01, val_acc=[0.41, 0.47, 0.46])
    make_run(sweep / "1", [0.20, 0.25, 0.30], 0.1, val_acc=[0.2, 0.26, 0.3])
    (sweep / "multirun.yaml").write_text("{}\n")
    return run, sweep


def test_a_run_and_a_sweep_become_one_table_sorted_by_the_test_accuracy_at_the_selected_epoch(mixed):
    run, sweep = mixed
    table = comparison_table(collect(expand([str(run), str(sweep)])))
    # sorted by the test accuracy at the selected epoch (0.52, 0.45, 0.30), not by the final one
    assert list(table["run"]) == ["baseline", "sweep/0", "sweep/1"]
    assert list(table["rank"]) == [1, 2, 3]
    # selected by validation accuracy (results/objective.py), not by the test accuracy
    assert list(table["selected_epoch"]) == [2, 2, 3]
    assert list(table["test_acc_at_selected"]) == pytest.approx([0.52, 0.45, 0.30])
    assert list(table["val_acc_at_selected"]) == pytest.approx([0.5, 0.47, 0.3])
    assert list(table["final_test_acc"]) == pytest.approx([0.50, 0.61234567, 0.30])
    assert list(table["epochs"]) == [3, 3, 3]
    assert list(table["tags"]) == ["first", "", ""]
    # the config keys that differ, and only those (not how the runs were named or watched)
    assert "optim.lr" in table and "optim.momentum" not in table and "trainer.progress" not in table
    assert list(table["optim.lr"]) == [0.001, 0.01, 0.1]


def test_a_loss_metric_sorts_lowest_first(mixed):
    table = comparison_table(collect(expand([str(p) for p in mixed])), metric="test_loss")
    assert list(table["test_loss_at_selected"]) == sorted(table["test_loss_at_selected"])
    assert table["run"].iloc[0] == "baseline"


def test_globs_are_expanded_and_the_terminal_rounds_while_the_csv_keeps_full_precision(mixed, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([str(tmp_path / "multirun" / "sweep" / "*"), str(tmp_path / "outputs" / "run"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0.6123" in printed and "0.61234567" not in printed  # 4 significant digits on the terminal
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["final_test_acc"] for r in rows} >= {"0.61234567"}
    assert {r["wall_seconds"] for r in rows} == {"12.345678"}
    figures = sorted(p.name for p in out.glob("*.png"))
    assert "compare_test_acc.png" in figures and "compare_val_acc.png" in figures
    assert "12.35" in readable(comparison_table(collect([tmp_path / "outputs" / "run"])))


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "nosuch: no such run or sweep directory"),
    (["{tmp}"], "is neither a run directory"),
    (["{run}", "--metric", "val_accuracy"], "--metric val_accuracy: no run has that metrics.csv column"),
])
def test_bad_input_is_one_line_and_exit_2(mixed, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path / "empty", run=mixed[0]) for a in args]
    assert main([*args, "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_path_that_names_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="no such run or sweep directory"):
        expand(["/nonexistent/*/run"])
