"""A resumed run draws the same random numbers an uninterrupted one draws.

Every random state a checkpoint holds (torch, numpy, Python and the data-order
generator) is checked on its own, value by value; then a model with dropout
(whose masks come from torch's global generator) is trained 2 epochs at once
and 1 + 1 epochs with a resume in between, in this process, and the two runs
must agree bit for bit.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cnnexp.run.job import run_job
from cnnexp.run.resume import Checkpoint, restore, restore_rng_states, rng_states
from conftest import SMALL, rows_without_timing

# Dropout 0.5 on the eager step: every training step draws from torch's global generator.
DROPOUT = [*SMALL, "data.n_train=120", "data.n_test=40", "model=wide_cnn", "model.width=4", "model.dropout=0.5",
           "trainer.device=cpu", "trainer.progress=none", "trainer.num_threads=1", "trainer.cpu_step=eager",
           "optim.lr=0.01"]


def draws(generator: torch.Generator) -> list:
    """One number from each generator a run may use."""
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            torch.rand(3, generator=generator).tolist()]


@pytest.mark.parametrize("source", range(4), ids=["torch", "numpy", "python", "data_order"])
def test_every_random_state_of_a_checkpoint_is_put_back(source):
    generator = torch.Generator().manual_seed(7)
    states = rng_states(generator)
    expected = draws(generator)
    draws(generator)  # move every generator on
    restore_rng_states(states, generator)
    assert draws(generator)[source] == expected[source]


def test_restore_puts_the_checkpoints_random_states_back():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    saved = Checkpoint(epoch=2, step=0, model={k: v.clone() for k, v in model.state_dict().items()},
                       optimizer=optimizer.state_dict(), rng=rng_states(generator), metrics=[{"epoch": 1}] * 2,
                       config={})
    expected = draws(generator)
    fresh = torch.Generator().manual_seed(99)
    point = restore(saved, model, optimizer, fresh)
    assert (point.epoch, point.step, len(point.rows)) == (3, 0, 2)
    assert draws(fresh) == expected


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The run trained 2 epochs without a stop."""
    from hydra import compose, initialize_config_dir

    from cnnexp.cli import config_dir

    run_dir = tmp_path_factory.mktemp("whole")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*DROPOUT, "trainer.max_epochs=2"])
    assert run_job(cfg, run_dir, False, []) == 0
    return run_dir


def one_epoch_then_resume(compose_cfg, tmp_path, change_checkpoint=lambda checkpoint: None):
    """The same run trained 1 epoch, then resumed for the second; its run dir."""
    split = tmp_path / "split"
    assert run_job(compose_cfg([*DROPOUT, "trainer.max_epochs=1"]), split, False, []) == 0
    checkpoint = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
    change_checkpoint(checkpoint)
    torch.save(checkpoint, split / "checkpoints" / "last.pt")
    again = [f"trainer.resume={split}", "trainer.max_epochs=2"]
    assert run_job(compose_cfg([*DROPOUT, *again]), tmp_path / "elsewhere", False, again) == 0
    return split


def test_a_resumed_run_with_dropout_matches_an_uninterrupted_one(compose_cfg, tmp_path, whole, log_handlers):
    split = one_epoch_then_resume(compose_cfg, tmp_path)
    rows = rows_without_timing(split / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows == rows_without_timing(whole / "metrics.csv")  # the same strings: bitwise
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((split / "run.json").read_text())
    assert record["resumed_from"] == str(split / "checkpoints" / "last.pt")
    assert record["status"] == "completed" and record["epochs_completed"] == 2
    assert json.loads((whole / "run.json").read_text())["resumed_from"] is None


def test_the_check_can_see_a_lost_torch_state(compose_cfg, tmp_path, whole, log_handlers):
    """Without the checkpoint's torch state the dropout masks of epoch 2 differ, and so do its numbers."""

    def forget_torch_state(checkpoint):
        checkpoint["rng"]["torch"] = torch.Generator().manual_seed(12345).get_state()

    split = one_epoch_then_resume(compose_cfg, tmp_path, forget_torch_state)
    first, second = rows_without_timing(split / "metrics.csv"), rows_without_timing(whole / "metrics.csv")
    assert first[0] == second[0] and first[1] != second[1]
