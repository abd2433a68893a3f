"""data.n_train / data.n_test: stratified, seeded subsets of every dataset, and their errors."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cnnexp.data import ImageSplits, read_splits
from cnnexp.data.subset import stratified_indices, take_subsets
from cnnexp.errors import ConfigError


def splits(per_class=(30, 20, 10)):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    images = torch.arange(labels.numel(), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    return ImageSplits(images, labels, images.clone(), labels.clone(), ["a", "b", "c"])


def test_a_subset_keeps_each_class_share_and_depends_on_the_seed_alone():
    s = splits()
    index = stratified_indices(s.train_labels, 12, 3, seed=0)
    assert torch.bincount(s.train_labels[index], minlength=3).tolist() == [6, 4, 2]
    assert torch.equal(index, stratified_indices(s.train_labels, 12, 3, seed=0))
    assert not torch.equal(index, stratified_indices(s.train_labels, 12, 3, seed=1))
    assert torch.equal(index, index.sort().values)  # kept in the original order


def test_take_subsets_cuts_both_splits():
    cut = take_subsets(splits(), 30, 6, seed=0)
    assert cut.train_images.shape[0] == 30 and cut.test_images.shape[0] == 6
    assert torch.bincount(cut.test_labels, minlength=3).tolist() == [3, 2, 1]
    assert take_subsets(splits(), None, None, seed=0).train_images.shape[0] == 60


@pytest.mark.parametrize("n_train, message", [(61, r"data.n_train=61 is larger than the dataset's 60 images"),
                                              (2, r"data.n_train=2 is below the 3 classes")])
def test_bad_subset_sizes_name_the_key(n_train, message):
    with pytest.raises(ConfigError, match=message):
        take_subsets(splits(), n_train, None, seed=0)


def write_folder(root, per_class=4):
    from PIL import Image

    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8, 3), 10 * c + i, dtype=np.uint8)).save(folder / f"{i}.png")


def test_an_image_folder_subset_is_one_override(tmp_path):
    write_folder(tmp_path)
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "resize": None, "cache": True,
                            "n_train": 4, "n_test": 2, "split_seed": 0})
    cut = read_splits(cfg)
    assert cut.train_images.shape == (4, 3, 8, 8) and cut.test_images.shape[0] == 2
    assert torch.bincount(cut.train_labels).tolist() == [2, 2]


def test_an_image_folder_subset_larger_than_the_folder_fails_before_decoding(tmp_path, monkeypatch):
    import cnnexp.data.imagefolder as imagefolder

    write_folder(tmp_path)
    monkeypatch.setattr(imagefolder, "decode_all", lambda *a: pytest.fail("decoded"))
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "resize": None, "cache": False,
                            "n_train": 9, "n_test": None, "split_seed": 0})
    with pytest.raises(ConfigError, match="data.n_train=9 is larger than the dataset's 8 images"):
        read_splits(cfg)
