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
