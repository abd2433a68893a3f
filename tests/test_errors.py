"""Bad input and faults a new user meets: each is one clear line, never a traceback,
and loses nothing already written. Rules are unit tests; one CLI case per class."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cnnexp.errors import ConfigError
from cnnexp.targets import check_all_targets, check_target, locate
from cnnexp.validate import validate_config
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
    cfg.logger = {"tensorboard": {"_target_": "nosuch_tracker.Logger"}}
    with pytest.raises(ConfigError, match=r"logger.tensorboard._target_='nosuch_tracker.Logger' cannot be imported"):
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
])
def test_config_errors_name_the_key(compose_cfg, overrides, key):
    cfg = compose_cfg(["data=synthetic", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(key)
    assert err.value.exit_code == 2


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
    (tmp_path / "my_conf" / "logger").mkdir(parents=True)
    (tmp_path / "my_conf" / "logger" / "jsonl.yaml").write_text("path: log.jsonl\n")
    result = run_cli(["model=wide_cnn", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("cnnexp: train image classifiers")
    assert "_schema" not in text
    groups = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()
              if line.startswith("  ") and line.split()[0] in {"data", "model", "optim", "trainer", "logger",
                                                                 "hydra/launcher"}}
    assert groups["model"] == "tutorial_cnn, wide_cnn*"  # the chosen option is marked
    assert groups["optim"] == "adam, sgd*" and groups["data"] == "cifar10*, imagefolder, synthetic"
    assert groups["logger"].startswith("jsonl") and "+logger=NAME" in groups["logger"]
    assert "joblib" in groups["hydra/launcher"]
    for example in ("cnnexp -m ", "trainer.resume=", "python -m cnnexp.plot", "outputs/<date>/<time>/"):
        assert example in text
