"""Sweeps: complete job dirs, summary.csv, comparison plots, failures, launchers, resuming."""

import json
import os
import signal
import threading

import pandas as pd
import pytest

from cnnexp.cli import unique_dir
from cnnexp.sweep.table import GROUPED_METRICS
from conftest import SMALL, run_cli, start_cli, wait_for_rows, write_module

SWEEP = ["-m", *SMALL, "data.n_train=200", "data.n_test=100", "trainer.max_epochs=2"]
JOB_FILES = ["metrics.csv", "per_class.csv", "model.pt", "run.json", "plots/test_acc.png"]
COMPARISONS = ["compare_test_acc.png", "compare_test_loss.png", "compare_train_loss.png"]


def sweep(tmp_path, *args, name="sweep"):
    sweep_dir = tmp_path / name
    result = run_cli([*SWEEP, *args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    return result, sweep_dir


@pytest.fixture(scope="module")
def two_job_sweep(tmp_path_factory):
    """One finished two-job sweep, shared by the tests that read it, re-run it and
    (last, in file order) resume one of its jobs."""
    tmp = tmp_path_factory.mktemp("two_jobs")
    result, sweep_dir = sweep(tmp, "optim.lr=0.001,0.01")
    assert result.returncode == 0, result.stderr
    return tmp, sweep_dir


@pytest.mark.slow
def test_two_job_sweep_is_summarised_and_plotted(two_job_sweep):
    _, sweep_dir = two_job_sweep
    assert (sweep_dir / "multirun.yaml").is_file()
    for job in ("0", "1"):
        for name in JOB_FILES:
            assert (sweep_dir / job / name).is_file(), f"{job}/{name}"
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["job"]) == [0, 1]
    assert list(summary["optim.lr"]) == [0.001, 0.01]
    assert list(summary["status"]) == ["completed", "completed"]
    for job in (0, 1):  # every column is the job's own number, read back from its files
        metrics = pd.read_csv(sweep_dir / str(job) / "metrics.csv")
        record = json.loads((sweep_dir / str(job) / "run.json").read_text())
        row = summary.loc[job]
        assert row["final_test_acc"] == pytest.approx(metrics["test_acc"].iloc[-1])
        assert row["best_test_acc"] == pytest.approx(metrics["test_acc"].max())
        assert row["best_epoch"] == metrics["epoch"][metrics["test_acc"].idxmax()]
        assert row["final_train_loss"] == pytest.approx(metrics["train_loss"].iloc[-1])
        assert row["wall_seconds"] == pytest.approx(record["wall_seconds"])
        assert row["epochs"] == 2
        assert os.path.samefile(row["run_dir"], sweep_dir / str(job))
    for name in COMPARISONS:
        assert (sweep_dir / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_seed_sweep_reports_mean_and_std(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01", "trainer.seed=0,1")
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 4 and summary["group"].nunique() == 2
    for group, members in summary.groupby("group"):
        assert len(members) == 2 and group.startswith("optim.lr=") and "trainer.seed" not in group
        for metric in GROUPED_METRICS:
            values = members[metric].to_numpy()
            assert members[f"group_mean_{metric}"].tolist() == pytest.approx([values.mean()] * 2), metric
            sample_std = abs(values[0] - values[1]) / 2**0.5  # n - 1 = 1
            assert members[f"group_std_{metric}"].tolist() == pytest.approx([sample_std] * 2), metric


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_rest_kept(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.01,-1")
    assert result.returncode == 1  # as the README says of a sweep with failed jobs
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


@pytest.mark.slow
def test_crashing_job_keeps_its_traceback_in_the_log(tmp_path):
    # A model with a bug: it passes every config check and fails inside the job.
    write_module(tmp_path, "buggy", "from cnnexp.models import TutorialCNN\n\n"
                 "class Buggy(TutorialCNN):\n"
                 "    def forward(self, x):\n"
                 "        if x.shape[0] > 1:  # one image (the build probe) passes; a batch fails\n"
                 "            raise ZeroDivisionError('a bug in the model')\n"
                 "        return super().forward(x)\n")
    result, sweep_dir = sweep(tmp_path, "model._target_=cnnexp.models.TutorialCNN,buggy.Buggy")
    assert result.returncode == 1
    log = (sweep_dir / "1" / "cnnexp.log").read_text()
    assert "Traceback" in log and "a bug in the model" in log
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "failed"]
    assert summary.loc[1, "error"] == "ZeroDivisionError: a bug in the model"


THREAD_PROBE = """
import json, os
from pathlib import Path

import torch
from cnnexp.models import TutorialCNN

class ThreadProbe(TutorialCNN):
    \"\"\"Records the torch thread counts its forward passes really ran with.\"\"\"
    seen = {"train": set(), "eval": set()}

    def forward(self, x):
        self.seen["train" if self.training else "eval"].add(torch.get_num_threads())
        out = Path(f"threads-{os.getpid()}.json")
        out.write_text(json.dumps({k: sorted(v) for k, v in self.seen.items()}))
        return super().forward(x)
"""


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_at_once_with_their_share_of_the_cores(tmp_path):
    write_module(tmp_path, "probe", THREAD_PROBE)
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                              "model._target_=probe.ThreadProbe", "trainer.device=cpu")
    assert result.returncode == 0, result.stderr
    records = [json.loads((sweep_dir / j / "run.json").read_text()) for j in ("0", "1")]
    assert all(r["status"] == "completed" for r in records)
    # Two processes, alive at the same time: each started before the other ended.
    assert records[0]["pid"] != records[1]["pid"]
    assert max(r["started_at"] for r in records) < min(r["ended_at"] for r in records)
    cores = len(os.sched_getaffinity(0))
    for record in records:
        assert record["threads"]["eval"] == max(1, cores // 2)  # a fair share of the cores
        seen = json.loads((tmp_path / f"threads-{record['pid']}.json").read_text())
        # The plan is what torch really ran with: training steps and evaluation.
        assert seen["eval"] == [record["threads"]["eval"]] and seen["train"][-1] == record["threads"]["train"]
    assert len(pd.read_csv(sweep_dir / "summary.csv")) == 2


@pytest.mark.slow
def test_ctrl_c_on_a_joblib_sweep_is_one_hint_and_the_sweep_continues(tmp_path):
    args = [*SWEEP, "trainer.max_epochs=30", "optim.lr=0.001,0.01", "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sweep", "trainer.device=cpu"]
    proc = start_cli(args, cwd=tmp_path, new_session=True)
    wait_for_rows(tmp_path / "sweep" / "0" / "metrics.csv", 1, proc)
    wait_for_rows(tmp_path / "sweep" / "1" / "metrics.csv", 1, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "the sweep, run the same command with\n  hydra.sweep.dir=" in stderr, stderr[-3000:]
    statuses = [json.loads((tmp_path / "sweep" / j / "run.json").read_text())["status"] for j in ("0", "1")]
    assert statuses == ["interrupted", "interrupted"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_real_jobs(tmp_path):
    result, sweep_dir = sweep(tmp_path, "optim.lr=0.001,0.01", "hydra/launcher=submitit_local")
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "completed"]


@pytest.mark.slow
def test_summary_as_each_job_ends_and_a_killed_sweep_continues_where_it_stopped(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *SMALL, "data.n_train=1200", "trainer.max_epochs=3", "optim.lr=0.001,0.01",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = start_cli(args, cwd=tmp_path)
    wait_for_rows(sweep_dir / "1" / "metrics.csv", 1, proc)
    # Job 0 has ended, so summary.csv already tells its result.
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["job"]) == [0] and list(summary["status"]) == ["completed"]
    assert summary.loc[0, "epochs"] == 3 and summary.loc[0, "final_test_acc"] > 0
    proc.kill()  # no chance to write anything more
    proc.communicate()
    done = (sweep_dir / "0" / "metrics.csv").stat().st_mtime_ns
    before = json.loads((sweep_dir / "1" / "run.json").read_text())
    assert before["status"] == "running" and before["epochs_completed"] < 3

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already completed; skipping" in again.stderr
    assert (sweep_dir / "0" / "metrics.csv").stat().st_mtime_ns == done
    log = (sweep_dir / "1" / "cnnexp.log").read_text()
    assert "from its last checkpoint" in log and f"Resuming at epoch {before['epochs_completed'] + 1}" in log
    record = json.loads((sweep_dir / "1" / "run.json").read_text())
    assert record["status"] == "completed" and record["resumes"][0]["from_epoch"] == before["epochs_completed"] + 1
    assert [int(e) for e in pd.read_csv(sweep_dir / "1" / "metrics.csv")["epoch"]] == [1, 2, 3]
    assert list(pd.read_csv(sweep_dir / "summary.csv")["status"]) == ["completed", "completed"]


@pytest.mark.slow
def test_rerun_with_other_overrides_is_refused(two_job_sweep):
    tmp_path, sweep_dir = two_job_sweep
    before = (sweep_dir / "0" / "run.json").read_text()
    result, _ = sweep(tmp_path, "optim.lr=0.5")
    assert result.returncode == 2 and "same sweep command" in result.stderr  # refused like a config error
    assert (sweep_dir / "0" / "run.json").read_text() == before  # the other job's results untouched


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_rerun_after_resuming_one_job_by_hand_is_not_refused(two_job_sweep):
    tmp_path, sweep_dir = two_job_sweep
    longer = run_cli([f"trainer.resume={sweep_dir / '0'}", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'r'}"],
                     cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    again, _ = sweep(tmp_path, "optim.lr=0.001,0.01")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already completed; skipping") == 2
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "completed"] and list(summary["epochs"]) == [3, 2]


def fake_job(sweep_dir, job, seed, lr, test_acc, train_loss, test_loss=(2.0, 2.0, 2.0)):
    """A finished job's directory as cnnexp leaves it: overrides, run.json, metrics.csv."""
    job_dir = sweep_dir / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- trainer.seed={seed}\n")
    (job_dir / "run.json").write_text(json.dumps({"status": "completed", "wall_seconds": 1.0}))
    pd.DataFrame({"epoch": [1, 2, 3], "train_loss": train_loss, "train_acc": [0.1] * 3, "test_loss": list(test_loss),
                  "test_acc": test_acc, "lr": [lr] * 3}).to_csv(job_dir / "metrics.csv", index=False)


def test_seed_groups_use_the_sample_std_in_every_column_and_band(tmp_path, monkeypatch):
    import matplotlib.axes
    import numpy as np

    from cnnexp.sweep.summary import write_summary

    accs = {0: [0.2, 0.5, 0.4], 1: [0.3, 0.6, 0.5], 2: [0.1, 0.2, 0.6]}
    losses = {0: [2.0, 1.5, 1.0], 1: [2.2, 1.4, 1.2], 2: [2.1, 1.0, 0.7]}
    test_losses = {0: [2.3, 2.0, 1.9], 1: [2.2, 2.1, 1.6], 2: [2.4, 1.7, 1.8]}
    for job, seed in enumerate(accs):
        fake_job(tmp_path, job, seed, 0.01, accs[seed], losses[seed], test_losses[seed])
    drawn = []
    fill_between = matplotlib.axes.Axes.fill_between

    def record_band(ax, x, low, high, **kw):
        drawn.append((ax, np.asarray(x), np.asarray(low), np.asarray(high)))
        return fill_between(ax, x, low, high, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", record_band)
    table = write_summary(tmp_path, plots=True)
    expected = {"best_test_acc": [0.5, 0.6, 0.6], "final_test_acc": [0.4, 0.5, 0.6], "final_train_loss": [1.0, 1.2, 0.7]}
    for metric in GROUPED_METRICS:
        values = expected[metric] if metric in expected else table[metric]
        assert table[f"group_mean_{metric}"].tolist() == pytest.approx([np.mean(values)] * 3), metric
        assert table[f"group_std_{metric}"].tolist() == pytest.approx([np.std(values, ddof=1)] * 3), metric
    # Each comparison plot has one band: mean ± the sample std per epoch, in the plot's units.
    bands = {ax.get_title(): band for ax, *band in drawn}  # the title is set once the lines are drawn
    assert len(bands) == len(drawn)
    curves = {"Test accuracy": (accs, 100), "Training loss": (losses, 1), "Test loss": (test_losses, 1)}
    assert sorted(bands) == sorted(f"{name} (mean ± std over seeds)" for name in curves)
    for name, (per_seed, scale) in curves.items():
        x, low, high = bands[f"{name} (mean ± std over seeds)"]
        values = scale * np.array(list(per_seed.values()))
        assert x.tolist() == [1, 2, 3]
        assert ((high + low) / 2).tolist() == pytest.approx(values.mean(axis=0).tolist()), name
        assert ((high - low) / 2).tolist() == pytest.approx(values.std(axis=0, ddof=1).tolist()), name
