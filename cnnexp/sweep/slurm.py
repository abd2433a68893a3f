"""SLURM, as cnnexp's sweep launcher sees it: is the cluster there, what state
is a job in, what to record when a job is lost.

The launcher itself (`hydra/launcher=slurm`) lives in
hydra_plugins/cnnexp_slurm_launcher, where Hydra looks for plugins.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from cnnexp.errors import ConfigError

SLURM_COMMANDS = ("sbatch", "srun", "sinfo", "squeue", "scontrol")


# --- before submitting ---------------------------------------------------------

def is_slurm_launcher(launcher_cfg: Any) -> bool:
    target = str(getattr(launcher_cfg, "_target_", "") or "")
    return target.endswith("SlurmLauncher")


def check_cluster(launcher: Any) -> None:
    """Raise ConfigError naming what is missing when SLURM would not take the
    preset's jobs: no SLURM here, no controller, no such partition, or
    resources the partition cannot give (asked of `sbatch --test-only`)."""
    partition = launcher.get("partition")
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise ConfigError(
            f"hydra/launcher=slurm needs SLURM, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH on this machine. Run the sweep on the "
            "cluster's login node, or drop hydra/launcher=slurm (hydra/launcher=joblib runs jobs in "
            "parallel here)."
        )
    try:
        listed = _slurm(["sinfo", "--noheader", "--format=%P"], "`sinfo`").split()
    except ConfigError as err:
        said = str(err)
        if "slurmctld" not in said:  # the time-out message asks this already
            said += " Is the SLURM controller (slurmctld) up?"
        raise ConfigError(said) from None
    names = [p.rstrip("*") for p in listed]
    if partition is None and not any(p.endswith("*") for p in listed):
        raise ConfigError("hydra/launcher=slurm: the cluster has no default partition; choose one with "
                          f"hydra.launcher.partition=NAME (partitions: {', '.join(names) or 'none'}).")
    unknown = [p for p in str(partition or "").split(",") if p and p not in names]
    if unknown:
        raise ConfigError(f"hydra/launcher=slurm: SLURM has no partition {', '.join(map(repr, unknown))}; "
                          f"set hydra.launcher.partition to one of: {', '.join(names) or 'none'} "
                          "(`sinfo` lists them).")
    try:
        _slurm(["sbatch", "--test-only", *sbatch_flags(launcher)], "`sbatch --test-only`", stdin="#!/bin/sh\ntrue\n")
    except ConfigError as err:
        where = partition or "the default partition"
        raise ConfigError(
            f"{err} SLURM would not run these jobs as the preset asks. Compare hydra.launcher's cpus_per_task, "
            f"mem_gb, gpus_per_node (0 where there are no GPUs) and timeout_min with what {where} offers: "
            f"`sinfo -p {partition or '<name>'} -o '%c %m %G %l'` lists its CPUs, memory (MB), GPUs and "
            "time limit."
        ) from None


def sbatch_flags(launcher: Any) -> list[str]:
    """The resource requests Hydra's submitit launcher puts into each job's sbatch script."""
    fields = {"partition": "partition", "time": "timeout_min", "nodes": "nodes",
              "ntasks-per-node": "tasks_per_node", "cpus-per-task": "cpus_per_task",
              "gpus-per-node": "gpus_per_node", "gpus-per-task": "gpus_per_task", "cpus-per-gpu": "cpus_per_gpu",
              "mem-per-cpu": "mem_per_cpu", "mem-per-gpu": "mem_per_gpu", "qos": "qos", "account": "account",
              "constraint": "constraint", "exclude": "exclude", "gres": "gres"}
    flags = [f"--{flag}={launcher.get(key)}" for flag, key in fields.items() if launcher.get(key) is not None]
    if launcher.get("mem_gb") is not None:
        flags.append(f"--mem={launcher.get('mem_gb')}GB")
    for key, value in (launcher.get("additional_parameters") or {}).items():
        flags.append(f"--{str(key).replace('_', '-')}" + ("" if value is True else f"={value}"))
    return flags


def _slurm(command: list[str], name: str, stdin: str | None = None) -> str:
    """Run a SLURM command; its stdout, or ConfigError with SLURM's own words."""
    try:
        out = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"hydra/launcher=slurm: {name} did not answer within 60 s; "
                          "is the SLURM controller (slurmctld) up?") from None
    if out.returncode != 0:
        said = [line.removeprefix("sbatch: error: ").strip() for line in (out.stderr or out.stdout).splitlines()]
        said = "; ".join(line for line in said if line) or f"exit {out.returncode}"
        raise ConfigError(f"hydra/launcher=slurm: {name} failed: {said}.")
    return out.stdout


# --- job states without accounting ---------------------------------------------

def accounting_works() -> bool:
    """Whether `sacct` answers (clusters without slurmdbd say 'accounting storage is disabled')."""
    try:
        return subprocess.run(["sacct", "--noheader", "-X", "-j", "1"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def queue_watcher():
    """The class of a submitit job-state watcher that reads `squeue` (built on
    first use: submitit is imported only when a SLURM sweep runs)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        """submitit's job-state watcher, reading `squeue` instead of `sacct`.

        A job the controller no longer lists has ended (it keeps finished jobs
        for MinJobAge); submitit then looks for its result file."""

        GONE = "NOT_IN_QUEUE"

        def _make_command(self):
            if not self._registered - self._finished:
                return None
            return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N"]

        def read_info(self, string):
            if not isinstance(string, str):
                string = string.decode()
            info = super().read_info("JobID|State|NodeList\n" + string)
            for job_id in self._registered:
                if job_id not in info and job_id in self._info_dict:
                    info[job_id] = {"JobID": job_id, "State": self.GONE, "NodeList": ""}
            return info

    return QueueWatcher


# --- jobs ----------------------------------------------------------------------------

def job_state(job_id: str) -> str:
    """JobState from `scontrol show job` (RUNNING, COMPLETING, PENDING, CANCELLED, ...)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    for item in out.split():
        if item.startswith("JobState="):
            return item.partition("=")[2]
    return "UNKNOWN"


def record_lost_job(job_dir: Path, overrides: list[str], message: str) -> None:
    """Mark a job that ended without a result as failed in its run.json (kept if it completed)."""
    from cnnexp.results.record import RunRecord, now_iso, read_record

    job_dir.mkdir(parents=True, exist_ok=True)
    record = read_record(job_dir) or {"overrides": overrides}
    if record.get("status") != "completed":  # keeps the job's own fields, its wall time included
        RunRecord(job_dir, **record).update(status="failed", ended_at=now_iso(), error=message)
