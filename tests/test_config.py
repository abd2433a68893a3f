"""The composed config: the original experiment's numbers, and the schema's checks."""

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from conftest import run_cli


def test_defaults_are_the_original_experiment(compose_cfg):
    cfg = compose_cfg()
    assert cfg.model._target_ == "cnnexp.models.TutorialCNN"
    assert cfg.trainer.max_epochs == 50
    assert cfg.data.name == "cifar10"
    assert cfg.data.batch_size == 4
    assert cfg.optim._target_ == "torch.optim.SGD"
    assert cfg.optim.lr == 0.001
    assert cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 0.0 and cfg.optim.nesterov is False
    assert list(cfg.data.mean) == [0.5, 0.5, 0.5] and list(cfg.data.std) == [0.5, 0.5, 0.5]
    assert cfg.trainer.device == "auto"
    assert cfg.trainer.eval_batch_size != cfg.data.batch_size  # evaluation has its own batch size


def test_data_root_follows_environment_variable(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("CNNEXP_DATA_DIR", str(tmp_path))
    assert compose_cfg().data.root == str(tmp_path)
    monkeypatch.delenv("CNNEXP_DATA_DIR")
    assert compose_cfg().data.root.endswith(".cache/cnnexp/data")


@pytest.mark.parametrize("group, option, expected", [
    ("model", "wide_cnn", {"_target_": "cnnexp.models.WideCNN", "width": 32, "dropout": 0.1}),
    ("optim", "adam", {"_target_": "torch.optim.Adam", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.0}),
    ("data", "synthetic", {"name": "synthetic", "batch_size": 4, "n_train": 5000, "n_test": 1000}),
    ("data", "imagefolder", {"name": "imagefolder", "batch_size": 4, "resize": None, "cache": True}),
])
def test_group_options_compose(compose_cfg, group, option, expected):
    node = compose_cfg([f"{group}={option}"])[group]
    assert {k: node[k] for k in expected} == expected
    if option == "adam":
        assert "momentum" not in node and "nesterov" not in node  # nothing of sgd's is left behind


@pytest.mark.parametrize("override, cause", [("optim.lr=abc", ValidationError),
                                             ("trainer.epochs=3", ConfigAttributeError),
                                             ("data.batch_size=four", ValidationError)])
def test_schema_rejects_wrong_types_and_unknown_keys(compose_cfg, override, cause):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([override])
    assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
    key = override.split("=")[0]
    assert key.split(".")[-1] in str(info.value.__cause__) and key in str(info.value)


@pytest.mark.slow
def test_cli_type_error_names_the_key_without_traceback(tmp_path):
    result = run_cli(["optim.lr=abc", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 1  # Hydra's exit code for a config it cannot compose
    assert "optim.lr" in result.stderr and "could not be converted to Float" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_console_script_prints_config(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("cnnexp") or str(Path(sys.executable).parent / "cnnexp")
    result = subprocess.run([script, "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.001" in result.stdout and "max_epochs: 50" in result.stdout


def test_slurm_preset_composes_with_submitit(tmp_path):
    from hydra import compose, initialize_config_dir

    from cnnexp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.cpus_per_task >= 1


# ------------------------------------------------ optimisers named by _target_
def test_another_optimiser_gets_only_the_arguments_it_takes(compose_cfg):
    from cnnexp.config.checks import validate_config
    from cnnexp.config.targets import check_optimizer, optimizer_config
    from cnnexp.engine.optimizers import FlatSGD, TorchOptimizer, build_optimizer
    from cnnexp.models import TutorialCNN

    cfg = compose_cfg(["data=synthetic", "optim._target_=torch.optim.RMSprop"])  # the sgd group: momentum 0.9, nesterov false
    validate_config(cfg)  # the sgd group's nesterov, at its group value, is no error for RMSprop
    check_optimizer(cfg.optim)
    optimizer = build_optimizer(optimizer_config(cfg.optim), TutorialCNN(), fast_path=True)
    assert isinstance(optimizer, TorchOptimizer) and isinstance(optimizer.optimizer, torch.optim.RMSprop)
    group = optimizer.optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["lr"] == 0.001 and "nesterov" not in group
    # SGD from the adam group: betas left out, momentum at SGD's default (none).
    cfg = compose_cfg(["optim=adam", "optim._target_=torch.optim.SGD"])
    sgd = build_optimizer(optimizer_config(cfg.optim), TutorialCNN(), fast_path=True)
    assert isinstance(sgd, FlatSGD) and sgd.momentum == 0.0 and sgd.momentum_buffer is None


@pytest.mark.parametrize("overrides, named", [
    (["optim._target_=torch.optim.Adagrad", "optim.nesterov=true"], "nesterov"),
    (["optim._target_=torch.optim.Adagrad", "optim.momentum=0.5"], "momentum"),
    (["optim._target_=torch.optim.Adagrad", "+optim.amsgrad=true"], "amsgrad"),
    (["optim.nesterov=true", "optim.momentum=0"], "Nesterov"),  # SGD's own rule
    (["optim._target_=torch.optim.LBFGS"], "closure"),  # its step() re-evaluates the loss itself
])
def test_a_bad_optimiser_combination_is_a_config_error(compose_cfg, overrides, named):
    from cnnexp.config.checks import validate_config
    from cnnexp.config.targets import check_optimizer
    from cnnexp.errors import ConfigError

    cfg = compose_cfg(["data=synthetic", *overrides])
    with pytest.raises(ConfigError, match=named) as info:
        validate_config(cfg)
        check_optimizer(cfg.optim)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
