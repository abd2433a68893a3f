"""CIFAR-10 from the official python archive: download, verify, extract, read.

Layout under data.root after the first run:

    cifar-10-python.tar.gz        the archive (md5-verified)
    cifar-10-batches-py/          data_batch_1..5, test_batch, batches.meta

The download goes to a `.part` file and is checked before it is renamed;
extraction goes to a temporary folder renamed into place at the end. So an
interrupted or corrupt download never leaves data that looks complete.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cnnexp.data.splits import ImageSplits
from cnnexp.errors import DataError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
DOWNLOAD_TIMEOUT_S = 30


def read_cifar10(cfg: DictConfig) -> ImageSplits:
    root = Path(str(cfg.root)).expanduser()
    folder = ensure_extracted(root, url=cfg.url, md5=cfg.md5, download=cfg.download)
    return read_batches(folder)


def ensure_extracted(root: Path, url: str, md5: str, download: bool) -> Path:
    """Return the extracted batches folder, downloading and extracting if needed."""
    folder = root / FOLDER_NAME
    if all((folder / name).is_file() for name in [*TRAIN_BATCHES, TEST_BATCH, META]):
        return folder
    archive = root / ARCHIVE_NAME
    if not archive.is_file():
        if not download:
            raise DataError(_missing_message(root, url, "data.download=false and no archive is there"))
        fetch(url, archive, md5)
    elif file_md5(archive) != md5:
        raise DataError(
            f"{archive} is corrupt: its md5 is {file_md5(archive)}, expected {md5}. "
            f"Delete it and run again to download a fresh copy."
        )
    extract(archive, root)
    return folder


def fetch(url: str, archive: Path, md5: str) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise DataError(_missing_message(archive.parent, url, f"the download failed ({reason})")) from None
    actual = file_md5(part)
    if actual != md5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"The file downloaded from {url} has md5 {actual}, expected {md5}; "
            f"the partial download was removed. Try again later, or put {ARCHIVE_NAME} "
            f"into {archive.parent} by hand."
        )
    part.replace(archive)


def extract(archive: Path, root: Path) -> None:
    """Extract into a temporary folder beside the target, then rename into place."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # Python without tarfile filters
                    tar.extractall(tmp)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(
                f"{archive} could not be extracted ({err}). Delete it and run again to download a fresh copy."
            ) from None
        extracted = Path(tmp) / FOLDER_NAME
        if not extracted.is_dir():
            raise DataError(f"{archive} does not contain {FOLDER_NAME}/; is it the python version of CIFAR-10?")
        target = root / FOLDER_NAME
        if target.exists():  # an incomplete folder from an older tool or by hand
            shutil.rmtree(target)
        extracted.rename(target)


def read_batches(folder: Path) -> ImageSplits:
    meta = _unpickle(folder / META)
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta[b"label_names"]]
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    test_images, test_labels = _read_batch(folder / TEST_BATCH)
    return ImageSplits(
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
    )


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise DataError(f"{path} is not a CIFAR-10 batch ({err}); delete {path.parent} to extract it again.") from None
    if len(data) != len(labels):
        raise DataError(f"{path} has {len(data)} images but {len(labels)} labels; delete {path.parent} to extract it again.")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


class _BatchUnpickler(pickle.Unpickler):
    """A CIFAR-10 batch holds dicts, lists, bytes and numpy arrays; nothing else is
    built, so a folder from elsewhere cannot run code when it is read."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # bytes in protocol-2 pickles written by Python 3

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it would import {module}.{name}, which a CIFAR-10 batch never needs")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete {path.parent} to extract it again."
        ) from None


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing_message(root: Path, url: str, why: str) -> str:
    return (
        f"CIFAR-10 is not in {root} and {why}.\n"
        f"  tried: {url}\n"
        f"  fix:   download {ARCHIVE_NAME} elsewhere and put it into {root} (or set data.root / CNNEXP_DATA_DIR),\n"
        f"         or train offline on generated images with data=synthetic."
    )
