"""A search past one machine: workers that each ask the shared study for the next
trial as soon as they are free, on a journal file (a shared filesystem) or a
PostgreSQL server, and as SLURM jobs; no trial lost, none run twice, no
slot left idle while trials remain."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import SMALL, run_cli

optuna = pytest.importorskip("optuna")

from hydra_plugins.cnnexp_optuna_sweeper._space import parse  # noqa: E402
from hydra_plugins.cnnexp_optuna_sweeper._worker import Ending, StudySpec, Worker  # noqa: E402

EPOCHS_REPORTED = 3


class StubTrial:
    """Stands in for training: reports a value per epoch through the study's storage,
    as a trial job does, and leaves the run.json a finished job leaves."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = Path(sweep_dir)

    def __call__(self, ticket, link) -> Ending:
        from cnnexp.sweep.storage import open_storage

        study = optuna.load_study(study_name=link.study, storage=open_storage(link.storage))
        trial = optuna.trial.Trial(study, link.trial_id)
        lr = float(ticket.overrides[0].partition("=")[2])
        for epoch in range(1, EPOCHS_REPORTED + 1):
            trial.report(lr * epoch, epoch)
            time.sleep(0.01)
        job_dir = self.sweep_dir / str(ticket.number)
        job_dir.mkdir()  # a second run of one trial would fail here
        (job_dir / "run.json").write_text(json.dumps({"status": "completed", "overrides": ticket.overrides,
                                                      "objective_value": lr * EPOCHS_REPORTED}))
        return Ending(value=lr * EPOCHS_REPORTED)


def run_worker(spec: StudySpec, index: int) -> list[int]:
    return Worker(spec, index, StubTrial(spec.sweep_dir))()


def make_spec(url: str, sweep: Path, limit: int, workers: int) -> StudySpec:
    from cnnexp.sweep.storage import open_storage

    space = parse(["optim.lr=interval(0.001, 0.1)"], OmegaConf.create({"optim": {"lr": 0.001}}))
    optuna.create_study(study_name="cnnexp", storage=open_storage(url), direction="minimize", load_if_exists=True)
    return StudySpec(storage_url=url, study_name="cnnexp", sweep_dir=str(sweep), objective="final_test_loss",
                     space=space, limit=limit, sampler={"sampler": "random", "seed": 0, "sampler_options": {}},
                     workers=workers)


def run_concurrently(spec: StudySpec, n: int) -> list[list[int]]:
    with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn")) as pool:
        return list(pool.map(run_worker, [spec] * n, range(n)))


def check_every_trial_once(url: str, ran: list[list[int]], limit: int) -> None:
    from cnnexp.sweep.storage import open_storage

    numbers = [n for worker in ran for n in worker]
    assert sorted(numbers) == list(range(limit))  # each trial run by exactly one worker, none lost
    trials = optuna.load_study(study_name="cnnexp", storage=open_storage(url)).get_trials()
    assert len(trials) == limit
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(1, EPOCHS_REPORTED + 1))
        assert t.value == pytest.approx(t.params["optim.lr"] * EPOCHS_REPORTED)


# ---------------------------------------------------------------- the journal store
@pytest.mark.slow  # eight fresh Python processes (each imports torch): 25-80 s on 2 busy cores
def test_eight_worker_processes_on_one_journal_store_lose_no_trial(tmp_path):
    from cnnexp.sweep.storage import resolve

    url = resolve("journal", tmp_path)
    assert url == f"journal:{tmp_path.resolve() / 'optuna.journal'}"
    spec = make_spec(url, tmp_path, limit=24, workers=8)
    ran = run_concurrently(spec, 8)  # any lock error or lost write would raise here or be missing below
    check_every_trial_once(url, ran, 24)
    assert sum(1 for worker in ran if worker) >= 2  # the trials really were shared out
    assert not (tmp_path / ".search-ask.lock").exists()  # every worker let go of the ask lock


# ---------------------------------------------------------------- a PostgreSQL server
def _postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").is_file():
            return candidate
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of this test's own on 127.0.0.1, with a database `cnnexp`."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="cnnexp-pg-", dir="/tmp"))
    data, port = root / "data", _free_port()
    if as_user:
        shutil.chown(root, "postgres")
    log = root / "server.log"
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server could not start: {err}")
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE cnnexp")
        connection.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/cnnexp"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_workers_share_a_study_on_a_postgresql_server(postgres_url, tmp_path):
    spec = make_spec(postgres_url, tmp_path, limit=6, workers=2)
    ran = run_concurrently(spec, 2)
    check_every_trial_once(postgres_url, ran, 6)
    from cnnexp.sweep.search import read_marker, write_marker

    write_marker(tmp_path, postgres_url.replace("postgres@", "postgres:s3cret@"), study_name="cnnexp")
    assert "s3cret" not in (tmp_path / "search.yaml").read_text()  # a password never lands on disk
    assert read_marker(tmp_path)["storage"].startswith("postgresql://postgres:***@127.0.0.1")


# ---------------------------------------------------------------- freed slots are refilled at once
def _started_ended(job_dir: Path) -> tuple[datetime, datetime]:
    record = json.loads((job_dir / "run.json").read_text())
    return datetime.fromisoformat(record["started_at"]), datetime.fromisoformat(record["ended_at"])


@pytest.mark.slow
def test_a_worker_takes_the_next_trial_while_its_neighbour_still_trains(tmp_path):
    """Two workers; trial 0 trains 20 epochs while the other worker runs the three
    one-epoch trials one after another, without waiting for trial 0 (the batch
    mode it replaces started trial 2 only when trial 0 and 1 had both ended)."""
    args = ["-m", "hydra/sweeper=optuna", *SMALL, "trainer.device=cpu", "trainer.cpu_step=eager",
            "trainer.progress=none", "hydra.sweep.dir=sweep", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4",
            "hydra.sweeper.pruner=none", "hydra.sweeper.storage=journal", "trainer.max_epochs=choice(20, 1)",
            "trainer.seed=range(0, 4)",
            "hydra.sweeper.enqueue=[" + ", ".join(f"{{trainer.max_epochs: {20 if n == 0 else 1}, trainer.seed: {n}}}"
                                                  for n in range(4)) + "]"]
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["trial"]) == [0, 1, 2, 3] and set(summary["state"]) == {"complete"}
    long_start, long_end = _started_ended(sweep / "0")
    assert list(summary.sort_values("trial")["epochs"]) == [20, 1, 1, 1]
    assert long_start <= _started_ended(sweep / "1")[0]
    assert _started_ended(sweep / "3")[0] < long_end  # the third short trial started while trial 0 still trained
    assert (sweep / "optuna.journal").is_file() and not (sweep / "optuna.db").exists()
    hydra_yaml = (sweep / "0" / ".hydra" / "hydra.yaml").read_text()
    assert "CNNEXP_SEARCH_TRIAL" not in hydra_yaml  # the link to the study is not written into the job


@pytest.mark.slow
def test_a_search_whose_trials_failed_exits_1_and_claims_no_savings(tmp_path):
    args = ["-m", "hydra/sweeper=optuna", *SMALL, "trainer.device=cpu", "trainer.cpu_step=eager",
            "trainer.progress=none", "trainer.max_epochs=2", "hydra.sweep.dir=sweep", "hydra.sweeper.n_trials=2",
            "optim.lr=choice(1e6, 1e7)"]
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnexp: error: 2 of 2 sweep trials did not complete: trial 0 failed")
    assert "Traceback" not in result.stderr
    best = (tmp_path / "sweep" / "best.txt").read_text()
    assert "Trials: 2 (0 completed, 0 pruned, 2 failed)" in best and "pruning" not in best
