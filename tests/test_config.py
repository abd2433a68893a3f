"""The composed config: the original experiment's numbers, and the schema's checks."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

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


@pytest.mark.parametrize("group, option", [("model", "wide_cnn"), ("optim", "adam"), ("data", "synthetic"),
                                           ("data", "imagefolder")])
def test_group_options_compose(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"])
    assert cfg[group] is not None


@pytest.mark.parametrize("override, error", [("optim.lr=abc", ValidationError),
                                             ("trainer.epochs=3", ConfigKeyError),
                                             ("data.batch_size=four", ValidationError)])
def test_schema_rejects_wrong_types_and_unknown_keys(compose_cfg, override, error):
    with pytest.raises((ConfigCompositionException, error)) as info:
        compose_cfg([override])
    assert override.split("=")[0].split(".")[-1] in str(info.value) + str(info.value.__cause__)


def test_cli_type_error_names_the_key_without_traceback(tmp_path):
    result = run_cli(["optim.lr=abc", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0
    assert "optim.lr" in result.stderr
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
