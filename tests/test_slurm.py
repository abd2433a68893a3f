"""Sweeps through a real SLURM scheduler (`hydra/launcher=slurm`).

The tests marked `slurm` need a working cluster: `.ci/slurm-up` (as root on
Debian) starts a single-node one on this machine. Without one they skip and
say why; with CNNEXP_REQUIRE_SLURM=1 (set by .ci/run once the cluster is up)
they fail instead. CNNEXP_SLURM_PARTITION picks the partition (default: the
cluster's default partition).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from conftest import SMALL, run_cli

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
        return None, f"`sinfo` failed, the SLURM controller is not reachable: {out.stderr.strip()}"
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


def slurm_job_id(job_dir) -> str:
    """The SLURM job id Hydra recorded for a job (array_task form, e.g. 12_0)."""
    hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())
    return str(hydra_cfg["hydra"]["job"]["id"])


def slurm_sweep(tmp_path, partition, *args, name="sweep", **kw):
    sweep_dir = tmp_path / name
    result = run_cli(["-m", *SMALL, "data.n_train=200", "data.n_test=100", "trainer.max_epochs=2",
                      "hydra/launcher=slurm", f"hydra.launcher.partition={partition}",
                      "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
                      "hydra.launcher.mem_gb=1", *args, f"hydra.sweep.dir={sweep_dir}"],
                     cwd=tmp_path, timeout=240, **kw)
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
    jobs = [scontrol_job(i) for i in ids]
    assert all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    assert {j["ArrayJobId"] for j in jobs} == {ids[0].split("_")[0]}  # one array, one task per Hydra job
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["completed", "completed"]
    assert list(summary["optim.lr"]) == [0.001, 0.01]
    for name in COMPARISONS:
        assert (sweep_dir / name).read_bytes()[:4] == b"\x89PNG"
