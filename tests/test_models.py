import torch

from cnnexp.models import TutorialCNN, WideCNN, count_parameters


def test_tutorial_cnn_matches_the_original_net():
    model = TutorialCNN()
    assert count_parameters(model) == 62_006
    layers = [(type(m).__name__, tuple(getattr(m, "weight", torch.empty(0)).shape)) for m in model.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers == [("Conv2d", (6, 3, 5, 5)), ("Conv2d", (16, 6, 5, 5)), ("Linear", (120, 400)),
                      ("Linear", (84, 120)), ("Linear", (10, 84))]
    assert model(torch.randn(7, 3, 32, 32)).shape == (7, 10)


def test_models_take_channels_and_classes_from_the_data():
    assert TutorialCNN(in_channels=1, num_classes=4)(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert WideCNN(in_channels=3, num_classes=5, width=8)(torch.randn(2, 3, 24, 24)).shape == (2, 5)


def test_resnet18_is_the_cifar_variant_and_keeps_a_4x4_map():
    from cnnexp.models import ResNet18

    model = ResNet18(in_channels=3, num_classes=10)
    assert count_parameters(model) == 11_173_962  # the usual CIFAR ResNet-18
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    features = model.stages(model.stem(torch.randn(2, 3, 32, 32)))
    assert features.shape == (2, 512, 4, 4)


def test_timm_models_take_channels_and_classes_and_bad_names_get_suggestions():
    import pytest

    from cnnexp.errors import ConfigError
    from cnnexp.models import TimmModel, check_timm_name

    model = TimmModel("resnet18", in_channels=1, num_classes=4)
    model.eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(ConfigError, match=r"model.name='resnet181'.*did you mean resnet18"):
        check_timm_name("resnet181")


def test_torchvision_classifiers_build_without_a_wrapper_and_the_probe_runs_in_eval_mode():
    from omegaconf import OmegaConf

    from cnnexp.data import ImageSplits
    from cnnexp.run.build import build_model

    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    splits = ImageSplits(images, torch.arange(4) % 2, images, torch.arange(4) % 2, ["a", "b"])
    model = build_model(OmegaConf.create({"_target_": "torchvision.models.resnet18"}), splits)
    assert model.conv1.in_channels == 1  # adapted: torchvision's resnet takes no in_channels
    assert model.fc.out_features == 2
    assert model.training  # back in training mode after the eval-mode probe


def test_fast94_whitening_decorrelates_the_patches_it_was_fitted_on():
    import torch.nn.functional as F

    from cnnexp.models import Fast94Net

    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(400, 3, 16, 16, generator=g))
    model = Fast94Net(widths=(8, 16, 16))
    model.fit_to_data(images)
    out = F.conv2d(images, model.whiten.weight[:12])  # the first half: W, the rest is -W
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_fast94_norms_keep_a_unit_scale_and_train_their_shifts_faster_from_an_identity_like_start():
    from cnnexp.models import Fast94Net

    model = Fast94Net(widths=(8, 16, 16), norm_bias_lr_scale=32.0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(not n.weight.requires_grad and torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    assert all(n.bias.requires_grad and n.bias.lr_scale == 32.0 and n.momentum == 0.4 for n in norms)
    assert not any(hasattr(p, "lr_scale") for n, p in model.named_parameters() if "weight" in n)
    # A 3x3 conv of the second block starts by passing its first 8 channels through.
    conv = model.blocks[1][0]
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(conv(x)[:, :8], x)
