"""Augmentation of training images on the device: what each operation does,
reproducibility under the seed, and test-time views."""

import torch

from cnnexp.data.augment import Augment, cutout, translate, tta_views


def images(n=64, size=8):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_flip_mirrors_about_half_the_images_and_nothing_else():
    x = images(400)
    out = Augment(flip=True)(x, seed=0, epoch=1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert bool((mirrored | same).all())
    assert 150 < int(mirrored.sum()) < 250
    assert out.dtype == torch.uint8


def test_translate_shifts_each_image_with_a_reflected_border():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    out = translate(x, torch.tensor([[0, 0], [1, 1]]), pad=1)
    assert torch.equal(out[0], x[0])
    # shifted by one row and one column; the last row and column reflect back
    assert out[1, 0].tolist() == [[5, 6, 7, 6], [9, 10, 11, 10], [13, 14, 15, 14], [9, 10, 11, 10]]


def test_cutout_zeroes_one_square_of_the_given_side_inside_the_image():
    x = torch.full((50, 1, 16, 16), 7, dtype=torch.uint8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeroed = (out == 0).sum((1, 2, 3))
    assert int(zeroed.max()) == 16 and int(zeroed.min()) >= 4  # clipped at the border, never larger
    assert bool((out[out != 0] == 7).all())


def test_an_epoch_is_drawn_from_seed_and_epoch_alone():
    aug, x = Augment(flip=True, translate=2, cutout=3), images()
    assert torch.equal(aug(x, 0, 3), aug(x, 0, 3))  # a resume redraws the same epoch
    assert not torch.equal(aug(x, 0, 3), aug(x, 0, 4))
    assert not torch.equal(aug(x, 0, 3), aug(x, 1, 3))
    assert torch.equal(x, images())  # the stored images are never changed


def test_no_augmentation_returns_the_images_unchanged():
    x = images()
    assert Augment()(x, 0, 1) is x
    assert not Augment().active and Augment().describe() == "none"


def test_the_engine_augments_training_batches_only():
    from cnnexp.engine.evaluate import evaluate
    from cnnexp.engine.optimizers import FlatSGD
    from cnnexp.engine.steppers import Engine

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 2)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.fc(x.flatten(1))

    x, y = images(8), torch.arange(8) % 2
    model = Recorder()
    engine = Engine(model, FlatSGD(model, lr=0.0), 8, 8, torch.device("cpu"), num_classes=2,
                    prepare=lambda b: b.float())
    engine.train_epoch(x, y, torch.arange(8), augment=lambda b: b.flip(3))
    assert torch.equal(seen[-1], x.flip(3).float())
    evaluate(model, x, y, 8, 2, lambda b: b.float())
    assert torch.equal(seen[-1], x.float())


def test_tta_views_weigh_up_to_one_and_include_the_mirror():
    batch = torch.randn(2, 3, 8, 8)
    for mode, count in (("none", 1), ("flip", 2), ("flip_translate", 6)):
        views = tta_views(batch, mode)
        assert len(views) == count and abs(sum(w for _, w in views) - 1) < 1e-9
        assert all(v.shape == batch.shape for v, _ in views)
    assert torch.equal(tta_views(batch, "flip")[1][0], batch.flip(3))
    shifted = tta_views(batch, "flip_translate")[2][0]  # down-right by one pixel, the border reflected
    assert torch.equal(shifted[:, :, 1:, 1:], batch[:, :, :-1, :-1])


def test_alternating_flips_mirror_each_image_in_every_other_epoch_wherever_it_lands():
    x = images(300)
    aug = Augment(flip=True, alternate_flip=True)
    g = torch.Generator().manual_seed(3)
    perms = [torch.randperm(300, generator=g) for _ in range(3)]
    flipped = []
    for epoch, perm in enumerate(perms, start=1):
        out = aug(x[perm], seed=5, epoch=epoch, index=perm)
        mirrored = torch.empty(300, dtype=torch.bool)
        mirrored[perm] = (out == x[perm].flip(3)).flatten(1).all(1)  # back in the training set's order
        flipped.append(mirrored)
    assert 100 < int(flipped[0].sum()) < 200  # a coin toss per image to start
    assert bool((flipped[1] == ~flipped[0]).all()) and torch.equal(flipped[2], flipped[0])
    assert torch.equal(aug(x[perms[0]], 5, 1, index=perms[0]), aug(x[perms[0]], 5, 1, index=perms[0]))
    assert aug.describe() == "alternating flip"
