"""No key is silently ignored: a key nothing reads (Hydra lets `+key=` and `++key=` add
one to any node) is refused with one line naming it and the closest real key, exit 2,
for runs, sweeps and searches; keys a `_target_` takes are checked against its signature."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from cnnexp.cli import config_dir
from cnnexp.config.checks import check_unknown_keys, unknown_keys, validate_config
from cnnexp.config.keys import closest_key, default_options, unknown_override
from cnnexp.config.targets import check_all_targets
from cnnexp.errors import ConfigError
from conftest import run_cli


@pytest.mark.parametrize("override, named, closest", [
    ("+trainer.amp=true", "trainer.amp", "trainer.precision"),  # another tool's name for it
    ("+trainer.max_epoch=3", "trainer.max_epoch", "trainer.max_epochs"),
    ("+data.batchsize=8", "data.batchsize", "data.batch_size"),
    ("+data.augment=true", "data.augment", "augment"),
    ("++logger.tensorbord=true", "logger.tensorbord", "logger.tensorboard"),  # ++ adds just as + does
    ("+epochs=3", "epochs", "trainer.max_epochs"),  # the top level
    ("+nmae=baseline", "nmae", "name"),
])
def test_a_key_nothing_reads_is_refused_naming_the_closest_real_key(compose_cfg, override, named, closest):
    cfg = compose_cfg(["data=synthetic", override])  # Hydra itself accepts it
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
    message = str(caught.value)
    assert message.startswith(f"{named}: no such key") and f"the closest key is {closest} " in message
    assert "\n" not in message


def test_a_key_of_another_group_option_says_which_option_has_it(compose_cfg):
    cfg = compose_cfg(["data=cifar10", "+data.noise=0.5"])
    with pytest.raises(ConfigError, match=r"^data.noise: no such key in data=cifar10 \(it is a key of "
                                          r"data=synthetic\).*choose data=synthetic or remove it"):
        check_unknown_keys(cfg)


def test_without_a_close_key_the_message_lists_the_keys_there(compose_cfg):
    cfg = compose_cfg(["data=synthetic", "+logger.zzz=1"])
    with pytest.raises(ConfigError, match="the keys in logger are: tensorboard, mlflow, tracking_uri"):
        check_unknown_keys(cfg)


def test_the_composed_defaults_have_no_unknown_key(compose_cfg):
    for overrides in ([], ["data=synthetic", "model=wide_cnn", "optim=adam", "logger=all"], ["data=imagefolder"]):
        assert unknown_keys(compose_cfg(overrides)) == []


def test_keys_a_custom_target_takes_stay_allowed_and_others_are_refused(compose_cfg, tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\n\n\nclass Net(nn.Linear):\n"
        "    def __init__(self, in_channels, num_classes, hidden=8):\n"
        "        super().__init__(in_channels, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_cfg(["data=synthetic", "model._target_=my_nets.Net", "+model.hidden=16"])
    assert unknown_keys(cfg) == []  # a _target_ node's keys go to the target ...
    check_all_targets(cfg)  # ... which takes hidden
    cfg = compose_cfg(["data=synthetic", "model._target_=my_nets.Net", "+model.hiden=16"])
    with pytest.raises(ConfigError, match=r"takes no argument hiden \(set by model.hiden\); it takes: .*hidden"):
        validate_config(cfg)
    sys.modules.pop("my_nets", None)


def test_closest_key_prefers_a_sibling_then_the_same_name_elsewhere():
    known = ["trainer.max_epochs", "trainer.seed", "data.batch_size", "data.seed"]
    assert closest_key("trainer.sed", known) == "trainer.seed"
    assert closest_key("trainer.batch_size", known) == "data.batch_size"
    assert closest_key("trainer.zzz", known) is None


# ------------------------------------------------------------------ the command line: run, sweep, search
@pytest.mark.parametrize("args", [
    ["data=synthetic", "+trainer.amp=true"],
    ["-m", "data=synthetic", "+trainer.amp=true,false"],  # a swept added key
    ["-m", "data=synthetic,cifar10", "++data.noise=0.5"],  # fine for one group option, not for the other
    ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "data=synthetic", "+trainer.amp=interval(0, 1)"],
    # checked in a warm worker (cnnexp/warm_pool.py), said by the parent alike
    ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data=synthetic", "+trainer.amp=true,false"],
], ids=["run", "sweep", "swept-group", "search", "joblib-sweep"])
def test_runs_sweeps_and_searches_stop_before_any_job_with_one_line_and_exit_2(tmp_path, args):
    result = run_cli([*args, "trainer.max_epochs=1", "hydra.run.dir=run", "hydra.sweep.dir=sweep"], tmp_path,
                     timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    key = "data.noise" if "++data.noise=0.5" in args else "trainer.amp"
    assert errors[0].startswith(f"error: {key}: no such key") or f"] error: {key}: no such key" in errors[0]
    assert not (tmp_path / "sweep" / "0").exists()  # no job ran


def test_a_joblib_sweep_checks_each_jobs_target_in_a_worker_and_stops_before_any_job(tmp_path):
    result = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data=synthetic",
                      "model._target_=cnnexp.models.TutorialCNN", "+model.hidden=3", "optim.lr=0.1,0.2",
                      "trainer.max_epochs=1", "hydra.sweep.dir=sweep"], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "takes no argument hidden (set by model.hidden)" in errors[0]
    assert not (tmp_path / "sweep" / "0").exists()


# ------------------------------------------------------------------ before Hydra: a key without `+`
DEFAULTS = default_options(Path(config_dir()) / "config.yaml")


def test_the_default_options_are_read_from_the_config_files_defaults_list():
    assert DEFAULTS == {"model": "tutorial_cnn", "optim": "sgd", "data": "cifar10", "trainer": "default",
                        "augment": "none"}


@pytest.mark.parametrize("args, message", [
    (["trainer.epochs=3"], "trainer.epochs: no such key in trainer, .* the closest key is trainer.max_epochs "),
    (["data.batchsize=8"], "the closest key is data.batch_size "),
    (["nmae=x"], "nmae: no such key at the top level, .* the closest key is name "),
    (["trainer.early_stopping.patiense=2"], "the closest key is trainer.early_stopping.patience "),
    (["data=cifar10", "data.noise=0.5"], r"data.noise: no such key in data=cifar10 \(it is a key of data=synthetic"),
    (["logger=tensorboard", "logger.zzz=1"], "the keys in logger are: tensorboard, mlflow"),
])
def test_a_mistyped_key_on_the_command_line_is_named_before_hydra_composes(args, message):
    found = unknown_override(args, DEFAULTS)
    assert found is not None and re.search(message, found), found


@pytest.mark.parametrize("args", [
    ["data=synthetic", "data.noise=0.5", "model=wide_cnn", "optim=adam", "optim.betas=[0.9,0.99]"],
    ["+trainer.amp=true"],  # added keys: checked once composed (above)
    ["+experiment=fast94", "model.anything=1"],  # a preset may choose other options: left to the composed check
    ["model=tutorial_cnn,wide_cnn", "model.widths=[8,8,8]"],  # a sweep over options
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data.mean.0=0.5", "name=x", "tags=[a]", "logger=all"],
])
def test_keys_the_schema_has_or_cannot_judge_pass_the_command_line_check(args):
    assert unknown_override(args, DEFAULTS) is None


def test_the_command_refuses_a_mistyped_key_with_one_line_and_exit_2(tmp_path):
    result = run_cli(["trainer.max_epoch=3"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cnnexp: error: trainer.max_epoch: no such key in trainer, so nothing in cnnexp would read it; the closest "
        "key is trainer.max_epochs (remove trainer.max_epoch, or set trainer.max_epochs instead)."]
    assert list(tmp_path.iterdir()) == []  # nothing written
