"""The fast94 recipe's training step: cnnexp's against a plain PyTorch loop, side by side.

    nox -s bench_recipe                         # or: python benchmarks/bench_recipe.py
    python benchmarks/bench_recipe.py --batch 1024 --steps 5 --repeats 5

Both sides train the same net (cnnexp.models.Fast94Net, widths 64/256/256,
whitening fitted once), on the same uint8 CIFAR-shaped batch, at the same
batch size, with the preset's Nesterov SGD (lr 1.5, momentum 0.85, weight decay
0.00133; the batch-norm shifts at 64x the rate) and label smoothing 0.2, in each
of four settings:
float32, float32 + channels_last, bf16 autocast, bf16 + channels_last.

    cnnexp   engine.steppers.Stepper with the preset's StepOptions, FlatSGD,
             the uint8 batch normalised inside the step, logits recorded
    plain    the textbook loop: normalise, autocast forward, cross-entropy,
             backward, torch.optim.SGD step, with zero_grad(set_to_none=True)

Rounds are interleaved (every setting and both sides once per round) so that
load from other processes hits all of them alike; the report gives the
median images per second, cnnexp / plain, and each setting against float32.
The data gather and augmentation (once per epoch in cnnexp) are not timed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from cnnexp.cpu import cpu_model, cpu_settings
from cnnexp.data import Normalizer
from cnnexp.engine.optimizers import FlatSGD
from cnnexp.engine.precision import StepOptions, cpu_supports_bf16
from cnnexp.engine.steppers import Stepper
from cnnexp.models import Fast94Net

SETTINGS = [("fp32", "32", False), ("fp32+CL", "32", True), ("bf16", "bf16", False), ("bf16+CL", "bf16", True)]
LR, MOMENTUM, WEIGHT_DECAY = 1.5, 0.85, 0.00133  # conf/experiment/fast94.yaml
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def fresh_net(channels_last: bool, images: torch.Tensor, normalize: Normalizer) -> torch.nn.Module:
    torch.manual_seed(0)
    net = Fast94Net()
    net.fit_to_data(normalize(images))
    return net.to(memory_format=torch.channels_last) if channels_last else net


def cnnexp_step(precision: str, channels_last: bool, x, y, normalize):
    net = fresh_net(channels_last, x, normalize)
    opt = FlatSGD(net, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True)
    options = StepOptions(precision=precision, channels_last=channels_last, label_smoothing=0.2)
    stepper = Stepper(net, opt, x.shape[0], 10, x.shape[0], x.device, normalize, options=options)
    return lambda: stepper.step(x, y, row=0)


def plain_step(precision: str, channels_last: bool, x, y, normalize):
    net = fresh_net(channels_last, x, normalize)
    trained = [p for p in net.parameters() if p.requires_grad]
    scaled = [p for p in trained if hasattr(p, "lr_scale")]
    rest = [p for p in trained if not hasattr(p, "lr_scale")]
    scale = scaled[0].lr_scale
    opt = torch.optim.SGD([{"params": rest}, {"params": scaled, "lr": LR * scale, "weight_decay": WEIGHT_DECAY / scale}],
                          lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def step():
        inputs = (x.float() - mean) / std
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(inputs)
        loss = F.cross_entropy(out.float(), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side, setting and round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    normalize = Normalizer(MEAN, STD, 3, "cpu")
    settings = [s for s in SETTINGS if s[1] == "32" or cpu_supports_bf16()]
    steps = {}
    with cpu_settings(args.threads, True):  # oneDNN on: bf16 and channels_last convolutions run through it
        for name, precision, cl in settings:
            for side, make in (("cnnexp", cnnexp_step), ("plain", plain_step)):
                step = make(precision, cl, x, y, normalize)
                step()  # warm-up: allocation, oneDNN primitive creation
                steps[(name, side)] = step
        times = {key: [] for key in steps}
        for _ in range(args.repeats):
            for key, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[key].append((time.perf_counter() - start) / args.steps)

    print(f"CPU: {cpu_model()} ({platform.machine()}), {args.threads} threads, torch {torch.__version__}")
    print(f"Fast94Net, batch {args.batch}, {args.steps} steps x {args.repeats} interleaved rounds, medians")
    print(f"{'setting':10} {'cnnexp img/s':>13} {'plain img/s':>12} {'cnnexp/plain':>13} {'vs fp32':>8}")
    base = None
    for name, _, _ in settings:
        ours = args.batch / statistics.median(times[(name, "cnnexp")])
        plain = args.batch / statistics.median(times[(name, "plain")])
        base = base or ours
        print(f"{name:10} {ours:13.0f} {plain:12.0f} {ours / plain:13.2f} {ours / base:8.2f}")
    print("Images per second of the training step only (the per-epoch gather and augmentation are not timed).")


if __name__ == "__main__":
    main()
