"""Sweeps: complete job dirs, summary.csv, comparison plots, failures, launchers, resuming."""

import json
import os
import signal
import threading

import pandas as pd
import pytest

from cnnexp.cli import unique_dir
from conftest import SMALL, run_cli, start_cli, wait_for_rows

SWEEP = ["-m", *SMALL, "data.n_train=200", "data.n_test=100", "trainer.max_epochs=2"]
JOB_FILES = ["metrics.csv", "per_class.csv", "model.pt", "run.json", "plots/test_acc.png"]
COMPARISONS = ["compare_test_acc.png", "compare_test_loss.png", "compare_train_loss.png"]


def sweep(tmp_path, *args, name="sweep"):
    sweep_dir = tmp_path / name
    result = run_cli([*SWEEP, *args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    return result, sweep_dir


def test_two_job_sweep_is_summarised_and_plotted(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01")
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "multirun.yaml").is_file()
    for job in ("0", "1"):
        for name in JOB_FILES:
            assert (sweep_dir / job / name).is_file(), f"{job}/{name}"
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["job"]) == [0, 1]
    assert list(summary["optim.lr"]) == [0.001, 0.01]
    assert list(summary["status"]) == ["completed", "completed"]
    for column in ("best_test_acc", "best_epoch", "final_test_acc", "final_train_loss", "wall_seconds", "run_dir"):
        assert summary[column].notna().all(), column
    metrics = pd.read_csv(sweep_dir / "1" / "metrics.csv")
    assert summary.loc[1, "final_test_acc"] == pytest.approx(metrics["test_acc"].iloc[-1])
    assert summary.loc[1, "best_test_acc"] == pytest.approx(metrics["test_acc"].max())
    for name in COMPARISONS:
        assert (sweep_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_seed_sweep_reports_mean_and_std(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01", "trainer.seed=0,1")
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 4 and summary["group"].nunique() == 2
    for group, members in summary.groupby("group"):
        values = members["final_test_acc"]
        assert members["group_mean_final_test_acc"].iloc[0] == pytest.approx(values.mean())
        assert members["group_std_final_test_acc"].iloc[0] == pytest.approx(values.std(ddof=0))
        assert group.startswith("optim.lr=")


def test_failed_job_is_recorded_and_the_rest_kept(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.01,-1")
    assert result.returncode != 0
    assert "job 1 failed" in result.stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "failed"]
    assert "optim.lr" in summary.loc[1, "error"]
    assert (sweep_dir / "0" / "model.pt").is_file()
    assert "optim.lr" in (sweep_dir / "1" / "cnnexp.log").read_text()

    (sweep_dir / "summary.csv").unlink()
    for name in COMPARISONS:
        (sweep_dir / name).unlink()
    replot = run_cli([str(sweep_dir)], cwd=tmp_path, module="cnnexp.plot")
    assert replot.returncode == 0, replot.stderr
    assert list(pd.read_csv(sweep_dir / "summary.csv")["status"]) == ["completed", "failed"]
    assert all((sweep_dir / name).is_file() for name in COMPARISONS)


def test_crashing_job_keeps_its_traceback_in_the_log(tmp_path):
    # A model class that does not exist fails inside the job, not in the config.
    result, sweep_dir = sweep(tmp_path, "model._target_=cnnexp.models.TutorialCNN,cnnexp.models.Missing")
    assert result.returncode != 0
    log = (sweep_dir / "1" / "cnnexp.log").read_text()
    assert "Traceback" in log
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "failed"]


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr
    records = [json.loads((sweep_dir / j / "run.json").read_text()) for j in ("0", "1")]
    assert all(r["status"] == "completed" for r in records)
    cores = len(os.sched_getaffinity(0))
    assert all(r["threads"]["eval"] == max(1, cores // 2) for r in records)  # a fair share of the cores
    assert len(pd.read_csv(sweep_dir / "summary.csv")) == 2


def test_submitit_local_launcher_runs_real_jobs(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01", "hydra/launcher=submitit_local")
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "completed"]


def test_rerun_into_the_same_sweep_dir_skips_completed_and_continues_the_rest(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01")
    assert result.returncode == 0, result.stderr
    done = (sweep_dir / "0" / "metrics.csv").stat().st_mtime_ns
    record = json.loads((sweep_dir / "1" / "run.json").read_text())
    record["status"] = "interrupted"  # as if the sweep had been stopped during job 1
    (sweep_dir / "1" / "run.json").write_text(json.dumps(record))

    again, _ = sweep(tmp_path, "optim.lr=0.001,0.01")
    assert again.returncode == 0, again.stderr
    assert "already completed; skipping" in again.stderr
    assert (sweep_dir / "0" / "metrics.csv").stat().st_mtime_ns == done
    assert "from its last checkpoint" in (sweep_dir / "1" / "cnnexp.log").read_text()
    assert json.loads((sweep_dir / "1" / "run.json").read_text())["status"] == "completed"
    assert len(pd.read_csv(sweep_dir / "1" / "metrics.csv")) == 2


def test_rerun_with_other_overrides_is_refused(tmp_path):
    assert sweep(tmp_path, "optim.lr=0.001")[0].returncode == 0
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.5")
    assert result.returncode != 0 and "same sweep command" in result.stderr
    assert json.loads((sweep_dir / "0" / "run.json").read_text())["status"] == "completed"


def test_runs_started_together_get_different_directories(tmp_path):
    target = str(tmp_path / "outputs" / "2026-01-01" / "12-00-00")
    results = []
    threads = [threading.Thread(target=lambda: results.append(unique_dir(target))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 8
    assert all(os.path.isdir(r) for r in results)


def test_interrupted_sweep_is_summarised_then_resumed(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *SMALL, "data.n_train=1200", "trainer.max_epochs=4", "optim.lr=0.001,0.01",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = start_cli(args, cwd=tmp_path)
    wait_for_rows(sweep_dir / "0" / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert f"hydra.sweep.dir={sweep_dir}" in stderr
    assert list(pd.read_csv(sweep_dir / "summary.csv")["status"]) == ["interrupted"]
    assert not (sweep_dir / "1").exists()  # the sweep stopped with the job

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert list(pd.read_csv(sweep_dir / "summary.csv")["status"]) == ["completed", "completed"]
    assert [int(e) for e in pd.read_csv(sweep_dir / "0" / "metrics.csv")["epoch"]] == [1, 2, 3, 4]


def test_rerun_after_resuming_one_job_by_hand_is_not_refused(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01")
    assert result.returncode == 0, result.stderr
    longer = run_cli([f"trainer.resume={sweep_dir / '0'}", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'r'}"],
                     cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    again, _ = sweep(tmp_path, "optim.lr=0.001,0.01")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already completed; skipping") == 2
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "completed"] and list(summary["epochs"]) == [3, 2]
