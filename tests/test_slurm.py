"""Sweeps through a real SLURM scheduler (`hydra/launcher=slurm`).

The tests marked `slurm` need a working cluster: `.ci/slurm-up` (as root on
Debian) starts a single-node one on this machine. Without one they skip and
say why; with CNNEXP_REQUIRE_SLURM=1 (set by .ci/run once the cluster is up)
they fail instead. CNNEXP_SLURM_PARTITION picks the partition (default: the
cluster's default partition).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cnnexp.cpu import available_cores
from cnnexp.sweep.slurm import queue_watcher, record_lost_job
from conftest import SMALL, run_cli, start_cli, wait_for_rows

JOB_FILES = ["metrics.csv", "per_class.csv", "model.pt", "run.json", "plots/test_acc.png", "cnnexp.log"]
COMPARISONS = ["compare_test_acc.png", "compare_test_loss.png", "compare_train_loss.png"]


def _cluster_problem() -> tuple[str | None, str | None]:
    """(partition, None) for a usable cluster, else (None, why not)."""
    if os.environ.get("CNNEXP_SLURM_UNAVAILABLE"):
        return None, os.environ["CNNEXP_SLURM_UNAVAILABLE"]
    if shutil.which("sbatch") is None:
        return None, "no `sbatch` on PATH: no SLURM here (as root on Debian, .ci/slurm-up starts a test cluster)"
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%P %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"`sinfo` did not answer: {err}"
    if out.returncode != 0:
        return None, (f"`sinfo` failed, the SLURM controller is not reachable: {out.stderr.strip()} "
                      "(.ci/slurm-up starts the test cluster)")
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    wanted = os.environ.get("CNNEXP_SLURM_PARTITION")
    if wanted is None:
        defaults = [p for p, _ in rows if p.endswith("*")]
        wanted = (defaults or [p for p, _ in rows] or [None])[0]
    if wanted is None:
        return None, "the SLURM cluster has no partition"
    wanted = wanted.rstrip("*")
    states = [s for p, s in rows if p.rstrip("*") == wanted]
    if not any(s in ("idle", "mix", "alloc", "comp") for s in states):  # "idle*" etc.: not responding
        return None, f"no node of SLURM partition {wanted!r} is up (states: {states or 'none'})"
    return wanted, None


@pytest.fixture(scope="module")
def partition() -> str:
    name, problem = _cluster_problem()
    if problem:
        if os.environ.get("CNNEXP_REQUIRE_SLURM") == "1":
            pytest.fail(f"CNNEXP_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    return name


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (the controller keeps finished jobs for MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                         check=True).stdout
    fields = {}
    for item in out.split():
        key, sep, value = item.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


def settled_job(job_id: str, timeout: float = 60) -> dict[str, str]:
    """scontrol's record of a job once it has ended. The sweep returns when
    every job has written its result; the process exits and SLURM tears the
    job down (RUNNING -> COMPLETING -> COMPLETED) a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        job = scontrol_job(job_id)
        if job["JobState"] not in ("RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def slurm_job_id(job_dir) -> str:
    """The SLURM job id Hydra recorded for a job (array_task form, e.g. 12_0)."""
    hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())
    return str(hydra_cfg["hydra"]["job"]["id"])


TINY = [*SMALL, "data.n_train=200", "data.n_test=100", "trainer.max_epochs=2"]


def launcher_args(partition: str) -> list[str]:
    """The slurm preset sized for the test cluster's node: 1 CPU, 1 GB, no GPU per job."""
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]


def slurm_sweep(tmp_path, partition, *args, data=TINY, name="sweep"):
    sweep_dir = tmp_path / name
    result = run_cli(["-m", *data, *launcher_args(partition), *args, f"hydra.sweep.dir={sweep_dir}"],
                     cwd=tmp_path, timeout=240)
    return result, sweep_dir


@pytest.fixture(scope="module")
def two_job_sweep(partition, tmp_path_factory):
    """One 2-job sweep through SLURM with the preset's fields set to telling values."""
    tmp_path = tmp_path_factory.mktemp("slurm")
    return slurm_sweep(tmp_path, partition, "optim.lr=0.001,0.01", "hydra.launcher.timeout_min=7",
                       "hydra.launcher.array_parallelism=1")


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_runs_one_slurm_job_per_hydra_job(two_job_sweep):
    result, sweep_dir = two_job_sweep
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        for name in JOB_FILES:
            assert (sweep_dir / job / name).is_file(), f"{job}/{name}"
    ids = [slurm_job_id(sweep_dir / job) for job in ("0", "1")]
    assert len(set(ids)) == 2
    jobs = [settled_job(i) for i in ids]
    assert all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    assert {j["ArrayJobId"] for j in jobs} == {ids[0].split("_")[0]}  # one array, one task per Hydra job
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "completed"]
    assert list(summary["optim.lr"]) == [0.001, 0.01]
    for name in COMPARISONS:
        assert (sweep_dir / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slurm
@pytest.mark.slow
def test_preset_fields_reach_the_slurm_job(two_job_sweep, partition):
    result, sweep_dir = two_job_sweep
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        submitted = scontrol_job(slurm_job_id(sweep_dir / job))
        assert submitted["Partition"] == partition
        assert submitted["TimeLimit"] == "00:07:00"  # timeout_min=7
        assert submitted["CPUs/Task"] == "1"
        assert submitted["MinMemoryNode"] == "1G"
        assert submitted["TresPerNode"] == "gres:gpu:0"  # gpus_per_node=0
        assert submitted["ArrayTaskThrottle"] == "1"  # array_parallelism=1
        assert submitted["JobName"] == "cnnexp"
        threads = json.loads((sweep_dir / job / "run.json").read_text())["threads"]
        assert threads == {"train": 1, "eval": 1}  # the job's cpus_per_task, not the node's cores


class StartRequeuedJobsNow(threading.Thread):
    """A requeued job waits two minutes (SLURM's rule) before it may start
    again; this moves the start of the sweep's pending jobs to now."""

    def __init__(self, sweep_dir):
        super().__init__(daemon=True)
        self.sweep_dir, self.done = sweep_dir, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            for hydra_yaml in self.sweep_dir.glob("*/.hydra/hydra.yaml"):
                try:
                    job_id = slurm_job_id(hydra_yaml.parent.parent)
                    if scontrol_job(job_id)["JobState"] == "PENDING":
                        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                       capture_output=True)
                except Exception:  # a hydra.yaml being written, a job not known yet: next round
                    pass


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_and_signalled_jobs_continue_from_their_checkpoints(partition, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 4000 steps per epoch (2-3 s with the compiled step): the signal lands well inside epoch 2
    # also on a fast machine (at 1000 steps an epoch took 0.7 s, and a signal could arrive after it).
    proc = start_cli(["-m", *SMALL, "data.n_train=16000", "data.n_test=100", "trainer.max_epochs=2",
                      "optim.lr=0.001,0.002,0.003", *launcher_args(partition), f"hydra.sweep.dir={sweep_dir}"],
                     cwd=tmp_path)
    starter = StartRequeuedJobsNow(sweep_dir)
    starter.start()
    # Each job is stopped in its second epoch, in one of three ways: requeued
    # by SLURM, SIGTERM (pre-emption), SIGUSR2 (the time limit is near).
    actions = {"0": ["scontrol", "requeue"], "1": ["scancel", "--signal=TERM"], "2": ["scancel", "--signal=USR2"]}
    first_rows, ids = {}, {}
    try:
        for job, command in actions.items():
            metrics = sweep_dir / job / "metrics.csv"
            wait_for_rows(metrics, 1, proc, timeout=150)
            ids[job] = slurm_job_id(sweep_dir / job)
            subprocess.run([*command, ids[job]], check=True)
            first_rows[job] = metrics.read_text().splitlines()[1]
        _, stderr = proc.communicate(timeout=240)
    finally:
        starter.done.set()
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", *ids.values()], capture_output=True)
    assert proc.returncode == 0, stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed"] * 3
    for job, job_id in ids.items():
        assert settled_job(job_id)["Restarts"] == "1", job
        metrics = sweep_dir / job / "metrics.csv"
        assert [int(e) for e in pd.read_csv(metrics)["epoch"]] == [1, 2], job
        assert metrics.read_text().splitlines()[1] == first_rows[job], job  # epoch 1 was not trained again
        assert "from its last checkpoint" in (sweep_dir / job / "cnnexp.log").read_text(), job


def make_image_folder(root):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def kill_when_running(array_task: str, workdir, proc, timeout: float = 150) -> str:
    """SIGKILL the sweep's array task `_N` (submitted from workdir) once it runs, as the
    out-of-memory killer or a lost node would; returns its job id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i %T %Z"], capture_output=True,
                             text=True).stdout
        for job_id, state, job_workdir in (line.split() for line in out.splitlines() if line.strip()):
            if job_id.endswith(array_task) and job_workdir == str(workdir) and state == "RUNNING":
                subprocess.run(["scancel", "--full", "--signal=KILL", job_id], check=True)
                return job_id
        time.sleep(0.2)
    raise AssertionError(f"no running SLURM job {array_task} from {workdir}")


@pytest.mark.slurm
@pytest.mark.slow
def test_failed_and_killed_jobs_are_recorded_and_the_others_complete(partition, tmp_path):
    good, other = make_image_folder(tmp_path / "images"), make_image_folder(tmp_path / "images2")
    missing = tmp_path / "not-on-the-node"
    sweep_dir = tmp_path / "sweep"
    proc = start_cli(["-m", "data=imagefolder", "trainer.max_epochs=1", "trainer.progress=log",
                      f"data.root={good},{missing},{other}", *launcher_args(partition),
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    try:
        killed = kill_when_running("_2", tmp_path, proc)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "job 1 failed" in stderr and "job 2 failed" in stderr
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "failed", "failed"]
    assert str(missing) in summary.loc[1, "error"]  # the job's own error, from the node
    assert f"SLURM job {killed} ended without a result" in summary.loc[2, "error"]
    assert json.loads((sweep_dir / "2" / "run.json").read_text())["status"] == "failed"
    for name in JOB_FILES:
        assert (sweep_dir / "0" / name).is_file(), name
    assert all((sweep_dir / name).is_file() for name in COMPARISONS)


@pytest.mark.slurm
@pytest.mark.slow
def test_unknown_partition_or_impossible_job_is_one_clear_error_and_writes_nothing(partition, tmp_path):
    result = run_cli(["-m", *SMALL, "optim.lr=0.001,0.01", "hydra/launcher=slurm",
                      "hydra.launcher.partition=no-such-partition"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "no partition 'no-such-partition'" in result.stderr
    assert partition in result.stderr  # names the partitions there are
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "multirun").exists()

    # More CPUs per job than any node has: sbatch --test-only refuses it before anything is written.
    result = run_cli(["-m", *SMALL, "optim.lr=0.001,0.01", *launcher_args(partition),
                      "hydra.launcher.cpus_per_task=4096"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Requested node configuration is not available" in result.stderr
    assert "cpus_per_task" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_slurm_launcher_without_slurm_is_one_clear_error_and_writes_nothing(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", *SMALL, "optim.lr=0.001,0.01", "hydra/launcher=slurm",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env={"PATH": str(empty)}, timeout=120)
    assert result.returncode == 2
    assert "needs SLURM" in result.stderr and "sbatch" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sweep_dir.exists()


def test_queue_watcher_reads_squeue_and_notices_jobs_that_left_the_queue():
    watcher = queue_watcher()(delay_s=600)
    for job_id in ("7_0", "7_1", "8"):
        watcher.register_job(job_id)
    watcher._info_dict.update(watcher.read_info("7_0|RUNNING|vm\n7_1|PENDING|\n8|RUNNING|vm\n"))
    assert watcher.get_state("7_0", mode="cache") == "RUNNING"
    assert not watcher.is_done("7_1", mode="cache")
    # later: 7_0 finished and left the controller's memory; 8 was requeued
    watcher._info_dict.update(watcher.read_info(b"7_1|RUNNING|vm\n8|PENDING|\n"))
    assert watcher.is_done("7_0", mode="cache")
    assert not watcher.is_done("7_1", mode="cache") and not watcher.is_done("8", mode="cache")


def test_a_slurm_job_uses_its_cpus_per_task_even_where_slurm_does_not_bind_it(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    everything = available_cores()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cores() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(everything + 8))  # never more than the process may use
    assert available_cores() == everything


def test_a_lost_job_is_recorded_as_failed_keeping_what_it_had_recorded(tmp_path):
    running = {"status": "running", "started_at": "2026-01-01T00:00:00+00:00", "overrides": ["optim.lr=0.1"],
               "epochs_completed": 3, "wall_seconds": 12.5}
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "run.json").write_text(json.dumps(running))
    record_lost_job(tmp_path / "0", ["optim.lr=0.1"], "SLURM job 5_0 ended without a result")
    record = json.loads((tmp_path / "0" / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == "SLURM job 5_0 ended without a result"
    assert {k: record[k] for k in ("started_at", "overrides", "epochs_completed", "wall_seconds")} == {
        k: running[k] for k in ("started_at", "overrides", "epochs_completed", "wall_seconds")}

    record_lost_job(tmp_path / "1", ["optim.lr=0.2"], "lost before it started")  # no directory yet
    assert json.loads((tmp_path / "1" / "run.json").read_text())["overrides"] == ["optim.lr=0.2"]

    done = {**running, "status": "completed"}
    (tmp_path / "0" / "run.json").write_text(json.dumps(done))
    record_lost_job(tmp_path / "0", ["optim.lr=0.1"], "late news")
    assert json.loads((tmp_path / "0" / "run.json").read_text()) == done


@pytest.mark.slow
def test_slurm_launcher_without_a_sweep_says_it_trains_here(tmp_path):
    result = run_cli([*SMALL, "data.n_train=100", "data.n_test=50", "trainer.max_epochs=1", "hydra/launcher=slurm"],
                     cwd=tmp_path, env={"PATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "applies to sweeps only" in result.stderr and "Add -m" in result.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_a_search_runs_as_worker_jobs_that_share_the_trials(partition, tmp_path):
    """A search on SLURM: n_jobs worker jobs, each taking trials from the shared study (a
    journal file in the sweep dir by default) until it holds n_trials. In this file, so that
    it never shares the one-node test cluster with the other SLURM tests at the same time."""
    optuna = pytest.importorskip("optuna")
    from cnnexp.sweep.storage import open_storage

    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/sweeper=optuna", *TINY, "trainer.cpu_step=eager", "trainer.progress=none",
                      *launcher_args(partition), "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=3",
                      "hydra.sweeper.pruner=none", "optim.lr=tag(log, interval(1e-3, 3e-2))",
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitted 2 search worker job(s)" in result.stderr + result.stdout
    assert (sweep / "optuna.journal").is_file() and not (sweep / "optuna.db").exists()  # the cluster default
    study = optuna.load_study(study_name="cnnexp", storage=open_storage(f"journal:{sweep / 'optuna.journal'}"))
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert {t.user_attrs["cnnexp.worker"] for t in trials} == {0, 1}  # both worker jobs took trials
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["trial"]) == [0, 1, 2] and list(summary["rank"]) == [1, 2, 3]
    assert all((sweep / str(n) / "run.json").is_file() for n in range(3))
