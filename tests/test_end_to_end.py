"""Whole runs through the options the README advertises: an image folder with its
cache, the wide model with Adam and a cosine schedule (and resuming it), a model
and an optimiser of the user's own through hydra.searchpath, the plain
torch.optim path, and the CUDA-graph switch."""

import csv
import json
import math
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from cnnexp.results.metrics import TIMING_COLUMNS
from conftest import StderrLines, run_cli, start_cli, write_module

pytestmark = pytest.mark.slow

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = ("cat", "dog"), 100, 10
STEPS_PER_EPOCH = len(CLASSES) * TRAIN_PER_CLASS // 4


def read_rows(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """An image folder whose two classes differ in brightness, with noise."""
    root = tmp_path_factory.mktemp("images") / "pets"
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.normal(80 + 100 * label, 40, (32, 32, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


WIDE_ADAM_COSINE = ["data=imagefolder", "model=wide_cnn", "model.width=4", "optim=adam", "optim.lr=0.002",
                    "trainer.lr_schedule=cosine", "trainer.max_epochs=3", "trainer.device=cpu",
                    "trainer.num_threads=1", "trainer.progress=log"]


@pytest.fixture(scope="module")
def wide_adam_run(image_root):
    """The run, started from the folder above the images with a relative data.root."""
    run_dir = image_root.parent / "run"
    result = run_cli([*WIDE_ADAM_COSINE, "data.root=pets", f"hydra.run.dir={run_dir}"], cwd=image_root.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_imagefolder_wide_cnn_adam_cosine(wide_adam_run, image_root):
    rows = read_rows(wide_adam_run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # The lr column follows the cosine schedule: 0.002 * (1 + cos(pi * (epoch - 1) / 3)) / 2.
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [0.002 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)], rel=1e-12)
    log = (wide_adam_run / "cnnexp.log").read_text()
    assert "Training WideCNN on imagefolder (200 train / 20 test images, 2 classes)" in log and "Adam" in log
    assert f"Decoding {len(CLASSES) * (TRAIN_PER_CLASS + TEST_PER_CLASS)} images" in log
    with open(wide_adam_run / "per_class.csv") as f:
        assert [r["class"] for r in csv.DictReader(f)] == list(CLASSES)
    state = torch.load(wide_adam_run / "checkpoints" / "last.pt", weights_only=False)
    assert state["optimizer"]["kind"] == "torch" and "exp_avg" in state["optimizer"]["state"]["state"][0]
    assert any(k.endswith("running_mean") for k in state["model"])  # batch norm's statistics are kept
    assert float(rows[-1]["test_acc"]) > 0.5 + 1e-9  # brightness is easy to learn
    assert len(list((image_root / ".cnnexp-cache").glob("*.pt"))) == 1


def test_second_run_reads_the_image_cache_and_repeats_the_first_exactly(wide_adam_run, image_root, tmp_path):
    run_dir = tmp_path / "again"
    result = run_cli([*WIDE_ADAM_COSINE, f"data.root={image_root}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (run_dir / "cnnexp.log").read_text()
    assert "Loaded decoded images from" in log and "Decoding" not in log  # absolute root, same cache
    assert read_rows(run_dir / "metrics.csv") == read_rows(wide_adam_run / "metrics.csv")


def test_stopped_adam_batchnorm_cosine_run_resumes_on_other_threads(wide_adam_run, image_root, tmp_path):
    run_dir = tmp_path / "stopped"
    proc = start_cli([*WIDE_ADAM_COSINE, f"data.root={image_root}", "trainer.log_every_steps=10",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    stderr = StderrLines(proc)
    stderr.wait_for("[epoch 2, step    10]")
    proc.send_signal(signal.SIGTERM)
    output = stderr.finish()
    assert proc.returncode == 143, output
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert stopped_at["epoch"] == 1  # stopped inside epoch 2 (or at its end)

    result = run_cli([f"trainer.resume={run_dir}", "trainer.num_threads=2", f"hydra.run.dir={tmp_path / 'r'}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["threads"] == {"train": 2, "eval": 2} and record["resumes"][0]["from_epoch"] == 2
    resumed, reference = read_rows(run_dir / "metrics.csv"), read_rows(wide_adam_run / "metrics.csv")
    assert resumed[0] == reference[0]  # written before the stop
    # Adam's moments, batch norm's statistics, the schedule and the data order all carried over;
    # two threads may sum in another order, so the later epochs agree to float precision.
    for got, want in zip(resumed[1:], reference[1:], strict=True):
        assert got["lr"] == want["lr"] and got["epoch"] == want["epoch"]
        for column in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert float(got[column]) == pytest.approx(float(want[column]), rel=1e-4, abs=1e-6), column


TINY_NET = """
import torch.nn as nn

class TinyNet(nn.Module):
    def __init__(self, in_channels, num_classes, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))
"""


def test_own_model_and_optimiser_options_from_a_search_path(tmp_path):
    write_module(tmp_path, "tinynet", TINY_NET)
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "optim").mkdir()
    (conf / "model" / "tiny.yaml").write_text("_target_: tinynet.TinyNet\nhidden: 16\n")
    (conf / "optim" / "rmsprop.yaml").write_text("_target_: torch.optim.RMSprop\n_partial_: true\nlr: 0.0005\n"
                                                 "alpha: 0.9\n")
    run_dir = tmp_path / "run"
    result = run_cli(["data=synthetic", "data.n_train=200", "data.n_test=100", "trainer.max_epochs=1",
                      "trainer.device=cpu", f"hydra.searchpath=[file://{conf}]", "model=tiny", "optim=rmsprop",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Training TinyNet on synthetic" in (run_dir / "cnnexp.log").read_text()
    assert torch.load(run_dir / "model.pt", weights_only=True)["fc.weight"].shape == (10, 16)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    group = state["optimizer"]["state"]["param_groups"][0]
    assert group["alpha"] == 0.9 and group["lr"] == 0.0005 and "square_avg" in state["optimizer"]["state"]["state"][0]


PLAIN = ["data=synthetic", "data.n_train=400", "data.n_test=200", "trainer.max_epochs=2", "trainer.device=cpu",
         "trainer.num_threads=1", "trainer.progress=log"]


def test_plain_torch_optim_path_trains_as_the_fast_path_does(tmp_path):
    runs = {}
    for name, extra in (("fast", []), ("plain", ["trainer.fast_path=false", "trainer.cuda_graph=false"])):
        run_dir = tmp_path / name
        result = run_cli([*PLAIN, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        runs[name] = (read_rows(run_dir / "metrics.csv"), (run_dir / "cnnexp.log").read_text())
    (fast, fast_log), (plain, plain_log) = runs["fast"], runs["plain"]
    assert "(flat SGD;" in fast_log and "(SGD;" in plain_log and "CUDA graph" not in plain_log
    for a, b in zip(fast, plain, strict=True):
        for column in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4, abs=1e-6), column


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_switch(tmp_path):
    logs, rows = {}, {}
    for graph in ("true", "false"):
        run_dir = tmp_path / graph
        result = run_cli([*(p for p in PLAIN if not p.startswith("trainer.device")), "trainer.device=cuda", f"trainer.cuda_graph={graph}",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        logs[graph], rows[graph] = (run_dir / "cnnexp.log").read_text(), read_rows(run_dir / "metrics.csv")
    assert "in a CUDA graph" in logs["true"] and "CUDA graph" not in logs["false"]
    for a, b in zip(rows["true"], rows["false"], strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
