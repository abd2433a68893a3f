"""Step options (precision, channels_last, label smoothing, torch.compile), per-step
schedules, weight decay without norms and biases, the weight average, and the
CPU step tuner's time limit."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from cnnexp.engine.ema import WeightAverage
from cnnexp.engine.lookahead import Lookahead
from cnnexp.engine.optimizers import FlatSGD, TorchOptimizer, build_optimizer
from cnnexp.engine.precision import StepOptions, cpu_supports_bf16, precision_problem
from cnnexp.engine.schedules import Schedule
from cnnexp.engine.steppers import Stepper
from cnnexp.models import WideCNN


def small_net():
    torch.manual_seed(0)
    return WideCNN(width=4, dropout=0.0)


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_steps(options, steps=3, model=None):
    model = model or small_net()
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = batch()
    stepper = Stepper(model, FlatSGD(model, lr=0.05, momentum=0.9), 8, 10, 8, torch.device("cpu"), options=options)
    for _ in range(steps):
        stepper.step(x, y, row=0)
    return model, stepper


def test_the_default_options_are_the_original_step():
    assert StepOptions().is_plain
    out, y = torch.randn(5, 10), torch.arange(5)
    assert torch.equal(StepOptions().loss(out, y), F.cross_entropy(out, y))
    assert not StepOptions(label_smoothing=0.1).is_plain


def test_label_smoothing_raises_the_loss_of_a_confident_right_answer():
    out, y = torch.tensor([[10.0, 0.0]]), torch.tensor([0])
    plain = float(StepOptions().loss(out, y))
    smooth = float(StepOptions(label_smoothing=0.2).loss(out, y))
    assert plain < 1e-3 and abs(smooth - 0.1 * 10.0 - plain) < 1e-2  # 0.2/2 of the mass on the wrong class


def test_channels_last_trains_the_same_weights():
    a, _ = train_steps(StepOptions())
    b, _ = train_steps(StepOptions(channels_last=True))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-4)


def test_flat_sgd_keeps_channels_last_weights_in_that_format():
    model = small_net().to(memory_format=torch.channels_last)
    FlatSGD(model, lr=0.1)
    conv = model.features[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_trains_close_to_float32_on_the_cpu():
    a, _ = train_steps(StepOptions())
    b, stepper = train_steps(StepOptions(precision="bf16"))
    assert all(p.dtype == torch.float32 for p in b.parameters())  # autocast: weights stay float32
    diffs = [float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters())]
    assert max(diffs) < 0.05 and max(diffs) > 0  # bf16 rounding, not another computation
    assert torch.isfinite(stepper.logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_mixed_trains_on_cuda_with_a_loss_scaler():
    model = small_net().cuda()
    x, y = (t.cuda() for t in batch())
    stepper = Stepper(model, FlatSGD(model, lr=0.05, momentum=0.9), 8, 10, 8, x.device,
                      options=StepOptions(precision="16-mixed"))
    for _ in range(3):
        stepper.step(x, y, row=0)
    assert stepper.scaler is not None and stepper.scaler.good_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_precision_problems_name_the_key_and_what_to_use():
    assert "use trainer.precision=bf16" in precision_problem("16-mixed", "cpu")
    assert precision_problem("32", "cpu") is None
    expected = None if cpu_supports_bf16() else "trainer.precision=32"
    problem = precision_problem("bf16", "cpu")
    assert problem is None if expected is None else expected in problem


@pytest.mark.slow
def test_torch_compile_runs_the_eager_step():
    model = small_net()
    compiled = torch.compile(model)
    x, y = batch()
    stepper = Stepper(compiled, FlatSGD(model, lr=0.05), 8, 10, 8, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    stepper.step(x, y, row=0)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ----------------------------------------------------------------- weight decay
def test_weight_decay_can_skip_norms_and_biases():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1.0, "momentum": 0.0,
                            "weight_decay": 0.1})
    for fast_path in (True, False):
        model = small_net()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(cfg, model, fast_path=fast_path, decay_norm_and_bias=False)
        assert isinstance(opt, FlatSGD if fast_path else TorchOptimizer)
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        opt.step()  # zero gradients: only weight decay moves anything
        for name, p in model.named_parameters():
            if p.dim() <= 1:
                assert torch.equal(p, before[name]), name
            else:
                assert torch.allclose(p, before[name] * 0.9), name


def test_a_parameter_tagged_with_lr_scale_learns_faster_with_the_same_decay_per_step():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5, "momentum": 0.85,
                            "nesterov": True, "weight_decay": 0.01})
    x, y = batch(16)
    results = {}
    for fast_path in (True, False):
        torch.manual_seed(0)
        model = small_net()
        shifts = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for p in shifts:
            p.lr_scale = 8.0
        opt = build_optimizer(cfg, model, fast_path=fast_path)
        assert isinstance(opt, FlatSGD if fast_path else TorchOptimizer)
        for step in range(3):
            opt.set_lr(0.5 * (step + 1) / 3)  # a schedule moves the scaled group along with the rest
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results[fast_path] = [p.detach().clone() for p in model.parameters()]
        assert opt.lr == 0.5  # the base rate, not a scaled one

    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[True], results[False]))
    # With zero gradients, one step moves a scaled parameter by lr * weight_decay, as any other.
    model = small_net()
    p = next(m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    p.lr_scale = 8.0
    with torch.no_grad():
        p.fill_(1.0)
    opt = build_optimizer(OmegaConf.merge(cfg, {"momentum": 0.0, "nesterov": False}), model, fast_path=True)
    opt.zero_grad()
    opt.step()
    assert torch.allclose(p, torch.full_like(p, 1 - 0.5 * 0.01))


# ----------------------------------------------------------------- schedules
def test_the_per_epoch_schedules_are_unchanged():
    s = Schedule(0.1, "cosine", 4, 10)
    assert not s.per_step
    assert s.at(1) == 0.1 and math.isclose(s.at(3), 0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert Schedule(0.1, "constant", 4, 10).at(4, 7) == 0.1


def test_warmup_then_linear_decay_per_step():
    s = Schedule(1.0, "linear", 10, 100, warmup_epochs=2)
    assert s.per_step
    assert math.isclose(s.at(1, 0), 1 / 200)  # the first step of warmup
    assert math.isclose(s.at(2, 99), 1.0)  # the last warmup step reaches the base rate
    assert math.isclose(s.at(6, 0), 1 - 3 / 8)  # decay: 3 of the 8 remaining epochs done
    assert 0 < s.at(10, 99) < 0.002


def test_warmup_from_a_fraction_and_decay_to_a_floor():
    s = Schedule(1.0, "linear", 10, 100, warmup_epochs=2, start=0.2, final=0.07)
    assert math.isclose(s.at(1, 0), 0.2 + 0.8 / 200)  # starts at 0.2 of the rate
    assert math.isclose(s.at(2, 99), 1.0)
    assert math.isclose(s.at(6, 0), 0.07 + 0.93 * (1 - 3 / 8))
    assert 0.07 <= s.at(10, 99) < 0.072  # ends at the floor, not 0
    cosine = Schedule(1.0, "cosine", 4, 10, final=0.5)
    assert cosine.per_step  # a floor makes even a cosine without warmup per step
    assert math.isclose(cosine.at(1, 0), 1.0) and math.isclose(cosine.at(3, 0), 0.75)


def test_onecycle_and_step_schedules():
    one = Schedule(1.0, "onecycle", 10, 10)
    assert one.at(1, 0) < 0.05 and math.isclose(one.at(4, 0), 1.0) and one.at(10, 9) < 0.02
    step = Schedule(1.0, "step", 9, 10)
    assert [step.at(e) for e in (1, 4, 7)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]


# ----------------------------------------------------------------- weight average
def test_the_weight_average_follows_the_weights_and_swaps_in_for_evaluation():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()  # the first update's decay is 1/10 (warming up), not 0.5
    with ema.swapped_in():
        assert torch.allclose(model.weight, torch.full((1, 2), 0.9))
    ema.updates = 100
    with torch.no_grad():
        model.weight.fill_(0.1)
    ema.update()  # past the warm-up: the configured 0.5
    with ema.swapped_in():
        assert torch.allclose(model.weight, torch.full((1, 2), 0.5))
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert torch.allclose(model.weight, torch.ones(1, 2))  # the training weights come back
    saved = ema.state_dict()
    other = WeightAverage(model, decay=0.5)
    other.load_state_dict(saved)
    with other.swapped_in():
        assert torch.allclose(model.weight, torch.full((1, 2), 0.5))


# ----------------------------------------------------------------- lookahead
def test_lookahead_pulls_the_weights_back_every_k_steps_with_a_growing_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    la = Lookahead(model, every=2, final_decay=0.8, total_steps=5)

    def step_to(value):
        with torch.no_grad():
            model.weight.fill_(value)
        la.after_step()
        return model.weight.item()

    assert step_to(1.0) == 1.0  # step 1: not an update step, the weights go on
    decay = 0.8 * (2 / 5) ** 3
    assert math.isclose(step_to(2.0), decay * 0.0 + (1 - decay) * 2.0, rel_tol=1e-6)  # step 2: pulled back
    slow = model.weight.item()
    assert step_to(3.0) == 3.0
    saved = la.state_dict()
    decay = 0.8 * (4 / 5) ** 3
    expected = decay * slow + (1 - decay) * 4.0
    assert math.isclose(step_to(4.0), expected, rel_tol=1e-6)
    assert math.isclose(step_to(5.0), 0.8 * expected + 0.2 * 5.0, rel_tol=1e-6)  # the last step updates too

    restored = Lookahead(model, every=2, final_decay=0.8, total_steps=5)
    restored.load_state_dict(saved)  # a resumed run continues from step 3 alike
    with torch.no_grad():
        model.weight.fill_(4.0)
    restored.after_step()
    assert restored.steps == 4 and math.isclose(model.weight.item(), expected, rel_tol=1e-6)


# ----------------------------------------------------------------- the CPU step tuner
def test_the_tuner_does_not_time_a_large_step_it_cannot_compile(tmp_path):
    from omegaconf import OmegaConf

    from cnnexp.engine.autotune import plan_cpu_step

    model = WideCNN(width=8)
    x = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    optim = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9})
    trainer = OmegaConf.create({"fast_path": True, "cpu_step": "auto", "num_threads": None})
    started = time.perf_counter()
    plan = plan_cpu_step(model, optim, trainer, x, torch.zeros(16, dtype=torch.long), prepare=lambda b: b.float(),
                         num_classes=10, budget=2, cache_file=tmp_path / "plans.json")
    assert plan.chosen_by.startswith("known") and plan.threads == 2 and plan.ms_per_step == {}
    assert time.perf_counter() - started < 2.0


def test_the_tuner_stops_timing_at_its_limit():
    from cnnexp.engine.autotune import Candidate, time_candidates

    def slow_step():
        return lambda: time.sleep(0.05)

    candidates = [Candidate("eager", t, o, slow_step) for t in (1, 2) for o in (False, True)]
    started = time.perf_counter()
    ms = time_candidates(candidates, seconds=1.5, limit=0.08)
    assert time.perf_counter() - started < 1.2
    assert 1 <= len(ms) < 4  # the ones left when the time ran out were not timed


def test_the_tuner_gives_a_slow_step_every_core_after_one_measured_step(tmp_path):
    from omegaconf import OmegaConf

    from cnnexp.engine.autotune import plan_cpu_step

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 10)

        def forward(self, x):
            time.sleep(0.15)  # as slow as a large convolution net
            return self.fc(x.flatten(1))

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    optim = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9})
    trainer = OmegaConf.create({"fast_path": True, "cpu_step": "eager", "num_threads": None})
    started = time.perf_counter()
    plan = plan_cpu_step(Slow(), optim, trainer, x, torch.zeros(4, dtype=torch.long), prepare=lambda b: b.float(),
                         num_classes=10, budget=2, cache_file=tmp_path / "plans.json")
    assert plan.chosen_by.startswith("known (a 1-thread step takes") and plan.threads == 2
    assert time.perf_counter() - started < 2.0
