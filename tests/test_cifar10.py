"""The CIFAR-10 path end to end against a tiny archive in the official layout,
served from 127.0.0.1: download, md5 check, extraction, reading, and failures."""

import csv
import functools
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cnnexp.data.cifar10 import ARCHIVE_NAME, FOLDER_NAME, read_cifar10
from cnnexp.errors import DataError
from conftest import run_cli

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 20


def batch_bytes(seed: int, n: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, n)]
    payload = {b"batch_label": b"batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
    return pickle.dumps(payload, protocol=2), data, labels


@pytest.fixture
def archive(tmp_path):
    """A cifar-10-python.tar.gz with 5 train batches and a test batch of random images."""
    buffer, expected = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name, blob):
            info = tarfile.TarInfo(f"{FOLDER_NAME}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for i in range(1, 6):
            blob, data, labels = batch_bytes(i, PER_BATCH)
            add(f"data_batch_{i}", blob)
            expected[f"data_batch_{i}"] = (data, labels)
        blob, data, labels = batch_bytes(99, PER_BATCH)
        add("test_batch", blob)
        expected["test_batch"] = (data, labels)
        add("batches.meta", pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2))
    content = buffer.getvalue()
    served = tmp_path / "served"
    served.mkdir()
    (served / ARCHIVE_NAME).write_bytes(content)
    return {"dir": served, "md5": hashlib.md5(content).hexdigest(), "expected": expected}


@pytest.fixture
def server(archive):
    handler = functools.partial(QuietHandler, directory=str(archive["dir"]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{ARCHIVE_NAME}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        QuietHandler.requests += 1
        super().do_GET()


def data_cfg(root, url, md5, download=True):
    return OmegaConf.create({"name": "cifar10", "root": str(root), "url": url, "md5": md5, "download": download,
                             "batch_size": 4, "mean": [0.5] * 3, "std": [0.5] * 3})


def test_download_verify_extract_and_read(tmp_path, archive, server):
    root = tmp_path / "data"
    before = QuietHandler.requests
    splits = read_cifar10(data_cfg(root, server, archive["md5"]))
    assert QuietHandler.requests == before + 1
    assert (root / ARCHIVE_NAME).is_file() and (root / FOLDER_NAME / "test_batch").is_file()
    assert splits.classes == CLASSES
    assert splits.train_images.shape == (5 * PER_BATCH, 3, 32, 32) and splits.train_images.dtype == torch.uint8
    first, labels = archive["expected"]["data_batch_1"]
    assert torch.equal(splits.train_images[0], torch.from_numpy(first[0].reshape(3, 32, 32)))
    assert splits.train_labels[:PER_BATCH].tolist() == labels
    test_data, test_labels = archive["expected"]["test_batch"]
    assert splits.test_labels.tolist() == test_labels
    assert torch.equal(splits.test_images.reshape(PER_BATCH, -1), torch.from_numpy(test_data))
    # A second run reads the extracted batches and downloads nothing.
    read_cifar10(data_cfg(root, server, archive["md5"]))
    assert QuietHandler.requests == before + 1


def test_wrong_checksum_is_a_clear_error_and_leaves_nothing(tmp_path, server):
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        read_cifar10(data_cfg(root, server, "0" * 32))
    message = str(info.value)
    assert "md5" in message and "removed" in message
    assert sorted(p.name for p in root.iterdir()) == []  # no archive, no .part, no half-extracted folder


def test_unreachable_mirror_says_what_to_do(tmp_path):
    with pytest.raises(DataError) as info:
        read_cifar10(data_cfg(tmp_path, "http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32))
    message = str(info.value)
    assert "127.0.0.1:9" in message and ARCHIVE_NAME in message and "data=synthetic" in message
    assert not any(tmp_path.iterdir())


def test_archive_put_by_hand_is_used_without_download(tmp_path, archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / ARCHIVE_NAME).write_bytes((archive["dir"] / ARCHIVE_NAME).read_bytes())
    splits = read_cifar10(data_cfg(root, "http://127.0.0.1:9/unused", archive["md5"], download=False))
    assert splits.test_images.shape[0] == PER_BATCH


def test_corrupt_batch_file_is_named(tmp_path, archive, server):
    root = tmp_path / "data"
    read_cifar10(data_cfg(root, server, archive["md5"]))
    batch = root / FOLDER_NAME / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar10(data_cfg(root, server, archive["md5"]))


@pytest.mark.slow
def test_cli_trains_on_downloaded_cifar10(tmp_path, archive, server):
    root = tmp_path / "data"
    run_dir = tmp_path / "run"
    result = run_cli([f"data.root={root}", f"data.url={server}", f"data.md5={archive['md5']}",
                      "trainer.max_epochs=1", "trainer.progress=log", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "metrics.csv").read_text().count("\n") == 2
    with open(run_dir / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == CLASSES
    assert sum(int(r["total"]) for r in per_class) == PER_BATCH  # the archive's test batch


@pytest.mark.slow
def test_cli_offline_error_has_no_traceback(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([f"data.root={tmp_path / 'data'}", "data.url=http://127.0.0.1:9/cifar-10-python.tar.gz",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "data=synthetic" in result.stderr and ARCHIVE_NAME in result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "127.0.0.1:9" in record["error"]
