"""A search on SLURM: n_jobs worker jobs, each taking trials from the shared
study (a journal file in the sweep dir by default) until it holds n_trials.
Needs the test cluster (.ci/slurm-up); skips without one, as tests/test_slurm.py."""

from __future__ import annotations

import pandas as pd
import pytest
from test_slurm import TINY, launcher_args, partition  # noqa: F401 - partition is a fixture

from conftest import run_cli

optuna = pytest.importorskip("optuna")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_search_runs_as_worker_jobs_that_share_the_trials(partition, tmp_path):  # noqa: F811
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
