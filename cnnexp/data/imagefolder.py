"""Images in class folders, as torchvision's ImageFolder reads them:

    <root>/train/<class>/<image>     <root>/test/<class>/<image>

All images are decoded once (in threads: PIL releases the GIL while decoding)
into uint8 tensors. The decoded tensors are cached under
<root>/.cnnexp-cache/ so the next run, or the next job of a sweep, skips the
decoding; the cache key covers every file's path inside the root, size and
mtime and the resize setting, so changed images are never served stale, and
the same folder named by another path (relative, through a link) hits the
same cache. A new cache file replaces the stale ones of its resize setting.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cnnexp.cpu import available_cores
from cnnexp.data.splits import ImageSplits
from cnnexp.data.subset import check_subset_size
from cnnexp.errors import ConfigError, DataError, DiskFull
from cnnexp.safeio import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
CACHE_DIR = ".cnnexp-cache"


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_layout(root_value: str) -> Path:
    """Cheap structural checks, run before any work: the root and both splits
    exist and name the same classes. Raises ConfigError naming the problem."""
    root = Path(root_value).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConfigError(
            f"data.root={root_value!r} {what}; it must be a folder holding train/<class>/ and test/<class>/."
        )
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ConfigError(f"data.root={root_value!r} has no {split}/ folder; expected train/<class>/ and test/<class>/.")
    train, test = class_folders(root / "train"), class_folders(root / "test")
    if not train:
        raise ConfigError(f"data.root={root_value!r}: train/ holds no class folders.")
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ConfigError(
            f"data.root={root_value!r}: train/ and test/ name different classes "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'}). "
            "Both must have the same class folders."
        )
    return root


def list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"Class folder {split_dir / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        files += found
        labels += [index] * len(found)
    return files, labels


def read_imagefolder(cfg: DictConfig) -> ImageSplits:
    root = check_layout(str(cfg.root))
    classes = class_folders(root / "train")
    train_files, train_labels = list_images(root / "train", classes)
    test_files, test_labels = list_images(root / "test", classes)
    # A subset larger than the folder is refused before any image is decoded.
    check_subset_size("data.n_train", cfg.get("n_train"), len(train_files), len(classes))
    check_subset_size("data.n_test", cfg.get("n_test"), len(test_files), len(classes))
    resize = cfg.resize

    cache = root / CACHE_DIR / f"{_cache_prefix(resize)}{_cache_key(root, train_files + test_files, resize)}.pt"
    if cfg.cache and cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            log.info("Loaded decoded images from %s", cache)
            return ImageSplits(**cached, classes=classes)
        except Exception as err:  # a cache is only a shortcut: decode again
            log.warning("Ignoring unreadable image cache %s (%s)", cache, err)

    log.info("Decoding %d images from %s", len(train_files) + len(test_files), root)
    splits = ImageSplits(
        train_images=decode_all(train_files, resize),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=decode_all(test_files, resize),
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
        classes=classes,
    )
    if splits.train_images.shape[1:] != splits.test_images.shape[1:]:
        raise DataError(
            f"Train images are {tuple(splits.train_images.shape[1:])} but test images are "
            f"{tuple(splits.test_images.shape[1:])}; set data.resize to give both one size."
        )
    if cfg.cache:
        _write_cache(cache, splits)
    return splits


def decode_all(files: list[Path], resize: int | None) -> torch.Tensor:
    threads = min(8, available_cores())
    with ThreadPoolExecutor(threads) as pool:
        arrays = list(pool.map(lambda f: decode_file(f, resize), files, chunksize=256))
    first = arrays[0].shape
    for path, array in zip(files, arrays):
        if array.shape != first:
            raise DataError(
                f"{path} is {array.shape[1]}x{array.shape[0]} pixels but {files[0]} is {first[1]}x{first[0]}; "
                "set data.resize=N to bring all images to N x N."
            )
    stacked = np.stack(arrays)  # (N, H, W, C)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def decode_file(path: Path, resize: int | None) -> np.ndarray:
    """One image file as training reads it: (H, W, 3) uint8; DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return image_array(img, resize)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path} cannot be read as an image ({err}); remove or replace it.") from None


def image_array(img, resize: int | None) -> np.ndarray:
    """A PIL image as training sees it: RGB (grey replicated, alpha dropped), resized
    bilinearly to resize x resize when set; (H, W, 3) uint8. Prediction uses it too."""
    from PIL import Image

    img = img.convert("RGB")
    if resize is not None and img.size != (resize, resize):
        img = img.resize((resize, resize), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _cache_prefix(resize: int | None) -> str:
    return f"resize-{resize or 'none'}-"


def _cache_key(root: Path, files: list[Path], resize: int | None) -> str:
    """Depends on what the images are, not on how data.root was spelt."""
    digest = hashlib.sha256(f"v2 resize={resize}".encode())
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _remove_stale_caches(cache: Path) -> None:
    """Earlier caches of this folder at the same resize setting, now outdated (each
    as large as the decoded dataset), and caches named by an older key format."""
    setting = cache.name[: cache.name.rindex("-") + 1]  # e.g. "resize-32-"
    for old in cache.parent.glob("*.pt"):
        if old != cache and (old.name.startswith(setting) or not old.name.startswith("resize-")):
            try:
                old.unlink()
                log.info("Removed the outdated image cache %s", old)
            except OSError:
                pass


def _write_cache(cache: Path, splits: ImageSplits) -> None:
    tensors = {k: getattr(splits, k) for k in ("train_images", "train_labels", "test_images", "test_labels")}
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:  # a failed write leaves no temp file
            torch.save(tensors, f)
        _remove_stale_caches(cache)
    except (OSError, DiskFull) as err:  # a read-only or full dataset folder: decode every time
        log.info("Not caching decoded images in %s (%s)", cache.parent, err)
