"""Bad input and faults a new user meets: each is one clear line, never a traceback,
and loses nothing already written. Rules are unit tests; one CLI case per class."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cnnexp.config.checks import validate_config
from cnnexp.config.targets import check_all_targets, check_target, locate
from cnnexp.data import ImageSplits
from cnnexp.errors import ConfigError, DiskFull
from cnnexp.plot import main as plot_main
from cnnexp.results import record as runrecord
from cnnexp.results.metrics import MetricsCSV
from cnnexp.results.record import RunRecord
from cnnexp.safeio import appending, atomic_path, is_disk_full
from conftest import SMALL, run_cli


# ------------------------------------------------------------ _target_ entries
@pytest.mark.parametrize("path, message", [
    ("nosuch.Model", "no module named 'nosuch'"),
    ("cnnexp.models.Nope", "cnnexp.models has no attribute 'Nope'"),
    ("torch.nn.NoSuchLayer", "torch.nn has no attribute 'NoSuchLayer'"),
    ("not a path", "not a dotted Python name"),
    ("", "not a dotted Python name"),
])
def test_a_target_that_cannot_be_imported_names_key_value_and_cause(path, message):
    with pytest.raises(ConfigError) as err:
        locate("model._target_", path)
    assert f"model._target_={path!r}" in str(err.value) and message in str(err.value)


def test_a_module_whose_import_fails_is_reported_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg.py").write_text("import nosuchdependency\n")
    (tmp_path / "raisingpkg.py").write_text("raise RuntimeError('needs a licence key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="brokenpkg needs 'nosuchdependency', which is not installed"):
        locate("model._target_", "brokenpkg.Net")
    with pytest.raises(ConfigError, match="importing raisingpkg raised RuntimeError: needs a licence key"):
        locate("model._target_", "raisingpkg.Net")


def test_a_target_that_is_not_callable_is_refused():
    with pytest.raises(ConfigError, match="is a module, not a class or function"):
        check_target(OmegaConf.create({"_target_": "cnnexp.models"}), "model")
    with pytest.raises(ConfigError, match="is a int, not a class or function"):
        check_target(OmegaConf.create({"_target_": "errno.ENOSPC"}), "model")


def test_keys_a_target_does_not_take_and_arguments_nobody_gives_are_named(tmp_path, monkeypatch):
    (tmp_path / "deepnets.py").write_text(
        "class Net:\n    def __init__(self, in_channels, num_classes, depth, act='relu'):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # The model gets in_channels and num_classes from the dataset: nn.Linear takes neither.
    with pytest.raises(ConfigError, match="does not take in_channels, num_classes"):
        check_target(OmegaConf.create({"_target_": "torch.nn.Linear"}), "model",
                     supplied=("in_channels", "num_classes"), complete=True)
    with pytest.raises(ConfigError, match=r"takes no argument width \(set by model.width\)"):
        check_target(OmegaConf.create({"_target_": "cnnexp.models.TutorialCNN", "width": 3}), "model",
                     supplied=("in_channels", "num_classes"), complete=True)
    with pytest.raises(ConfigError, match=r"needs depth, which the config does not set; add \+model.depth=\.\.\."):
        check_target(OmegaConf.create({"_target_": "deepnets.Net"}), "model",
                     supplied=("in_channels", "num_classes"), complete=True)
    check_target(OmegaConf.create({"_target_": "deepnets.Net", "depth": 3}), "model",
                 supplied=("in_channels", "num_classes"), complete=True)
    # A target that takes **kwargs accepts any key; the parameters go in by position.
    check_target(OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}), "optim",
                 supplied=("params",), complete=True)
    check_target(OmegaConf.create({"_target_": "builtins.dict", "anything": 1}), "logger")


def test_every_target_in_a_config_is_checked_also_in_groups_cnnexp_does_not_know(compose_cfg):
    cfg = compose_cfg(["data=synthetic"])
    check_all_targets(cfg)  # the defaults are sound
    OmegaConf.set_struct(cfg, False)
    cfg.plugins = {"tracker": {"_target_": "nosuch_tracker.Logger"}}
    with pytest.raises(ConfigError, match=r"plugins.tracker._target_='nosuch_tracker.Logger' cannot be imported"):
        check_all_targets(cfg)
    listed = OmegaConf.create({"callbacks": [{"_target_": "collections.OrderedDict"}, {"_target_": "no.Such"}]})
    with pytest.raises(ConfigError, match=r"callbacks\[1\]._target_='no.Such'"):
        check_all_targets(listed)


@pytest.mark.parametrize("overrides, key", [
    (["model._target_=nosuch.Model"], "model._target_"),
    (["optim._target_=torch.optim.Nope"], "optim._target_"),
    (["optim=adam", "+optim.momentum=0.9"], "optim._target_"),
    (["model=wide_cnn", "model.width=0"], "model.width"),
    (["model=wide_cnn", "model.width=-4"], "model.width"),
    (["model=wide_cnn", "model.dropout=1.0"], "model.dropout"),
    (["model=wide_cnn", "model.dropout=-0.1"], "model.dropout"),
    (["+model.width=8"], "model._target_"),
    (["trainer.seed=-1"], "trainer.seed"),
    (["data.seed=-3"], "data.seed"),
    (["data.noise=-1"], "data.noise"),
    (["data.std=[0.5,0.5]"], "data.mean"),
    (["optim._target_=torch.optim.LBFGS"], "optim._target_"),  # needs a closure in step()
])
def test_config_errors_name_the_key(compose_cfg, overrides, key):
    cfg = compose_cfg(["data=synthetic", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(key)
    assert err.value.exit_code == 2


def test_a_mandatory_key_left_unset_is_named_with_what_it_holds(compose_cfg):
    with pytest.raises(ConfigError, match=r"data.root must be set: add data.root=\.\.\. \(a folder holding train/"):
        validate_config(compose_cfg(["data=imagefolder"]))


def test_group_options_offered_by_hydra_are_the_real_ones_not_the_schema_nodes(compose_cfg):
    with pytest.raises(Exception) as err:
        compose_cfg(["model=nosuch"])
    options = str(err.value).split("Available options in 'model':")[1].split("Config search path")[0]
    assert options.split() == ["fast94_net", "resnet18", "timm", "tutorial_cnn", "wide_cnn"]
    with pytest.raises(Exception) as err:  # the schema still types the keys
        compose_cfg(["optim.lr=abc"])
    assert "could not be converted to Float" in str(err.value.__cause__)


def test_sound_model_values_pass(compose_cfg):
    validate_config(compose_cfg(["data=synthetic", "model=wide_cnn", "model.width=1", "model.dropout=0"]))


def test_a_bad_target_is_one_line_exit_2_before_any_data_is_read(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*SMALL, "model._target_=nosuch.Model", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: model._target_='nosuch.Model' cannot be imported: there is no module named 'nosuch' "
        "(is it installed, or its folder on PYTHONPATH?)."]
    assert not (run_dir / "metrics.csv").exists()


# ------------------------------------------------------------ first impressions
def test_help_describes_cnnexp_and_lists_real_options_also_from_a_users_own_folder(tmp_path):
    (tmp_path / "my_conf" / "mixing").mkdir(parents=True)
    (tmp_path / "my_conf" / "mixing" / "flip.yaml").write_text("p: 0.5\n")
    result = run_cli(["model=wide_cnn", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("cnnexp: train image classifiers")
    assert "_schema" not in text
    groups = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()
              if line.startswith("  ") and line.split()[0] in {"data", "model", "optim", "trainer", "mixing",
                                                                 "hydra/launcher"}}
    assert groups["model"] == "fast94_net, resnet18, timm, tutorial_cnn, wide_cnn*"  # the chosen option is marked
    assert groups["optim"] == "adam, sgd*" and groups["data"] == "cifar10*, imagefolder, synthetic"
    assert groups["mixing"] == "flip   (add with +mixing=NAME)"  # a group of the user's own
    assert "joblib" in groups["hydra/launcher"]
    for example in ("cnnexp -m ", "trainer.resume=", "python -m cnnexp.plot", "outputs/<date>/<time>/"):
        assert example in text


# ------------------------------------------------------------ a full disk
def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    with pytest.raises(DiskFull, match=rf"{target} could not be written"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise _enospc()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    with pytest.raises(ValueError):  # any other failure: no temp file either, and the error is kept
        with atomic_path(target) as tmp:
            tmp.write_text("x")
            raise ValueError("bug")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_torch_save_on_a_full_disk_is_recognised_through_torchs_own_error():
    with pytest.raises(Exception) as err:  # torch wraps the OSError in a RuntimeError
        with open("/dev/full", "wb") as f:
            torch.save({"w": torch.zeros(100_000)}, f)
    assert is_disk_full(err.value)
    assert not is_disk_full(RuntimeError("unrelated"))


def test_a_failed_append_cuts_the_half_written_row(tmp_path):
    path = tmp_path / "metrics.csv"
    metrics = MetricsCSV(path)
    metrics.rewrite([{"epoch": 1, "train_loss": 2.0}])
    before = path.read_text()
    with pytest.raises(DiskFull):
        with appending(path) as f:
            f.write("2,1.9,0.3,")
            f.flush()
            raise _enospc()
    assert path.read_text() == before


def test_run_json_is_written_in_place_when_no_temp_file_fits(tmp_path, monkeypatch):
    record = RunRecord(tmp_path)
    record.write()
    monkeypatch.setattr(runrecord, "write_text", lambda *a, **k: (_ for _ in ()).throw(DiskFull("full")))
    assert record.finish("failed", error="The disk is full")
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "The disk is full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_an_image_cache_that_does_not_fit_leaves_no_temp_file(tmp_path, monkeypatch):
    from cnnexp.data import imagefolder

    def save_half(obj, f):
        f.write(b"\0" * 1000)
        raise _enospc()

    monkeypatch.setattr(imagefolder.torch, "save", save_half)
    cache = tmp_path / ".cnnexp-cache" / "key.pt"
    splits = ImageSplits(*(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)) * 2,
                         classes=["a", "b"])
    imagefolder._write_cache(cache, splits)  # a cache is optional: no error, and nothing left behind
    assert list(cache.parent.iterdir()) == []


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode().strip()}")


@pytest.mark.slow
def test_a_run_on_a_full_disk_says_so_keeps_its_rows_and_resumes_once_space_is_freed(tmp_path):
    disk = tmp_path / "disk"
    # Room for one checkpoint (about 0.5 MB: weights and momentum) but not for the next one beside it.
    _mount_tmpfs(disk, "800k")
    try:
        run_dir = disk / "run"
        result = run_cli([*SMALL, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert f"The disk is full: {run_dir / 'checkpoints' / 'last.pt'} could not be written" in line
        assert f"filesystem at {disk}" in line and f"trainer.resume={run_dir}" in line
        with open(run_dir / "metrics.csv") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "failed" and "The disk is full" in record["error"]
        assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = run_cli([f"trainer.resume={run_dir}", f"hydra.run.dir={disk / 'resume'}"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        with open(run_dir / "metrics.csv") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]
        assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
        assert not [p for p in disk.rglob("*") if ".tmp" in p.name]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------ plotting what there is
HEADER = "epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_seconds,train_samples_per_s\n"
ROW1 = "1,2.3,0.10,2.2,0.12,0.001,1.0,700\n"
ROW2 = "2,2.1,0.20,2.0,0.20,0.001,1.0,700\n"


@pytest.mark.parametrize("content, figures, note", [
    ("", 0, "metrics.csv is empty"),
    (HEADER, 0, "metrics.csv has no rows yet"),
    (HEADER + ROW1 + "2,2.1,0.2,", 5, "1 unreadable or incomplete row(s) of metrics.csv skipped"),
    (HEADER + ROW1 + "garbled line\n" + ROW2, 5, "1 unreadable or incomplete row(s)"),
    ("epoch,train_loss,test_acc\n1,2.3,0.1\n2,2.0,0.2\n", 3, "no train_acc, test_loss, lr column(s)"),
    ("\xff\xfe binary", 0, "metrics.csv cannot be read"),
])
def test_plotting_a_half_written_or_older_run_draws_what_it_can_and_names_what_is_missing(
        tmp_path, capsys, content, figures, note):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_bytes(content.encode("latin-1"))
    code = plot_main([str(run_dir)])
    out, err = capsys.readouterr()
    assert code == (0 if figures else 1)
    assert len(list((run_dir / "plots").glob("*.png"))) == figures
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and note in notes[0] and "no readable run.json" in notes[0]
    assert "Traceback" not in out + err


def test_plotting_a_run_with_damaged_result_files_skips_only_their_figures(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text(HEADER + ROW1 + ROW2)
    (tmp_path / "run.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "confusion.csv").write_text("true\\predicted,a\nx")
    (tmp_path / "per_class.csv").write_text("class,correct\n")
    (tmp_path / "predictions_sample.npz").write_text("not an npz")
    assert plot_main([str(tmp_path)]) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    for name in ("confusion.csv", "per_class.csv", "predictions_sample.npz"):
        assert f"{name} cannot be drawn" in note
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == {"train_loss", "test_loss", "train_acc",
                                                                     "test_acc", "overview"}


def test_plotting_a_run_that_failed_before_its_first_epoch_names_why(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    assert plot_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"Nothing to draw in {tmp_path}" in out
    assert "no metrics.csv" in out and "run.json says failed" in out


def test_plotting_a_sweep_with_empty_missing_and_older_jobs(tmp_path, capsys):
    (tmp_path / "multirun.yaml").write_text("")
    for job in "0123":
        (tmp_path / job).mkdir()
    (tmp_path / "0" / "metrics.csv").write_text(HEADER + ROW1 + ROW2)
    (tmp_path / "0" / "run.json").write_text(json.dumps({"status": "completed", "overrides": ["optim.lr=0.1"]}))
    (tmp_path / "1" / "metrics.csv").write_text("")
    (tmp_path / "1" / "run.json").write_text(json.dumps({"status": "running", "overrides": ["optim.lr=0.2"]}))
    (tmp_path / "2" / "metrics.csv").write_text("epoch,train_loss,test_acc\n1,2.3,0.1\n")
    assert plot_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: job 1: metrics.csv is empty" in out and "note: job 3: no metrics.csv" in out
    with open(tmp_path / "summary.csv") as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert rows["0"]["status"] == "completed" and float(rows["0"]["best_test_acc"]) == 0.2
    assert rows["1"]["status"] == "running" and rows["1"]["epochs"] == "0"
    assert float(rows["2"]["best_test_acc"]) == 0.1
    assert (tmp_path / "compare_test_acc.png").is_file()


def test_plot_command_on_an_empty_metrics_file_is_one_note_and_no_traceback(tmp_path):
    (tmp_path / "metrics.csv").write_text("")
    result = run_cli([str(tmp_path)], cwd=tmp_path, module="cnnexp.plot")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr == ""
    assert "note:" in result.stdout and "metrics.csv is empty" in result.stdout


def test_an_empty_output_dir_or_a_disk_without_room_for_hydras_files_is_refused_before_the_run(
        tmp_path, monkeypatch, capsys):
    from cnnexp import preflight

    with pytest.raises(SystemExit) as stop:
        preflight._check("", "hydra.run.dir")
    assert stop.value.code == 2 and "hydra.run.dir is empty" in capsys.readouterr().err
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=8 * 1024))
    with pytest.raises(SystemExit) as stop:
        preflight._check(str(tmp_path / "run"), "hydra.run.dir")
    assert stop.value.code == 1
    assert f"The disk is full: the filesystem at {preflight.mount_point(tmp_path)} holding {tmp_path / 'run'} has " \
           "only 8 kB free" in capsys.readouterr().err
