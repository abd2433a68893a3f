"""Each job's share of the cores under a parallel launcher."""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from cnnexp import cpu as cores
from cnnexp.cli import config_dir


@pytest.fixture
def under_joblib(tmp_path, monkeypatch):
    """Make the process look like a job of a joblib sweep on an 8-core
    affinity set (the machine itself reports more CPUs than that)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)

    def _set(n_jobs, sweep_overrides=None):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"],
                          return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.sweep.dir = str(tmp_path)
        if sweep_overrides is not None:  # what the basic sweeper writes before it launches
            saved = OmegaConf.create({"hydra": {"overrides": {"task": sweep_overrides}, "sweeper": {"params": None}}})
            OmegaConf.save(saved, tmp_path / "multirun.yaml")
        HydraConfig.instance().set_config(cfg)

    yield _set
    HydraConfig.instance().cfg = None


def test_outside_hydra_one_job_uses_every_allowed_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cores.parallel_jobs() == 1
    assert cores.cpu_budget() == 3  # the affinity set, not the machine's 64


@pytest.mark.parametrize(("n_jobs", "jobs", "budget"), [(-1, 8, 1), (-2, 7, 1), (-5, 4, 2), (-8, 1, 8), (-20, 1, 8),
                                                        (2, 2, 4), (3, 3, 2)])
def test_n_jobs_follows_joblib_over_the_affinity_set(under_joblib, n_jobs, jobs, budget):
    under_joblib(n_jobs)
    assert cores.parallel_jobs() == jobs
    assert cores.cpu_budget() == budget


def test_a_sweep_smaller_than_n_jobs_shares_the_cores_among_its_jobs(under_joblib):
    under_joblib(-1, ["optim.lr=0.001,0.01", "trainer.max_epochs=2"])  # 2 jobs, n_jobs = all 8 cores
    assert cores.parallel_jobs() == 2
    assert cores.cpu_budget() == 4
    under_joblib(4, ["optim.lr=0.001,0.01", "trainer.seed=range(3)"])  # 6 jobs, 4 at a time
    assert cores.parallel_jobs() == 4
    assert cores.cpu_budget() == 2
