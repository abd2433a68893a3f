"""Predict the classes of image files: any number of files and folders (searched
recursively), any size and colour mode, decoded in threads and classified in
batches. One row per image; a file that cannot be read is a row with its
error, never the end of the command."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cnnexp.cpu import available_cores
from cnnexp.data.imagefolder import CACHE_DIR, IMAGE_SUFFIXES, decode_file
from cnnexp.errors import ConfigError
from cnnexp.safeio import atomic_path
from cnnexp.use.loaded import LoadedRun

CHUNK = 256  # images decoded and classified together


def image_files(paths: list[Path]) -> list[Path]:
    """Every image file the arguments name: files as given, folders searched recursively
    for image suffixes (hidden entries and the reader's cache left out)."""
    files: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") or part == CACHE_DIR for part in p.relative_to(path).parts))
        else:
            raise ConfigError(f"{path} does not exist; give image files or folders of images.")
    if not files:
        raise ConfigError(f"No image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}.")
    return files


def _decode(run: LoadedRun, path: Path) -> np.ndarray | str:
    """The image as the model takes it (H, W, C), or why it cannot be."""
    try:
        array = decode_file(path, run.preprocess.resize)
    except Exception as err:  # anything a broken or hostile file raises becomes its row's error
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if array.shape[:2] != run.input_shape[1:]:
        return (f"{array.shape[1]}x{array.shape[0]} pixels; the model takes {run.input_shape[2]}x{run.input_shape[1]} "
                "images")
    return array


def predict_files(run: LoadedRun, files: list[Path], top_k: int) -> Iterator[dict]:
    """One row per file, in order: path, class_1, probability_1, ..., error."""
    k = min(top_k, len(run.classes))
    with ThreadPoolExecutor(min(8, available_cores())) as pool:
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            decoded = list(pool.map(lambda f: _decode(run, f), chunk))
            good = [a for a in decoded if not isinstance(a, str)]
            top = iter([])
            if good:
                batch = torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2)
                top = iter(run.predict(batch).top(k))
            for path, item in zip(chunk, decoded):
                row = {"path": str(path)}
                if isinstance(item, str):
                    row["error"] = item
                else:
                    for i, (name, p) in enumerate(next(top), start=1):
                        row[f"class_{i}"], row[f"probability_{i}"] = name, round(p, 6)
                yield row


def write_csv(rows: list[dict], out: Path, top_k: int) -> None:
    columns = ["path", *(c for i in range(1, top_k + 1) for c in (f"class_{i}", f"probability_{i}")), "error"]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def table(rows: list[dict], limit: int = 20) -> str:
    """A short table for the terminal: path, top class and its probability."""
    shown = rows[:limit]
    width = min(60, max((len(r["path"]) for r in shown), default=4))
    lines = [f"{'image':<{width}}  {'class':<16} probability"]
    for r in shown:
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        if r.get("error"):
            lines.append(f"{path:<{width}}  unreadable: {r['error']}")
        else:
            lines.append(f"{path:<{width}}  {r['class_1']:<16} {r['probability_1']:.4f}")
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return "\n".join(lines)
