"""The fast94 preset and the options it combines: composed values, the bad
inputs of the new keys (one line, exit 2, before any data is read), and a
tiny run of the whole recipe on synthetic data."""

import json

import pytest

from cnnexp.config.checks import validate_config
from cnnexp.engine.precision import cpu_supports_bf16
from cnnexp.errors import ConfigError
from conftest import run_cli


def test_the_preset_combines_the_recipe(compose_cfg):
    cfg = compose_cfg(["+experiment=fast94", "data.root=/nowhere"])
    assert cfg.model._target_ == "cnnexp.models.Fast94Net"
    assert (cfg.augment.flip, cfg.augment.translate, cfg.augment.cutout) == (True, 2, 0)
    assert cfg.data.batch_size == 1024 and cfg.optim.nesterov
    # The paper's summed-loss settings in cnnexp's mean-loss units (conf/experiment/fast94.yaml says how).
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (1.5, 0.85, 0.00133)
    assert cfg.model.norm_bias_lr_scale == 64.0
    t = cfg.trainer
    assert (t.label_smoothing, t.precision, t.channels_last, t.tta) == (0.2, "bf16", True, "flip_translate")
    assert t.lr_schedule == "linear" and t.warmup_epochs > 0
    assert (t.warmup_start_factor, t.final_lr_factor, t.lookahead_every, t.ema_decay) == (0.2, 0.07, 5, 0.0)
    assert cfg.augment.alternate_flip and not t.tta_each_epoch
    assert t.decay_norm_and_bias  # as in the paper: the scaled-up shifts decay at the same rate per step


def test_the_defaults_stay_the_original_experiment(compose_cfg):
    cfg = compose_cfg([])
    assert (cfg.augment.flip, cfg.augment.translate, cfg.augment.cutout) == (False, 0, 0)
    t = cfg.trainer
    assert (t.precision, t.channels_last, t.compile, t.tta, t.label_smoothing, t.ema_decay) == \
        ("32", False, False, "none", 0.0, 0.0)
    assert t.lr_schedule == "constant" and t.warmup_epochs == 0 and t.early_stopping.patience == 0
    assert (t.warmup_start_factor, t.final_lr_factor, t.lookahead_every) == (0.0, 0.0, 0)


@pytest.mark.parametrize("overrides, message", [
    (["model=timm", "model.name=resnet_18"], "model.name='resnet_18' is not a timm model; did you mean"),
    (["augment=flip_crop", "augment.translate=40"], "augment.translate=40 is not allowed"),
    (["augment=cutout", "augment.cutout=-1"], "augment.cutout=-1 is not allowed"),
    (["trainer.precision=16-mixed", "trainer.device=cpu"], "16-mixed needs a CUDA GPU"),
    (["trainer.early_stopping.patience=3", "trainer.early_stopping.monitor=val_loss"], "nothing to monitor"),
    (["data.n_train=5"], "data.n_train=5 is below the 10 classes"),
    (["data=cifar10", "data.n_train=60000"], "data.n_train=60000 is not allowed"),
    (["data.batch_size=500"], "data.batch_size=500 is larger than the training set (400 images)"),
    (["data.batch_size=380", "data.val_size=0.1"], "larger than the training set (360 images)"),
    (["augment.alternate_flip=true"], "augment.alternate_flip=true changes how images are flipped, but augment.flip"),
])
def test_bad_inputs_are_one_line_naming_the_key(compose_cfg, overrides, message):
    cfg = compose_cfg(["data=synthetic", "data.n_train=400", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bf16_on_a_cpu_without_it_says_what_to_use(compose_cfg, monkeypatch):
    import cnnexp.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"lacks .*use trainer.precision=32"):
        validate_config(compose_cfg(["data=synthetic", "trainer.precision=bf16", "trainer.device=cpu"]))


@pytest.mark.slow
def test_a_tiny_run_of_the_recipe_trains_and_records_its_options(tmp_path):
    run_dir = tmp_path / "run"
    precision = "bf16" if cpu_supports_bf16() else "32"
    result = run_cli(["+experiment=fast94", "data=synthetic", "data.n_train=256", "data.n_test=100",
                      "data.batch_size=128", "model.widths=[8,16,16]", "trainer.max_epochs=2",
                      f"trainer.precision={precision}", "trainer.early_stopping.patience=5",
                      "trainer.progress=none", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "augment: alternating flip, translate 2, lookahead every 5 steps" in result.stderr
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    lrs = [float(r.split(",")[5]) for r in rows[1:]]
    assert lrs[0] < lrs[1]  # warmup: the second epoch starts at a higher rate
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["early_stopping"]["stopped_at_epoch"] is None


@pytest.mark.parametrize("each_epoch, expected", [(True, ["flip", "flip", "flip"]), (False, ["none", "none", "flip"])])
def test_tta_in_every_evaluation_or_in_the_last_epochs_only(each_epoch, expected):
    from omegaconf import OmegaConf

    from cnnexp.engine.evaluate import epoch_tta

    trainer = OmegaConf.create({"tta": "flip", "tta_each_epoch": each_epoch, "max_epochs": 3})
    assert [epoch_tta(trainer, epoch) for epoch in (1, 2, 3)] == expected
