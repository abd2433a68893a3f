"""The fast path computes what plain nn.Module + torch.optim.SGD computes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cnnexp.engine.evaluate import evaluate
from cnnexp.engine.kernels import CompiledStepper
from cnnexp.engine.optimizers import FlatSGD, TorchOptimizer, build_optimizer
from cnnexp.engine.steppers import Engine
from cnnexp.models import TutorialCNN, WideCNN

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def reference_steps(model, data, labels, perm, batch_size, **sgd):
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    for i in range(0, len(perm), batch_size):
        index = perm[i : i + batch_size]
        optimizer.zero_grad()
        F.cross_entropy(model(data[index]), labels[index]).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sgd", [dict(lr=0.01, momentum=0.9), dict(lr=0.01, momentum=0.9, weight_decay=5e-4),
                                 dict(lr=0.01, momentum=0.9, nesterov=True), dict(lr=0.05, momentum=0.0)])
@pytest.mark.parametrize("model_class", [TutorialCNN, lambda: WideCNN(width=4, dropout=0.0)])
def test_fast_path_matches_torch_sgd(device, sgd, model_class):
    torch.manual_seed(0)
    n, batch_size = 202, 4  # 51 steps, the last one a partial batch
    data, labels = torch.randn(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    perm = torch.randperm(n)
    model = model_class().to(device)
    reference = reference_steps(copy.deepcopy(model), data, labels, perm.to(device), batch_size, **sgd)

    optimizer = FlatSGD(model, lr=sgd["lr"], momentum=sgd["momentum"], weight_decay=sgd.get("weight_decay", 0.0),
                        nesterov=sgd.get("nesterov", False), capturable=device == "cuda")
    engine = Engine(model, optimizer, n, batch_size, torch.device(device), num_classes=10)
    result = engine.train_epoch(data, labels, perm)
    assert result.steps == 51 and result.samples == n
    for (name, fast), slow in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_stay_inside_the_flat_buffer():
    model = TutorialCNN()
    optimizer = FlatSGD(model, lr=0.01, momentum=0.9)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    def inside(tensor, buffer):
        start = buffer.data_ptr()
        return start <= tensor.data_ptr() < start + buffer.numel() * buffer.element_size()

    for p in model.parameters():
        assert inside(p.grad, optimizer.grads) and inside(p, optimizer.params)
    assert optimizer.grads.abs().sum() > 0


def test_other_optimisers_go_through_torch_optim():
    cfg = OmegaConf.create({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01})
    optimizer = build_optimizer(cfg, TutorialCNN(), fast_path=True)
    assert isinstance(optimizer, TorchOptimizer)
    assert isinstance(optimizer.optimizer, torch.optim.Adam)
    sgd = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01, "momentum": 0.9,
                            "weight_decay": 0.0, "nesterov": False})
    assert isinstance(build_optimizer(sgd, TutorialCNN(), fast_path=True), FlatSGD)
    assert isinstance(build_optimizer(sgd, TutorialCNN(), fast_path=False), TorchOptimizer)


def test_nan_loss_is_caught_with_its_step():
    torch.manual_seed(0)
    model = TutorialCNN()
    data, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    data[17] = float("nan")  # sample 17 lands in step 5 (0-based 4) in order
    engine = Engine(model, FlatSGD(model, lr=0.01, momentum=0.9), 40, 4, torch.device("cpu"), num_classes=10,
                    nan_check_every=3)
    result = engine.train_epoch(data, labels, torch.arange(40))
    assert result.first_bad_step == 4
    assert result.steps < 10  # stopped at the next check, not at the end of the epoch


def test_evaluate_counts_every_test_image():
    model = TutorialCNN()
    data, labels = torch.randn(250, 3, 32, 32), torch.randint(0, 10, (250,))
    result = evaluate(model, data, labels, batch_size=100, num_classes=10)
    assert int(result.confusion.sum()) == 250
    with torch.no_grad():
        logits = model(data)
    assert result.accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_normalizer_computes_the_usual_formula():
    from cnnexp.data import Normalizer

    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    images[0, :, 0, 0], images[0, :, 0, 1] = 0, 255
    for mean, std in (([0.5] * 3, [0.5] * 3), ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261])):
        expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(Normalizer(mean, std, 3, "cpu")(images), expected, rtol=0, atol=1e-6)
    normalised = Normalizer([0.5] * 3, [0.5] * 3, 3, "cpu")(images)
    assert normalised.min() == -1.0 and normalised.max() == 1.0  # [0, 255] -> [-1, 1] exactly
    gray = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(Normalizer([0.5] * 3, [0.5] * 3, 1, "cpu")(gray), (gray.float() / 255 - 0.5) / 0.5)


@CUDA
def test_cuda_graph_replays_the_eager_step():
    torch.manual_seed(0)
    n = 202
    data = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (n,), device="cuda")
    perm = torch.randperm(n)
    results = {}
    for graph in (False, True):
        torch.manual_seed(1)
        model = TutorialCNN().cuda()
        optimizer = FlatSGD(model, lr=0.01, momentum=0.9, capturable=True)
        engine = Engine(model, optimizer, n, 4, torch.device("cuda"), num_classes=10, cuda_graph=graph,
                        prepare=lambda x: x.float().div(127.5).sub(1))
        for epoch in range(2):
            optimizer.set_lr(0.01 / (epoch + 1))  # a schedule must reach the captured step
            result = engine.train_epoch(data, labels, perm)
        assert (engine.graphed is not None) == graph
        results[graph] = (result, [p.detach().clone() for p in model.parameters()])
    (eager, eager_params), (graphed, graphed_params) = results[False], results[True]
    assert graphed.correct == eager.correct
    assert graphed.loss_sum == pytest.approx(eager.loss_sum, rel=1e-5)
    for a, b in zip(eager_params, graphed_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- the compiled step
class PaddedNet(torch.nn.Sequential):
    """Another shape the compiled step takes: padded 3x3 convolutions, two in a
    row, a conv without pooling, odd pooled sizes, Linear without bias."""

    def __init__(self):
        super().__init__(
            torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(5, 7, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(7, 9, 4), torch.nn.ReLU(), torch.nn.MaxPool2d(2, 2),
            torch.nn.Flatten(), torch.nn.Linear(9 * 6 * 6, 33, bias=False), torch.nn.ReLU(),
            torch.nn.Linear(33, 10))


def train_both(model_class, sgd, n=398, batch_size=4, epochs=1, lrs=None):
    """Train the same start eagerly and compiled on the same uint8 batches; 398
    images at batch 4 is 100 steps, the last one of 2 images."""
    from cnnexp.data import Normalizer

    torch.manual_seed(0)
    data = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    start = model_class()
    out = {}
    for compiled in (False, True):
        model = copy.deepcopy(start)
        optimizer = FlatSGD(model, **sgd)
        engine = Engine(model, optimizer, n, batch_size, torch.device("cpu"), num_classes=10,
                        prepare=Normalizer([0.5] * 3, [0.5] * 3, 3, "cpu"), stepper_class=CompiledStepper if compiled else None)
        for epoch in range(epochs):
            if lrs:
                optimizer.set_lr(lrs[epoch])
            result = engine.train_epoch(data, labels, torch.randperm(n, generator=torch.Generator().manual_seed(epoch)))
        out[compiled] = (model, result, engine.stepper.logits.clone())
    return out[False], out[True]


SGD_SETTINGS = [dict(lr=0.01, momentum=0.9), dict(lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True),
                dict(lr=0.03, momentum=0.0)]


@pytest.mark.parametrize("sgd", SGD_SETTINGS)
@pytest.mark.parametrize(("model_class", "lr_scale"), [(TutorialCNN, 1.0), (PaddedNet, 0.3)])
def test_compiled_step_matches_the_eager_step(compiled_library, model_class, lr_scale, sgd):
    # At lr 0.01, step 58 of the PaddedNet run meets a max-pooling window whose
    # two largest values are one rounding step apart: any other summation
    # order may route that gradient to the other pixel, and the paths part from
    # there. At 0.3x the learning rate no such near-tie occurs.
    sgd = {**sgd, "lr": sgd["lr"] * lr_scale}
    (eager, eager_result, eager_logits), (fused, fused_result, fused_logits) = train_both(model_class, sgd)
    assert fused_result.steps == eager_result.steps == 100
    for (name, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
        assert not torch.equal(a, model_class().state_dict()[name])  # both really trained
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(fused_logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert fused_result.correct == eager_result.correct
    assert fused_result.loss_sum == pytest.approx(eager_result.loss_sum, rel=1e-5)


def test_compiled_step_follows_a_learning_rate_schedule(compiled_library):
    (eager, *_), (fused, *_) = train_both(TutorialCNN, dict(lr=0.01, momentum=0.9), n=80, epochs=3,
                                           lrs=[0.02, 0.01, 0.0])
    for a, b in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compiled_epoch_stopped_and_resumed_equals_an_uninterrupted_one(compiled_library):
    from cnnexp.data import Normalizer

    torch.manual_seed(0)
    n = 90
    data, labels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,))
    perm, start = torch.randperm(n), TutorialCNN()

    def engine_for(model):
        return Engine(model, FlatSGD(model, lr=0.01, momentum=0.9), n, 4, torch.device("cpu"), num_classes=10,
                      prepare=Normalizer([0.5] * 3, [0.5] * 3, 3, "cpu"), stepper_class=CompiledStepper)

    whole_model = copy.deepcopy(start)
    whole = engine_for(whole_model).train_epoch(data, labels, perm)
    first_model = copy.deepcopy(start)
    first_engine = engine_for(first_model)
    stops = iter(range(1000))
    part = first_engine.train_epoch(data, labels, perm, should_stop=lambda: next(stops) == 9)
    assert part.steps == 10
    resumed_model = copy.deepcopy(first_model)  # as a checkpoint would carry it
    resumed_engine = engine_for(resumed_model)
    resumed_engine.optimizer.load_state_dict(first_engine.optimizer.state_dict())
    rest = resumed_engine.train_epoch(data, labels, perm, start_step=10,
                                      prior_logits=first_engine.stepper.logits[: part.samples].clone())
    assert (rest.steps, rest.samples, rest.correct, rest.loss_sum) == (whole.steps, whole.samples, whole.correct,
                                                                       whole.loss_sum)
    for a, b in zip(whole_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_compiled_step_reports_a_nan_at_its_step(compiled_library):
    torch.manual_seed(0)
    model = TutorialCNN()
    data, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    data[17] = float("nan")  # sample 17 lands in step 5 (0-based 4) in order
    engine = Engine(model, FlatSGD(model, lr=0.01, momentum=0.9), 40, 4, torch.device("cpu"), num_classes=10,
                    nan_check_every=3, stepper_class=CompiledStepper)
    result = engine.train_epoch(data, labels, torch.arange(40))
    assert result.first_bad_step == 4
    assert result.steps < 10


@pytest.mark.parametrize(("model", "reason"), [
    (lambda: WideCNN(width=4), "BatchNorm2d"),
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 15 * 15, 10)), "stride"),
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 15 * 15, 10)), "AvgPool2d"),
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(3), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 10 * 10, 10)), "MaxPool2d(2)"),
])
def test_models_outside_the_compiled_layers_say_why(model, reason):
    from cnnexp.engine.kernels import unsupported_reason

    assert reason in unsupported_reason(model(), torch.zeros(4, 3, 32, 32, dtype=torch.uint8))


def test_other_optimisers_and_no_compiler_fall_back_with_a_reason(monkeypatch, tmp_path):
    from cnnexp.engine.autotune import compiled_step_problem
    from cnnexp.engine.kernels import build

    batch = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    adam = OmegaConf.create({"_target_": "torch.optim.Adam", "lr": 0.01})
    assert "torch.optim.Adam" in compiled_step_problem(TutorialCNN(), adam, flat_sgd=False, x=batch)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CNNEXP_CACHE_DIR", str(tmp_path))  # no library built yet: a compiler is needed
    with pytest.raises(build.BuildError, match="no C.. compiler"):
        build.load.__wrapped__()
