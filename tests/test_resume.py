"""Nothing lost: a killed run resumes to the same results, signals stop cleanly."""

import csv
import json
import signal

import pytest
import torch

from cnnexp.results.metrics import TIMING_COLUMNS
from conftest import SMALL, StderrLines, run_cli, start_cli, wait_for_rows, write_module

# On the CPU, whatever else the machine has: resumed runs are compared bit for bit.
ARGS = [*SMALL, "data.n_train=1200", "trainer.max_epochs=4", "trainer.num_threads=1", "trainer.device=cpu"]
STEPS_PER_EPOCH = 300  # 1200 images at batch 4


def read_rows(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    result = run_cli([*ARGS, f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    assert result.returncode == 0, result.stderr
    return read_rows(tmp / "run" / "metrics.csv")


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    proc = start_cli([*ARGS, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    wait_for_rows(run_dir / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # died without a word
    done_before = len(read_rows(run_dir / "metrics.csv"))
    assert done_before < 4

    result = run_cli([f"trainer.resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_rows(run_dir / "metrics.csv") == uninterrupted  # bitwise: same strings, no duplicate rows
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed_from"] == str(run_dir / "checkpoints" / "last.pt")
    assert f"Resuming at epoch {done_before + 1}, step 0" in (run_dir / "cnnexp.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_checkpoints_the_position_and_resumes_exactly(tmp_path, uninterrupted, signum, code):
    run_dir = tmp_path / "stopped"
    proc = start_cli([*ARGS, "trainer.log_every_steps=50", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    stderr = StderrLines(proc)
    stderr.wait_for("[epoch 2, step    50]")  # 250 steps of epoch 2 still to go
    proc.send_signal(signum)
    output = stderr.finish()
    assert proc.returncode == code, output
    assert f"trainer.resume={run_dir}" in output
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and 50 <= checkpoint["step"] < STEPS_PER_EPOCH  # inside epoch 2
    assert checkpoint["partial"]["logits"].shape == (4 * checkpoint["step"], 10)  # the steps it had done
    assert len(read_rows(run_dir / "metrics.csv")) == 1 == len(checkpoint["metrics"])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and f"after step {checkpoint['step']}" in record["error"]

    result = run_cli([f"trainer.resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Resuming at epoch 2, step {checkpoint['step']}" in (run_dir / "cnnexp.log").read_text()
    assert read_rows(run_dir / "metrics.csv") == uninterrupted


AVERAGED = ["trainer.lookahead_every=7", "trainer.ema_decay=0.9", "trainer.lr_schedule=linear",
            "trainer.warmup_epochs=1", "trainer.warmup_start_factor=0.2", "trainer.final_lr_factor=0.1"]


@pytest.mark.slow
def test_a_stop_mid_epoch_resumes_lookahead_and_the_weight_average_exactly(tmp_path):
    reference = run_cli([*ARGS, *AVERAGED, f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    run_dir = tmp_path / "stopped"
    proc = start_cli([*ARGS, *AVERAGED, "trainer.log_every_steps=50", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    stderr = StderrLines(proc)
    stderr.wait_for("[epoch 2, step    50]")
    proc.send_signal(signal.SIGTERM)
    stderr.finish()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["lookahead"]["steps"] == STEPS_PER_EPOCH + checkpoint["step"]  # slow weights saved mid-epoch
    result = run_cli([f"trainer.resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_rows(run_dir / "metrics.csv") == read_rows(tmp_path / "reference" / "metrics.csv")


DOUBLE_CTRL_C = """
import os, signal, time
from cnnexp.models import TutorialCNN

class InterruptedTwice(TutorialCNN):
    \"\"\"Presses Ctrl-C twice during the first evaluation, as an impatient user would.\"\"\"
    def forward(self, x):
        if not self.training and x.shape[0] > 1:  # not the one-image probe of the build
            os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop after the current step
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)  # the second aborts at once
        return super().forward(x)
"""


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    write_module(tmp_path, "impatient", DOUBLE_CTRL_C)
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "model._target_=impatient.InterruptedTwice", "trainer.max_epochs=50",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "press Ctrl-C again to abort at once" in result.stderr and "Traceback" not in result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and "second Ctrl-C" in record["error"]
    assert read_rows(run_dir / "metrics.csv") == []  # the first epoch's evaluation never finished
    assert not (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "model.pt").exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_setting_and_keeps_the_run_history(tmp_path):
    run_dir = tmp_path / "run"
    first_overrides = [*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    assert run_cli(first_overrides, cwd=tmp_path).returncode == 0
    first = json.loads((run_dir / "run.json").read_text())
    result = run_cli([f"trainer.resume={run_dir}", "optim.lr=0.5", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2 and "optim.lr=0.5" in result.stderr
    extended = run_cli([f"trainer.resume={run_dir}", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'r2'}"],
                       cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr
    assert [r["epoch"] for r in read_rows(run_dir / "metrics.csv")] == ["1", "2"]
    # run.json still tells the run's whole story: first start, what it was run with, each resume.
    record = json.loads((run_dir / "run.json").read_text())
    assert record["started_at"] == first["started_at"] and record["command"] == first["command"]
    assert record["overrides"] == first["overrides"] == [o for o in first_overrides if not o.startswith("hydra.")]
    (resume,) = record["resumes"]
    assert resume["overrides"] == [f"trainer.resume={run_dir}", "trainer.max_epochs=2"]
    assert resume["from_epoch"] == 2 and resume["at"] >= first["ended_at"]
    assert record["status"] == "completed" and record["epochs_completed"] == 2
    assert record["wall_seconds"] > first["wall_seconds"]  # both segments counted


def test_resume_of_a_missing_checkpoint_names_it(tmp_path):
    result = run_cli([f"trainer.resume={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert result.returncode == 2 and "trainer.resume" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from cnnexp.run import resume as checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.atomic_torch_save({"epoch": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}


@pytest.mark.slow
def test_a_stop_without_checkpoints_says_so_and_writes_none(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_cli([*ARGS, "trainer.checkpoint=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    wait_for_rows(run_dir / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "checkpoint in" not in stderr and "trainer.resume=" not in stderr
    rows = len(read_rows(run_dir / "metrics.csv"))
    assert f"no checkpoint was written (trainer.checkpoint=false), so metrics.csv keeps the {rows} completed" in stderr
    assert not (run_dir / "checkpoints").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


def test_a_continued_record_keeps_the_runs_story_and_starts_a_new_segment(tmp_path):
    from cnnexp.results.record import RunRecord, read_record
    from cnnexp.run.resume import continued_record

    first = RunRecord(tmp_path, overrides=["optim.lr=0.01"], command="cnnexp optim.lr=0.01", device="cpu")
    first.epoch_done(3)
    first.finish("interrupted", error="stopped by signal 15 in epoch 4 after step 7")
    before = read_record(tmp_path)

    again = continued_record(tmp_path, overrides=["trainer.resume=x"], command="cnnexp trainer.resume=x",
                             from_epoch=4, device="cuda")
    again.write()
    record = read_record(tmp_path)
    assert record["started_at"] == before["started_at"] and record["overrides"] == ["optim.lr=0.01"]
    assert record["command"] == "cnnexp optim.lr=0.01" and record["epochs_completed"] == 3
    assert record["status"] == "running" and record["ended_at"] is None and record["error"] is None
    assert record["device"] == "cuda"  # this segment's
    assert record["resumes"] == [{"at": record["resumes"][0]["at"], "overrides": ["trainer.resume=x"],
                                  "command": "cnnexp trainer.resume=x", "from_epoch": 4}]
    again.finish("completed")
    assert read_record(tmp_path)["wall_seconds"] >= before["wall_seconds"]
    continued_record(tmp_path, overrides=["trainer.resume=x", "trainer.max_epochs=9"], from_epoch=6).write()
    assert [r["from_epoch"] for r in read_record(tmp_path)["resumes"]] == [4, 6]
