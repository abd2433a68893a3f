"""A command creates only the directories it uses: a plain run no sweep dir,
a sweep no run dir, a resume (continued or refused) no new run dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.types import RunMode

from cnnexp.cli import output_subdir, remove_unused_dirs, run_dir, sweep_dir, unique_dir
from conftest import SMALL, run_cli


def test_a_plain_run_resolves_the_sweep_pattern_without_creating_it(tmp_path):
    pattern = str(tmp_path / "multirun" / "d" / "t")
    assert sweep_dir(pattern, RunMode.RUN) == pattern
    assert run_dir(str(tmp_path / "outputs" / "d" / "t"), RunMode.MULTIRUN, None) == str(tmp_path / "outputs/d/t")
    assert sorted(os.listdir(tmp_path)) == []
    # Each in its own mode: created, and a second run in the same second gets its own.
    assert Path(sweep_dir(pattern, RunMode.MULTIRUN)).is_dir()
    assert sweep_dir(pattern, RunMode.MULTIRUN) == pattern + "-1"
    assert Path(run_dir(str(tmp_path / "o"), RunMode.RUN, None)).is_dir()


def test_a_resume_goes_on_in_its_run_and_a_refused_one_keeps_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    fresh = str(tmp_path / "outputs" / "now")
    assert run_dir(fresh, RunMode.RUN, str(run)) == str(run)
    assert run_dir(fresh, RunMode.RUN, str(run / "checkpoints" / "last.pt")) == str(run)
    assert output_subdir(str(run)) is None and output_subdir(None) == ".hydra"  # its first .hydra/ stays
    scratch = Path(run_dir(fresh, RunMode.RUN, str(tmp_path / "nothing-here")))
    assert scratch.is_dir() and not scratch.is_relative_to(tmp_path)  # outside the user's folders
    assert output_subdir(str(tmp_path / "nothing-here")) == ".hydra"
    assert not (tmp_path / "outputs").exists()


def test_runs_and_resumes_create_only_the_directories_they_use(tmp_path):
    first = run_cli([*SMALL, "trainer.max_epochs=1", "trainer.plots=none"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sorted(os.listdir(tmp_path)) == ["outputs"]  # no multirun/<date>/<time>/
    (run,) = tmp_path.glob("outputs/*/*")
    hydra_config = (run / ".hydra" / "config.yaml").read_text()

    refused = run_cli(["trainer.resume=elsewhere"], cwd=tmp_path)
    assert refused.returncode == 2 and "no checkpoint found" in refused.stderr
    resumed = run_cli([f"trainer.resume={run}", "trainer.max_epochs=2"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    assert list(tmp_path.glob("outputs/*/*")) == [run]  # no run dir per resume
    assert sorted(os.listdir(tmp_path)) == ["outputs"]
    assert (run / ".hydra" / "config.yaml").read_text() == hydra_config  # the run's own config, as it began
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header and both epochs
    log = (run / "cnnexp.log").read_text()
    assert "epoch 1/1" in log and "epoch 2/2" in log  # one log, going on


def test_a_refused_search_leaves_no_sweep_dir(tmp_path):
    pytest.importorskip("optuna")
    refused = run_cli(["-m", "hydra/sweeper=optuna", *SMALL, "optim.lr=0.01"], cwd=tmp_path)
    assert refused.returncode == 2 and "Nothing to search" in refused.stderr, refused.stderr
    assert sorted(os.listdir(tmp_path)) == []  # neither multirun/<date>/<time>/ nor multirun/


def test_directories_made_for_an_output_dir_are_removed_at_exit_while_empty(tmp_path):
    used = Path(unique_dir(str(tmp_path / "a" / "b" / "used")))
    assert Path(unique_dir(str(tmp_path / "c" / "d"))).is_dir()
    (used / "metrics.csv").write_text("epoch\n")
    remove_unused_dirs()
    assert (used / "metrics.csv").is_file()
    assert not (tmp_path / "c").exists() and sorted(os.listdir(tmp_path)) == ["a"]
