"""After training: load a run, evaluate it, predict with it, export it.

    loaded.py      load_run: the model rebuilt from a run dir, its classes and preprocessing
    preprocess.py  images -> the normalised batch the model was trained on
    evaluation.py  accuracy, loss, per-class results and confusion matrix on a split
    prediction.py  image files and folders -> one CSV row per image
    export.py      TorchScript or ONNX with the normalisation inside, checked against PyTorch
    selection.py   the job a sweep's or a search's ranking selected
    commandline.py what the three commands share: one-line errors, --weights and --device

Commands: python -m cnnexp.evaluate, cnnexp.predict, cnnexp.export. The user's
page: docs/using-a-trained-model.md.
"""

from cnnexp.use.loaded import LoadedRun, Predictions, load_run

__all__ = ["LoadedRun", "Predictions", "load_run"]
