"""After training: load_run, evaluate, predict and export on tiny synthetic runs
trained once per module, and every bad input as one line with exit code 2."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import cnnexp
from cnnexp import evaluate as evaluate_cmd
from cnnexp import export as export_cmd
from cnnexp import predict as predict_cmd
from cnnexp.cli import config_dir
from cnnexp.data.imagefolder import decode_file
from cnnexp.results.files import (
    CONFIG_FILE,
    EVAL_FILE,
    EVALUATIONS_DIR,
    MULTIRUN_FILE,
    SAMPLES_FILE,
)
from cnnexp.run.job import run_job
from cnnexp.use.evaluation import own_split_data
from cnnexp.use.export import export_run
from cnnexp.use.selection import best_job

FIXTURE = Path(__file__).parent / "fixtures" / "release_0_2" / "run"
TINY = ["data=synthetic", "data.n_train=300", "data.n_test=200", "trainer.progress=none", "trainer.num_threads=1",
        "trainer.cpu_step=eager", "optim.lr=0.01"]


def train(run_dir: Path, overrides: list[str]) -> Path:
    """A run as `python -m cnnexp` leaves it, trained in this process (Hydra's config copy included)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert run_job(cfg, run_dir, multirun=False, overrides=overrides) == 0
    (run_dir / CONFIG_FILE).parent.mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG_FILE)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    return {"split": train(root / "split", [*TINY, "data.val_size=60", "trainer.max_epochs=3"]),
            "nosplit": train(root / "nosplit", [*TINY, "trainer.max_epochs=1"])}


@pytest.fixture
def run_copy(runs, tmp_path):
    """A private copy of the run with a validation split, for tests that write into it or damage it."""
    return Path(shutil.copytree(runs["split"], tmp_path / "run"))


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def evaluation(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / EVALUATIONS_DIR / name / EVAL_FILE).read_text())


def one_line_error(capsys, code: int, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "error: " in err and expected in err, err
    return err


# ---------------------------------------------------------------- evaluate reproduces the run
@pytest.mark.parametrize("weights, field", [("best", "test_acc_at_best"), ("final", "final_test_acc")])
def test_evaluate_reproduces_run_json_exactly(run_copy, capsys, weights, field):
    assert evaluate_cmd.main([str(run_copy), "--weights", weights]) == 0
    assert "reproduced exactly" in capsys.readouterr().out
    result = evaluation(run_copy, f"test-{weights}")
    assert result["accuracy"] == record(run_copy)[field]  # exactly: the same bits
    assert result["reproduces"] == {"source": f"run.json {field}", "accuracy": record(run_copy)[field], "exact": True}
    assert result["images"] == 200 and result["weights"]["choice"] == weights
    per_class = pd.read_csv(run_copy / EVALUATIONS_DIR / f"test-{weights}" / "per_class.csv")
    assert per_class["total"].sum() == 200 and per_class["correct"].sum() == result["correct"]
    assert (run_copy / EVALUATIONS_DIR / f"test-{weights}" / "confusion_matrix.png").stat().st_size > 0


def test_evaluate_on_the_validation_split_reproduces_the_selected_epoch(run_copy):
    assert evaluate_cmd.main([str(run_copy), "--split", "val"]) == 0
    result = evaluation(run_copy, "val-best")
    assert result["accuracy"] == record(run_copy)["best_val_acc"]
    assert result["weights"]["epoch"] == record(run_copy)["best_epoch"] and result["reproduces"]["exact"]


def test_test_time_augmentation_is_recorded_and_named(run_copy):
    assert evaluate_cmd.main([str(run_copy), "--tta", "flip", "--weights", "final"]) == 0
    result = evaluation(run_copy, "test-final-tta_flip")
    assert result["tta"] == "flip" and "reproduces" not in result
    run = cnnexp.load_run(run_copy, weights="final", device="cpu")
    images = own_split_data(run, "test").images
    # flip: the mean of the logits of the images and their mirror images
    expected = (run.logits(images, tta="none") + run.logits(images.flip(3), tta="none")) / 2
    assert torch.allclose(run.logits(images, tta="flip"), expected, atol=1e-5)


# ---------------------------------------------------------------- load_run
def test_load_run_predict_agrees_with_evaluate(run_copy):
    assert evaluate_cmd.main([str(run_copy)]) == 0
    confusion = pd.read_csv(run_copy / EVALUATIONS_DIR / "test-best" / "confusion.csv", index_col=0).to_numpy()
    run = cnnexp.load_run(run_copy, device="cpu")
    data = own_split_data(run, "test")
    predicted = run.predict(data.images)
    index = torch.tensor([run.classes.index(n) for n in predicted.names])
    mine = torch.bincount(data.labels * 10 + index, minlength=100).view(10, 10).numpy()
    np.testing.assert_array_equal(mine, confusion)
    assert torch.allclose(predicted.probabilities.sum(1), torch.ones(200))
    assert run.classes == [f"class_{i}" for i in range(10)] and run.input_shape == (3, 32, 32)
    assert not run.model.training and run.weights.epoch == record(run_copy)["best_epoch"]


def test_load_run_of_the_previous_release_reproduces_its_saved_predictions():
    """A run written before runs recorded their classes, and without Hydra's config copy."""
    from cnnexp import load_run

    run = load_run(FIXTURE, weights="final", device="cpu")
    with np.load(FIXTURE / SAMPLES_FILE) as sample:
        images, predictions, classes = sample["images"], sample["predictions"], list(sample["classes"])
    assert run.classes == classes
    names = run.predict(torch.from_numpy(images)).names
    assert [classes.index(n) for n in names] == predictions.tolist()


def image_files(folder: Path) -> dict[str, Path]:
    """Odd sizes and colour modes, as PNG and JPEG, and a corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {
        "rgb_50x70.png": Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)),
        "grey_33x20.jpg": Image.fromarray(rng.integers(0, 256, (20, 33), dtype=np.uint8), mode="L"),
        "rgba_40x40.png": Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), mode="RGBA"),
        "palette_9x300.png": Image.fromarray(rng.integers(0, 256, (300, 9, 3), dtype=np.uint8)).convert("P"),
        "same_32x32.jpg": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
    }
    paths = {}
    for name, img in images.items():
        img.save(folder / name)
        paths[name] = folder / name
    (folder / "nested").mkdir(exist_ok=True)
    (folder / "nested" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths["corrupt.jpg"] = folder / "nested" / "corrupt.jpg"
    return paths


def test_preprocess_decodes_every_input_kind_as_the_image_folder_reader(runs, tmp_path):
    run = cnnexp.load_run(runs["split"], device="cpu")
    for name, path in image_files(tmp_path).items():
        if name == "corrupt.jpg":
            continue
        reader = torch.from_numpy(np.array(decode_file(path, 32))).permute(2, 0, 1)  # what training would have held
        with Image.open(path) as img:
            assert torch.equal(run.preprocess.uint8(img)[0], reader), name
            if img.mode in ("RGB", "L", "RGBA"):
                array = np.array(img)
                assert torch.equal(run.preprocess.uint8(array)[0], reader), name
                chw = torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)
                assert torch.equal(run.preprocess.uint8(chw)[0], reader), name
                assert torch.equal(run.preprocess.uint8(chw.float() / 255)[0], reader), name
    batch = run.preprocess([Image.open(p) for n, p in image_files(tmp_path).items() if n != "corrupt.jpg"])
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32
    assert -1.0 <= float(batch.min()) and float(batch.max()) <= 1.0  # mean = std = 0.5
    with pytest.raises(ValueError, match="float64"):
        run.preprocess(np.zeros((32, 32, 3)))


# ---------------------------------------------------------------- predict
def test_predict_files_and_folders_of_any_size_and_mode(runs, tmp_path, capsys):
    paths = image_files(tmp_path / "photos")
    out = tmp_path / "predictions.csv"
    assert predict_cmd.main([str(runs["split"]), str(tmp_path / "photos"), str(paths["same_32x32.jpg"]),
                             "--top-k", "2", "--out", str(out)]) == 0
    assert "1 unreadable" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7  # six files found in the folder (one nested), one given twice
    by_path = {Path(r["path"]).name: r for r in rows}
    assert by_path["corrupt.jpg"]["error"] and not by_path["corrupt.jpg"]["class_1"]
    run = cnnexp.load_run(runs["split"], device="cpu")
    for name, path in paths.items():
        if name == "corrupt.jpg":
            continue
        with Image.open(path) as img:
            (top,) = run.predict(img).top(2)
        row = by_path[name]
        assert [row["class_1"], row["class_2"]] == [top[0][0], top[1][0]], name
        assert float(row["probability_1"]) == pytest.approx(top[0][1], abs=1e-6)
        assert float(row["probability_1"]) >= float(row["probability_2"]) and not row["error"]


# ---------------------------------------------------------------- other data
def test_evaluate_on_an_image_folder_matches_classes_by_name(run_copy, tmp_path, capsys):
    """A folder of two of the run's classes (its own test images, lossless PNG): each class's
    images are judged as on the run's own split, whatever index the folder gives them."""
    run = cnnexp.load_run(run_copy, device="cpu")
    data = own_split_data(run, "test")
    folder = tmp_path / "new_photos" / "test"
    for class_index in (7, 3):
        (folder / f"class_{class_index}").mkdir(parents=True)
        for i in torch.nonzero(data.labels == class_index).flatten().tolist():
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"class_{class_index}" / f"{i}.png")
    assert evaluate_cmd.main([str(run_copy), "--weights", "final"]) == 0
    assert evaluate_cmd.main([str(run_copy), "--weights", "final", "data=imagefolder",
                              f"data.root={tmp_path / 'new_photos'}"]) == 0
    own = pd.read_csv(run_copy / EVALUATIONS_DIR / "test-final" / "per_class.csv").set_index("class")
    other_eval = evaluation(run_copy, "imagefolder-new_photos-final")
    other = pd.read_csv(run_copy / EVALUATIONS_DIR / "imagefolder-new_photos-final" / "per_class.csv").set_index("class")
    for name in ("class_3", "class_7"):
        assert other.loc[name, "correct"] == own.loc[name, "correct"] and other.loc[name, "total"] == own.loc[name, "total"]
    assert other["total"].sum() == other_eval["images"] == own.loc[["class_3", "class_7"], "total"].sum()
    assert other_eval["data"]["classes"] == ["class_3", "class_7"] and "reproduces" not in other_eval

    (folder / "zebra").mkdir()
    Image.fromarray(data.images[0].permute(1, 2, 0).numpy()).save(folder / "zebra" / "z.png")
    capsys.readouterr()
    code = evaluate_cmd.main([str(run_copy), "data=imagefolder", f"data.root={tmp_path / 'new_photos'}",
                              "--name", "refused"])
    one_line_error(capsys, code, "zebra")
    assert not (run_copy / EVALUATIONS_DIR / "refused").exists()


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_embeds_the_normalisation_and_the_classes(runs, tmp_path, fmt, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / f"model.{fmt}"
    assert export_cmd.main([str(runs["split"]), "--format", fmt, "--out", str(out), "--device", "cpu"]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    run = cnnexp.load_run(runs["split"], device="cpu")
    images = own_split_data(run, "test").images[:50]
    expected = run.logits(images)
    inputs = images.float() / 255  # what the exported model takes
    if fmt == "torchscript":
        extra = {"cnnexp.json": ""}
        loaded = torch.jit.load(str(out), _extra_files=extra)
        with torch.no_grad():
            logits = loaded(inputs)
        meta = json.loads(extra["cnnexp.json"])
    else:
        import onnx
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"images": inputs.numpy()})[0])
        meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["cnnexp"])
    assert logits.shape == (50, 10)  # a batch size other than the one it was exported with
    assert float((logits - expected).abs().max()) <= 1e-4 * max(1.0, float(expected.abs().max()))
    assert meta["classes"] == run.classes and meta["mean"] == [0.5, 0.5, 0.5] and meta["input_shape"] == [3, 32, 32]


def test_export_refuses_a_result_that_differs_and_writes_nothing(runs, tmp_path, monkeypatch):
    from cnnexp.use import export

    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference is small enough
    run = cnnexp.load_run(runs["split"], device="cpu")
    with pytest.raises(export.ExportError, match="nothing was written"):
        export_run(run, "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_onnx_extra_is_one_line(runs, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    code = export_cmd.main([str(runs["split"]), "--format", "onnx"])
    one_line_error(capsys, code, "pip install 'cnnexp[onnx]'")


# ---------------------------------------------------------------- a sweep's --best
def test_best_evaluates_the_job_the_sweep_ranking_selected(runs, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(runs["split"], sweep / job)
    (sweep / MULTIRUN_FILE).write_text("{}\n")
    metrics = pd.read_csv(sweep / "1" / "metrics.csv")
    metrics.loc[0, "val_acc"] = 1.0  # job 1 now has the best validation accuracy (at epoch 1)
    metrics.to_csv(sweep / "1" / "metrics.csv", index=False)
    assert best_job(sweep)[0] == sweep / "1"
    assert evaluate_cmd.main([str(sweep), "--best"]) == 0
    assert "job 1" in capsys.readouterr().err
    assert (sweep / "1" / EVALUATIONS_DIR / "test-best" / EVAL_FILE).is_file()
    assert not (sweep / "0" / EVALUATIONS_DIR).exists()

    code = evaluate_cmd.main([str(sweep)])  # a sweep without --best
    one_line_error(capsys, code, "--best")
    no_split = tmp_path / "no_split_sweep"
    shutil.copytree(runs["nosplit"], no_split / "0")
    (no_split / MULTIRUN_FILE).write_text("{}\n")
    code = evaluate_cmd.main([str(no_split), "--best"])
    one_line_error(capsys, code, "no validation split")


# ---------------------------------------------------------------- bad input
def test_best_weights_without_a_validation_split_use_the_final_ones_and_say_so(runs, tmp_path, capsys):
    run_dir = Path(shutil.copytree(runs["nosplit"], tmp_path / "run"))
    assert evaluate_cmd.main([str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "no validation split" in captured.err and "model.pt" in captured.err
    result = evaluation(run_dir, "test-final")
    assert result["accuracy"] == record(run_dir)["final_test_acc"] and result["weights"]["note"]


def damage(run_dir: Path, how: str) -> None:
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    if how == "no weights":
        for name in ("model.pt", "model_best.pt", "checkpoints/last.pt"):
            (run_dir / name).unlink()
        rec = record(run_dir) | {"status": "failed", "error": "The training loss became NaN at epoch 1"}
        (run_dir / "run.json").write_text(json.dumps(rec))
    elif how == "newer version":
        rec = record(run_dir)
        rec["versions"]["cnnexp"] = "9.1.0"
        (run_dir / "run.json").write_text(json.dumps(rec))
    elif how == "unknown data key":
        cfg.data.colour_space = "lab"
    elif how == "model gone":
        cfg.model._target_ = "my_vanished_models.Net"
    elif how == "other model":
        cfg.model = {"_target_": "cnnexp.models.WideCNN", "width": 8, "dropout": 0.0}
    OmegaConf.save(cfg, run_dir / CONFIG_FILE)


@pytest.mark.parametrize("how, expected", [
    ("no weights", "before it completed an epoch"),
    ("newer version", "cnnexp 9.1.0"),
    ("unknown data key", "colour_space"),
    ("model gone", "my_vanished_models"),
    ("other model", "do not fit"),
])
def test_a_broken_run_is_one_line_and_nothing_is_written(run_copy, capsys, how, expected):
    damage(run_copy, how)
    one_line_error(capsys, evaluate_cmd.main([str(run_copy)]), expected)
    one_line_error(capsys, export_cmd.main([str(run_copy), "--format", "torchscript"]), expected)
    assert not (run_copy / EVALUATIONS_DIR).exists() and not (run_copy / "exported").exists()


@pytest.mark.parametrize("args, expected", [
    (["{missing}"], "not a directory"),
    (["{empty}"], "not a run directory"),
    (["{run}", "model.width=8"], "would change the model"),
    (["{run}", "data.mean=[0,0,0]"], "would change the model"),
    (["{run}", "optim.lr=1"], "would change the model"),
    (["{run}", "trainer.max_epochs=3"], "only data.*"),
    (["{run}", "data=nosuch"], "not a dataset"),
    (["{run}", "data.n_test=abc"], "data.n_test"),
    (["{run}", "--weights", "nosuch.pt"], "neither best, final nor a weights file"),
    (["{run}", "--tta", "rotate"], "invalid choice"),
    (["{run}", "--best"], "--best needs a sweep"),
])
def test_bad_evaluate_arguments_are_one_line(runs, tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nothing", "empty": tmp_path / "empty", "run": runs["split"]}
    code = 2
    try:
        code = evaluate_cmd.main([a.format(**paths) for a in args])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    one_line_error(capsys, code, expected)
    assert not (runs["split"] / EVALUATIONS_DIR / "refused").exists()


def test_bad_predict_and_export_arguments_are_one_line(runs, tmp_path, capsys):
    one_line_error(capsys, predict_cmd.main([str(runs["split"]), str(tmp_path / "none.jpg")]), "does not exist")
    one_line_error(capsys, predict_cmd.main([str(runs["split"]), str(tmp_path)]), "No image files")
    one_line_error(capsys, export_cmd.main([str(runs["split"]), "--format", "tflite"]), "not a format")
    assert not (tmp_path / "predictions.csv").exists()


# ---------------------------------------------------------------- the package and the commands
def test_import_cnnexp_stays_light_and_the_command_runs(runs, tmp_path):
    light = subprocess.run([sys.executable, "-c", "import sys, cnnexp; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"
    result = subprocess.run([sys.executable, "-m", "cnnexp.evaluate", str(runs["split"]), "--weights", "final",
                             "--name", "cli"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert evaluation(runs["split"], "cli")["accuracy"] == record(runs["split"])["final_test_acc"]
    shutil.rmtree(runs["split"] / EVALUATIONS_DIR)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_run_on_a_gpu_predicts_as_on_the_cpu(runs):
    cpu = cnnexp.load_run(runs["split"], device="cpu")
    gpu = cnnexp.load_run(runs["split"], device="cuda")
    images = own_split_data(cpu, "test").images
    assert gpu.model.parameters().__next__().is_cuda
    assert torch.allclose(gpu.logits(images).cpu(), cpu.logits(images), atol=1e-3)
