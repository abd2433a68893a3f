"""What a short job spends around its training: imports it does not need, a
second compose, data decoded again, figures (trainer.plots)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import cnnexp.data as datasets
from cnnexp import figures
from cnnexp.cli import compose_once, mode_from_command_line
from conftest import SMALL, run_cli

# Imported by a plain run only where it is used (figures, summaries, searches, trackers).
HEAVY = ("matplotlib", "pandas", "optuna", "mlflow", "tensorboard", "torch._dynamo", "sklearn")


def test_the_commands_callbacks_and_the_optimiser_check_import_nothing_heavy():
    code = """
import json, sys
import cnnexp.cli, cnnexp.preflight, cnnexp.sweep.summary, cnnexp.tracking.preflight, cnnexp.run.job
from omegaconf import OmegaConf
from cnnexp.config.targets import check_optimizer
from cnnexp.errors import ConfigError
check_optimizer(OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.001, "momentum": 0.9}))
try:
    check_optimizer(OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.001, "nesterov": True}))
    refused = None
except ConfigError as err:
    refused = str(err)
print(json.dumps({"loaded": sorted(m for m in HEAVY if m in sys.modules), "refused": refused}))
""".replace("HEAVY", repr(HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    # The cheap check still refuses what SGD refuses, with SGD's own reason.
    assert "Nesterov momentum requires a momentum" in result["refused"]


def test_the_run_mode_comes_from_the_command_line_without_composing(monkeypatch):
    from hydra._internal.hydra import Hydra

    composed = []
    monkeypatch.setattr(Hydra, "get_mode", lambda self, config_name, overrides: composed.append(overrides) or "x")
    compose_once()
    assert Hydra.get_mode(None, "config", ["optim.lr=0.1"]) is None  # -m or not decides, as Hydra does
    assert str(Hydra.get_mode(None, "config", ["hydra.mode=MULTIRUN"])) == "RunMode.MULTIRUN"
    assert composed == []
    # A preset picked on the command line may set hydra.mode itself: Hydra composes to find out.
    assert Hydra.get_mode(None, "config", ["+experiment=fast94"]) == "x"
    assert composed == [["+experiment=fast94"]]
    assert mode_from_command_line(["hydra.mode=RUN", "a=1"]).name == "RUN"
    assert mode_from_command_line(["hydra.mode=nonsense"]) is None


# ------------------------------------------------------------ data decoded once per process
def _data_cfg(**changes):
    cfg = {"name": "synthetic", "n_train": 64, "n_test": 32, "image_size": 8, "num_classes": 4, "noise": 0.5,
           "seed": 0, "batch_size": 4, "mean": [0.5], "std": [0.5], "val_size": 0}
    return OmegaConf.create({**cfg, **changes})


@pytest.fixture
def counted_reader(monkeypatch):
    calls = []

    def reader(cfg):
        calls.append(cfg.n_train)
        g = torch.Generator().manual_seed(int(cfg.seed))
        return datasets.ImageSplits(torch.randint(0, 255, (cfg.n_train, 3, 8, 8), generator=g, dtype=torch.uint8),
                                    torch.arange(cfg.n_train) % 4,
                                    torch.zeros(cfg.n_test, 3, 8, 8, dtype=torch.uint8), torch.arange(cfg.n_test) % 4,
                                    ["a", "b", "c", "d"])

    monkeypatch.setitem(datasets.READERS, "synthetic", reader)
    monkeypatch.setattr(datasets, "_memo", [])
    return calls


def test_the_next_job_with_the_same_data_reuses_the_decoded_tensors(counted_reader):
    first = datasets.read_splits(_data_cfg())
    again = datasets.read_splits(_data_cfg(batch_size=16, mean=[0.4]))  # keys read after decoding
    assert counted_reader == [64]
    assert again.train_images is first.train_images and again is not first
    datasets.read_splits(_data_cfg(n_train=80))  # another dataset is read, and remembered instead
    assert counted_reader == [64, 80]


def test_tensors_changed_in_place_are_read_afresh(counted_reader):
    first = datasets.read_splits(_data_cfg())
    expected = first.train_images.clone()
    first.train_images[0] = 0
    again = datasets.read_splits(_data_cfg())
    assert counted_reader == [64, 64]
    assert torch.equal(again.train_images, expected)


def test_a_run_does_not_change_the_images_it_trains_on(compose_cfg, tmp_path, monkeypatch):
    """What makes reusing them safe: a whole (tiny) job leaves the decoded tensors untouched."""
    from cnnexp.run.job import run_job

    monkeypatch.setattr(datasets, "_memo", [])
    cfg = compose_cfg(["data=synthetic", "data.n_train=96", "data.n_test=32", "trainer.max_epochs=1",
                       "trainer.progress=none", "trainer.plots=none", "trainer.num_threads=1", "data.val_size=16"])
    splits = datasets.read_splits(cfg.data)
    before = {name: (t.clone(), t._version) for name, t in vars(splits).items() if isinstance(t, torch.Tensor)}
    assert run_job(cfg, tmp_path / "run", multirun=False, overrides=[]) == 0
    for name, (copy, version) in before.items():
        tensor = getattr(splits, name)
        assert tensor._version == version and torch.equal(tensor, copy), name
    assert not (tmp_path / "run" / "plots").exists()  # trainer.plots=none


# ------------------------------------------------------------ figures
def _finished_run(run_dir: Path) -> Path:
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text(
        "epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_seconds,train_samples_per_s\n"
        "1,2.0,0.3,1.9,0.35,0.001,1.0,100\n2,1.5,0.5,1.6,0.45,0.001,1.0,100\n")
    (run_dir / "confusion.csv").write_text(",cat,dog\ncat,3,1\ndog,0,4\n")
    (run_dir / "per_class.csv").write_text("class,correct,total,accuracy\ncat,3,4,0.75\ndog,4,4,1.0\n")
    images = np.stack([np.full((3, 4, 4), 40 * k, dtype=np.uint8) for k in range(5)])
    np.savez(run_dir / "predictions_sample.npz", images=images, labels=np.array([0, 1, 0, 1, 0]),
             predictions=np.array([0, 1, 1, 1, 0]), classes=np.array(["cat", "dog"]))
    return run_dir


@pytest.mark.parametrize("plots, expected", [
    ("all", {"train_loss", "test_loss", "train_acc", "test_acc", "overview", "confusion_matrix",
             "per_class_accuracy", "predictions"}),
    ("final", {"overview"}),
    ("none", set()),
])
def test_trainer_plots_chooses_the_figures(tmp_path, plots, expected):
    run_dir = _finished_run(tmp_path / "run")
    written = figures.render_run(run_dir, plots=plots)
    assert {p.stem for p in written} == expected
    on_disk = {p.stem for p in (run_dir / "plots").glob("*.png")} if expected else set()
    assert on_disk == expected
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_need_no_pyplot_and_leave_no_figure_open(tmp_path):
    code = f"""
import sys
from pathlib import Path
from cnnexp.figures import render_run
render_run(Path({str(_finished_run(tmp_path / 'run'))!r}))
print("matplotlib.pyplot" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_sample_mosaic_puts_each_image_in_its_cell():
    images = np.stack([np.full((3, 2, 3), k + 1, dtype=np.uint8) for k in range(5)])
    mosaic = figures.sample_mosaic(images, columns=2, hpad=2, vpad=1)
    assert mosaic.shape == (3 * 3, 2 * 5, 3)  # 3 rows of cells (2 + 1 high), 2 columns (3 + 2 wide)
    for k in range(5):
        r, c = divmod(k, 2)
        top, left = r * 3 + 1, c * 5 + 1
        assert (mosaic[top:top + 2, left:left + 3] == k + 1).all()
    assert (mosaic[0] == 255).all() and (mosaic[6:, 5:] == 255).all()  # caption rows, the empty last cell


def test_figures_drawn_in_the_background_appear_after_the_command_returns(tmp_path):
    run = tmp_path / "run"
    done = run_cli([*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={run}", "trainer.plots_in_background=true"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "completed"  # written before it returned
    expected = {"train_loss", "test_loss", "train_acc", "test_acc", "overview", "confusion_matrix",
                "per_class_accuracy", "predictions"}
    deadline = time.monotonic() + 120
    while "Rendered" not in (run / "cnnexp.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Rendered 8 figures" in (run / "cnnexp.log").read_text()  # the background process's own line
    assert {p.stem for p in (run / "plots").glob("*.png")} == expected


def test_the_plot_command_does_not_load_torch():
    code = "import sys, cnnexp.plot; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------- warm joblib workers
@pytest.mark.parametrize("arguments, n_jobs", [
    (["-m", "hydra/launcher=joblib", "optim.lr=0.1,0.2"], -1),
    (["--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], 2),
    (["hydra/launcher=joblib"], None),  # not a sweep
    (["-m", "optim.lr=0.1,0.2"], None),  # the basic launcher: one job at a time
    (["-m", "hydra/launcher=joblib", "hydra.launcher.max_nbytes=1M"], None),  # arguments a warm-up does not match
    (["-m", "hydra/launcher=joblib", "+experiment=fast94"], None),  # a preset might set them
    (["-m", "hydra/launcher=joblib", "--cfg", "job"], None),  # prints the config, launches nothing
])
def test_only_a_joblib_sweep_whose_arguments_are_known_is_warmed(arguments, n_jobs):
    from cnnexp.run.warm_workers import joblib_jobs

    assert joblib_jobs(arguments) == n_jobs


def test_hydras_joblib_launcher_reuses_the_warmed_workers():
    """The pool the warm-up starts is the one the launcher's own Parallel call
    gets: its arguments, as Hydra builds them from its config, match."""
    import copy
    import os

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed

    from cnnexp.cli import config_dir
    from cnnexp.run.warm_workers import launcher_arguments, warm

    warmed = warm(launcher_arguments(2))
    assert len(set(warmed)) == 2 and os.getpid() not in warmed
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                      return_hydra_config=True)
    arguments = copy.copy(instantiate(cfg.hydra.launcher).joblib)  # as the launcher's launch() sees them
    arguments["backend"] = "loky"
    process_joblib_cfg(arguments)
    pids = Parallel(**arguments)(delayed(os.getpid)() for _ in range(6))
    assert set(pids) <= set(warmed)  # no new worker was started



def test_work_handed_to_the_warm_pool_runs_in_a_worker_or_here_with_the_same_errors(tmp_path):
    import os

    from cnnexp import warm_pool
    from cnnexp.errors import ConfigError
    from cnnexp.run.ownership import check_writable
    from cnnexp.run.warm_workers import launcher_arguments

    blocked = tmp_path / "file"
    blocked.write_text("")
    try:
        assert warm_pool.call(os.getpid) == os.getpid()  # no pool offered: here
        warm_pool.offer(launcher_arguments(2))
        assert warm_pool.call(os.getpid) != os.getpid()  # in the worker
        with pytest.raises(ConfigError, match="cannot be written"):  # the worker's error, raised here
            warm_pool.call(check_writable, blocked / "run")
        warm_pool.offer({**launcher_arguments(2), "backend": "no-such-backend"})
        assert warm_pool.call(os.getpid) == os.getpid()  # a pool that cannot take it: here
    finally:
        warm_pool.withdraw()


# Put on a command's PYTHONPATH: each Python process records, as it exits, which heavy modules it imported.
RECORD_IMPORTS = """
import atexit, json, os, sys
def _record():
    with open(os.environ["CNNEXP_TEST_IMPORTS"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "loaded": [m for m in ("torch", "matplotlib", "pandas")
                                                           if m in sys.modules]}) + "\\n")
atexit.register(_record)
"""


def test_a_joblib_sweeps_parent_leaves_torch_and_the_figures_to_its_warm_workers(tmp_path):
    """The parent checks every job's `_target_` and draws the comparison plots in its warm
    workers (cnnexp/warm_pool.py), so it imports neither torch nor matplotlib; the sweep's
    files are the same as ever."""
    import os

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(RECORD_IMPORTS)
    record = tmp_path / "imports.jsonl"
    env = {"CNNEXP_TEST_IMPORTS": str(record),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "cnnexp", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                             *SMALL, "trainer.max_epochs=1", "optim.lr=0.01,0.02", "hydra.sweep.dir=sweep"],
                            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["loaded"] for r in records if r["pid"] == proc.pid] == [[]]  # the parent: none of them
    sweep = tmp_path / "sweep"
    assert (sweep / "summary.csv").is_file() and list(sweep.glob("compare_*.png"))
    for job in ("0", "1"):
        run = json.loads((sweep / job / "run.json").read_text())
        assert run["status"] == "completed" and run["pid"] != proc.pid
        assert (sweep / job / "plots" / "overview.png").is_file()
