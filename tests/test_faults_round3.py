"""Faults that lost or misreported results, killed a run instead of degrading,
or trusted a file: each class checked on its rule, end to end where the rule
is about what a command leaves on disk."""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from cnnexp import preflight
from cnnexp.errors import ConfigError
from cnnexp.run import ownership
from cnnexp.run.ownership import RunDirTaken, override_text, refuse_if_taken
from cnnexp.run.resume import Checkpoint, restore_rng_states, rng_states
from conftest import run_cli

SMALL = ["data=synthetic", "data.n_train=200", "data.n_test=100", "trainer.max_epochs=1", "trainer.progress=none",
         "trainer.num_threads=1"]
FIXTURE_CHECKPOINT = Path(__file__).parent / "fixtures" / "release_0_2" / "run" / "checkpoints" / "last.pt"


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- one run dir, one run
def test_a_run_dir_another_process_holds_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cnnexp.run.ownership import claim_run_dir; "
                               f"claim_run_dir({str(run_dir)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}, "trainer": {"resume": None}})
        with pytest.raises(RunDirTaken, match=f"Another cnnexp process is writing into {run_dir}"):
            preflight.claim_run_dirs(config)
    finally:
        holder.kill()
        holder.wait()
    preflight.claim_run_dirs(config)  # the lock went with the process: no stale lock
    ownership.release_run_dir(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == []  # the lock leaves no file behind


def test_a_finished_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli([*SMALL, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    kept = snapshot(run_dir)
    again = run_cli([*SMALL, "optim.lr=0.01", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    (line,) = [x for x in again.stderr.splitlines() if x.startswith("error:")]
    assert f"{run_dir} already holds a run (completed); results are never overwritten" in line
    assert snapshot(run_dir) == kept  # .hydra/ and the log included


def test_an_interrupted_run_in_the_way_names_the_resume_command(tmp_path):
    run_dir = tmp_path / "my runs" / "a,b"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    (run_dir / "run.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(RunDirTaken) as taken:
        refuse_if_taken(run_dir)
    assert "already holds a run (interrupted)" in str(taken.value)
    assert override_text("trainer.resume", run_dir) in str(taken.value)
    refuse_if_taken(tmp_path)  # nothing there: a fresh run may start


@pytest.mark.parametrize("path", ["/plain/run-1", "/my runs/x", "/a,b/it's", '/q"uote/$HOME/`x`/back\\slash'])
def test_printed_commands_paste_back_to_the_same_path(path):
    word = override_text("trainer.resume", path)
    (argv,) = [subprocess.run(["sh", "-c", f"printf %s {word}"], capture_output=True, text=True).stdout]
    assert OverridesParser.create().parse_override(argv).value() == path


# ----------------------------------------------------------------- a refused sweep writes nothing
def test_a_refused_sweep_rerun_writes_nothing(tmp_path):
    sweep_dir = tmp_path / "g2"
    first = run_cli(["-m", *SMALL, "optim.lr=0.001,1e6", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert (sweep_dir / "0" / "run.json").is_file(), first.stderr
    kept = snapshot(sweep_dir)
    again = run_cli(["-m", *SMALL, "optim.lr=0.002,1e6", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "holds a job run with overrides" in again.stderr and "optim.lr=0.002" in again.stderr
    assert snapshot(sweep_dir) == kept  # .hydra/*.yaml, multirun.yaml, logs: untouched


def test_the_sweep_check_computes_the_jobs_as_hydra_does(tmp_path):
    config = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"optim.momentum": "0,0.9"}},
        "sweep": {"dir": str(tmp_path), "subdir": "${hydra.job.num}"},
        "overrides": {"task": ["optim.lr=0.1,0.2", "trainer.max_epochs=1"]}}})
    jobs = preflight.basic_sweep_jobs(config)
    assert [(p.name, o) for p, o in jobs] == [
        ("0", ["optim.momentum=0", "optim.lr=0.1", "trainer.max_epochs=1"]),
        ("1", ["optim.momentum=0", "optim.lr=0.2", "trainer.max_epochs=1"]),
        ("2", ["optim.momentum=0.9", "optim.lr=0.1", "trainer.max_epochs=1"]),
        ("3", ["optim.momentum=0.9", "optim.lr=0.2", "trainer.max_epochs=1"])]
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "run.json").write_text(json.dumps({"overrides": ["optim.lr=0.5"], "status": "completed"}))
    with pytest.raises(ownership.SweepDirTaken, match="holds a job run with overrides"):
        preflight.claim_sweep_dir(config)
    ownership.release_run_dir(tmp_path)


# ----------------------------------------------------------------- a read-only run dir mid-run
def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {done.stderr.strip()}")


@pytest.mark.skipif(not shutil.which("mount"), reason="no mount command")
def test_a_run_dir_that_turns_read_only_ends_in_one_line_and_keeps_its_rows(tmp_path):
    from conftest import start_cli

    run_dir = tmp_path / "run"
    proc = start_cli(["data=synthetic", "data.n_train=2000", "data.n_test=100", "trainer.max_epochs=40",
                      "trainer.progress=none", "trainer.num_threads=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    # A read-only filesystem appears where the next checkpoint goes.
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(checkpoint.parent)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        proc.kill()
        proc.wait()
        pytest.skip(f"mounting a read-only tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        subprocess.run(["umount", str(checkpoint.parent)], capture_output=True)
    assert proc.returncode == 1 and "Traceback" not in err and "Logging error" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"The output directory {run_dir} cannot be written (Read-only file system)" in line
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "cannot be written" in record["error"]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) >= 2  # header and the completed epochs


def test_tensorboards_writer_thread_failure_prints_no_traceback(tmp_path, capfd):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from cnnexp.tracking.tensorboard_logger import quiet_writer_thread_errors

    previous = threading.excepthook
    try:
        quiet_writer_thread_errors()
        writer = EventFileWriter(str(tmp_path / "tb"))
        shutil.rmtree(tmp_path / "tb")  # its next write fails in the writer thread
        writer.add_event(event_pb2.Event(step=1))
        with pytest.raises(OSError):
            writer.flush()  # the error reaches the caller (and the tracker's one warning)
        writer._async_writer._worker.join(5)
    finally:
        threading.excepthook = previous
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------- small ones
def test_a_val_size_of_one_is_refused_as_ambiguous():
    from cnnexp.data.validation import check_val_size

    with pytest.raises(ConfigError, match="data.val_size=1 is ambiguous"):
        check_val_size(1.0)
    check_val_size(2)
    check_val_size(0.5)


def test_an_image_root_that_is_a_file_says_so(tmp_path):
    from cnnexp.data.imagefolder import check_layout

    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(ConfigError, match="images.zip' is a file, not a folder"):
        check_layout(str(tmp_path / "images.zip"))
    with pytest.raises(ConfigError, match="does not exist"):
        check_layout(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------- untrusted checkpoints
class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran code"))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    state = {"epoch": 1, "model": {}, "payload": RunsCode(marker)}
    path = tmp_path / "last.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError) as refused:
        Checkpoint.load(path)
    message = str(refused.value)
    assert "unpickling it could run any code it carries, so it is not loaded" in message
    assert "pathlib" in message and "\n" not in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the refusal protects from: plain unpickling runs it
    assert marker.read_text() == "the pickle ran code"


def test_checkpoints_hold_plain_values_and_old_ones_still_load(tmp_path):
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(3)
    np.random.seed(5)
    random.seed(6)
    Checkpoint(epoch=1, step=0, model={}, optimizer={}, rng=rng_states(generator), metrics=[{"epoch": 1}],
               config={"a": 1}).save(tmp_path)
    expected = (np.random.rand(), random.random(), torch.rand(1, generator=generator).item())
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)  # no allow-list needed
    assert state["format"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    restore_rng_states(Checkpoint.load(tmp_path / "checkpoints" / "last.pt").rng, generator)
    assert (np.random.rand(), random.random(), torch.rand(1, generator=generator).item()) == expected

    old = Checkpoint.load(FIXTURE_CHECKPOINT)  # the previous release's numpy state tuple
    assert old.format == 1 and old.epoch == 2
    restore_rng_states(old.rng, generator)
    with pytest.raises(TypeError, match="Checkpoint.config.x is a object"):
        Checkpoint(epoch=1, step=0, model={}, optimizer={}, rng={}, metrics=[], config={"x": object()}).save(tmp_path)


def test_a_cifar_folder_from_elsewhere_cannot_run_code_when_read(tmp_path):
    import pickle

    from cnnexp.data import cifar10
    from cnnexp.errors import DataError

    marker = tmp_path / "ran"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat"], b"x": RunsCode(marker)}, protocol=2))
    with pytest.raises(DataError, match="would import .*, which a CIFAR-10 batch never needs"):
        cifar10.read_batches(folder)
    assert not marker.exists()
