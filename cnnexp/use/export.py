"""Export a trained run as one file another program can run: TorchScript or ONNX.

The exported model takes float32 images in [0, 1], N x C x H x W (any N), RGB,
at the run's input size, and returns logits (N x classes): the run's
normalisation is inside it. Its class names and preprocessing travel with it
as metadata (`cnnexp.json` in TorchScript's extra files; ONNX metadata_props).

Before the file is kept, it is run (torch.jit.load / onnxruntime) on real test
images at two batch sizes and its logits compared with the PyTorch model's
fed by the run's own preprocessing; a larger difference than TOLERANCE (of
the logits' scale) fails the export and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.results.files import EXPORT_DIR, SAMPLES_FILE
from cnnexp.safeio import atomic_path
from cnnexp.use.evaluation import own_split_data
from cnnexp.use.loaded import LoadedRun
from cnnexp.version import __version__

FORMATS = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
TOLERANCE = 1e-4  # largest allowed |difference| of a logit, relative to the largest |logit| (at least 1)
CHECK_IMAGES = 64
METADATA_KEY = "cnnexp.json"
INPUT = "float32 images in [0, 1], N x C x H x W (any N), RGB; normalisation is inside the model"


class ExportError(CnnexpError):
    """The exported file does not compute what the PyTorch model computes."""


class WithNormalisation(torch.nn.Module):
    """The run's model behind its own normalisation, for inputs in [0, 1]: the
    same (x*255 - 255*mean) / (255*std) that training applied to uint8 images."""

    def __init__(self, model: torch.nn.Module, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("shift", shift.detach().cpu().clone())
        self.register_buffer("scale", scale.detach().cpu().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images * 255.0 - self.shift) / self.scale)


@dataclass
class Exported:
    path: Path
    largest_difference: float
    limit: float
    checked_images: int


def default_path(run: LoadedRun, fmt: str) -> Path:
    weights = run.weights.choice if run.weights.choice != "file" else run.weights.file.stem
    return run.path / EXPORT_DIR / f"model-{weights}{FORMATS[fmt]}"


def metadata(run: LoadedRun) -> dict:
    return {"classes": run.classes, "input": INPUT, "input_shape": list(run.input_shape),
            "mean": list(run.config.data.mean), "std": list(run.config.data.std), "output": "logits, N x classes",
            "weights": run.weights.describe(), "run_dir": str(run.path.resolve()), "cnnexp_version": __version__}


def check_format(fmt: str) -> None:
    """An unknown format, or ONNX without its packages: one line, before any work."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not a format; use {' or '.join(FORMATS)}.")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise ConfigError(f"ONNX export needs the onnx extra ({', '.join(missing)} not installed): "
                              "pip install 'cnnexp[onnx]'.")


def check_images(run: LoadedRun) -> torch.Tensor:
    """Real test images, uint8: the run's sample file, else the head of its test split."""
    sample = run.path / SAMPLES_FILE
    if sample.is_file():
        with np.load(sample) as data:
            images = torch.from_numpy(data["images"])
        if tuple(images.shape[1:]) == tuple(run.input_shape):
            return images[:CHECK_IMAGES]
    try:
        return own_split_data(run, "test").images[:CHECK_IMAGES]
    except CnnexpError as err:
        raise ConfigError(f"No test images to check the export on: {run.path} has no {SAMPLES_FILE} and its test "
                          f"split cannot be read ({err}).") from None


def export_run(run: LoadedRun, fmt: str, out: Path | None = None) -> Exported:
    """Write the exported model to `out` (default: <run>/exported/model-<weights><suffix>)
    after checking it against the PyTorch model."""
    check_format(fmt)
    out = Path(out).expanduser() if out is not None else default_path(run, fmt)
    images = check_images(run)
    if images.shape[0] < 2:  # a batch dimension exported from one image may be fixed to 1
        images = images.repeat(2, 1, 1, 1)
    cpu_model = copy.deepcopy(run.model).cpu().eval()
    normalize = run.preprocess.normalize
    wrapper = WithNormalisation(cpu_model, normalize.shift, normalize.scale).eval()
    with torch.inference_mode():
        reference = cpu_model((images.float() - wrapper.shift) / wrapper.scale)  # the run's own preprocessing
    inputs = images.float() / 255.0
    with atomic_path(out) as tmp:
        if fmt == "torchscript":
            write_torchscript(wrapper, inputs, tmp, metadata(run))
            runner = torchscript_runner(tmp)
        else:
            write_onnx(wrapper, inputs, tmp, metadata(run))
            runner = onnx_runner(tmp)
        difference = max(float((runner(inputs) - reference).abs().max()),
                         float((runner(inputs[:1]) - reference[:1]).abs().max()))  # a second batch size
        limit = TOLERANCE * max(1.0, float(reference.abs().max()))
        if not difference <= limit:
            raise ExportError(f"The exported {fmt} model's logits differ from the PyTorch model's by up to "
                              f"{difference:.3g} (allowed {limit:.3g}) on {len(images)} test images; nothing was "
                              "written.")
    return Exported(out, difference, limit, int(images.shape[0]))


@contextlib.contextmanager
def _quiet():
    """torch's exporters print progress and deprecation notices; the command prints its own line."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def write_torchscript(wrapper: torch.nn.Module, inputs: torch.Tensor, path: Path, meta: dict) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(wrapper, inputs[:2])
        torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: json.dumps(meta)})


def torchscript_runner(path: Path):
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with _quiet(), torch.no_grad():
            return loaded(x)

    return run


def write_onnx(wrapper: torch.nn.Module, inputs: torch.Tensor, path: Path, meta: dict) -> None:
    import onnx

    with _quiet():
        torch.onnx.export(wrapper, (inputs[:2],), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True,
                          external_data=False)
    model = onnx.load(str(path))
    for key, value in (("cnnexp", json.dumps(meta)), ("classes", json.dumps(meta["classes"])),
                       ("input", INPUT)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def onnx_runner(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

    return run
