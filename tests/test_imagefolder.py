"""Image folders: decoding, the decoded-tensor cache, and each layout fault named."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cnnexp.data.imagefolder import CACHE_DIR, check_layout, read_imagefolder
from cnnexp.errors import ConfigError, DataError


def make_folder(root, classes=("cat", "dog"), per_class=3, size=32, test_classes=None):
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def cfg(root, resize=None, cache=True):
    return OmegaConf.create({"name": "imagefolder", "root": str(root), "resize": resize, "cache": cache,
                             "batch_size": 4, "mean": [0.5] * 3, "std": [0.5] * 3})


def test_reads_images_labels_and_classes(tmp_path):
    root = make_folder(tmp_path / "imgs")
    splits = read_imagefolder(cfg(root))
    assert splits.classes == ["cat", "dog"]
    assert splits.train_images.shape == (6, 3, 32, 32) and splits.train_images.dtype == torch.uint8
    assert splits.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    pixels = np.array(Image.open(root / "train" / "dog" / "0000.png"))
    assert torch.equal(splits.train_images[3], torch.from_numpy(pixels).permute(2, 0, 1))


def refuse_to_decode(monkeypatch):
    """From here on a read must come from the cache: decoding fails the test."""
    from cnnexp.data import imagefolder

    def decode_all(files, resize):
        raise AssertionError(f"decoded {len(files)} images although the cache holds them")

    monkeypatch.setattr(imagefolder, "decode_all", decode_all)


def test_cache_is_written_and_read_instead_of_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    first = read_imagefolder(cfg(root))
    (cache,) = (root / CACHE_DIR).glob("*.pt")
    with monkeypatch.context() as patch:
        refuse_to_decode(patch)
        second = read_imagefolder(cfg(root))
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert second.classes == first.classes
    # A changed image changes the key: the stale cache is neither used nor kept.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "cat" / "0000.png")
    third = read_imagefolder(cfg(root))
    assert int(third.test_images[0].sum()) == 0
    assert [p.name for p in (root / CACHE_DIR).glob("*.pt")] != [cache.name]
    assert len(list((root / CACHE_DIR).glob("*.pt"))) == 1


def test_cache_is_found_whatever_path_names_the_folder(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data" / "imgs")
    read_imagefolder(cfg(root))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(root)
    refuse_to_decode(monkeypatch)
    monkeypatch.chdir(elsewhere)
    for spelling in ("../data/imgs", "../data/./imgs/", str(tmp_path / "link")):
        assert read_imagefolder(cfg(spelling)).train_images.shape == (6, 3, 32, 32), spelling
    assert len(list((root / CACHE_DIR).glob("*.pt"))) == 1


def test_caches_of_other_resize_settings_are_kept(tmp_path):
    root = make_folder(tmp_path / "imgs", size=40)
    read_imagefolder(cfg(root, resize=32))
    read_imagefolder(cfg(root, resize=16))
    read_imagefolder(cfg(root))
    assert len(list((root / CACHE_DIR).glob("*.pt"))) == 3


def test_resize_and_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "imgs", size=40)
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(root / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match="odd.png"):
        read_imagefolder(cfg(root, cache=False))
    assert read_imagefolder(cfg(root, resize=32, cache=False)).train_images.shape[2:] == (32, 32)


def test_layout_faults_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_layout(str(tmp_path / "missing"))
    root = make_folder(tmp_path / "mismatch", classes=("cat", "dog"), test_classes=("cat", "bird"))
    with pytest.raises(ConfigError, match="bird") as info:
        check_layout(str(root))
    assert "dog" in str(info.value)


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "emu").mkdir()
    (root / "test" / "emu").mkdir()
    with pytest.raises(DataError, match="emu"):
        read_imagefolder(cfg(root, cache=False))


def test_corrupt_image_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "test" / "dog" / "0001.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="0001.png"):
        read_imagefolder(cfg(root, cache=False))
