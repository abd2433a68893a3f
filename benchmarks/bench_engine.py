"""The original CIFAR-10 tutorial loop against cnnexp's engine, side by side.

    nox -s bench                       # or: python benchmarks/bench_engine.py
    python benchmarks/bench_engine.py --steps 3000 --repeats 7
    python benchmarks/bench_engine.py --data-root PATH/cifar10-jpeg   # + one real epoch, start-up
    python benchmarks/bench_engine.py --device cuda     # eager against CUDA graph

On the CPU three training steps run side by side: the tutorial loop, the
eager engine and the compiled step (cnnexp/kernels), and the report names the
CPU and the step the auto-tuner picks for this machine.

Both sides train the same tutorial CNN on the same CIFAR-shaped synthetic
images (uint8, as the CIFAR-10 batches hold them), batch 4, SGD lr 0.001
momentum 0.9, for the same number of steps. Rounds are interleaved so that
machine noise hits both alike; medians and ratios are reported.

The reference is the tutorial's loop as written: a Dataset that turns each
uint8 image into a PIL image and applies ToTensor + Normalize, a DataLoader
with 2 workers and shuffling, `loss.item()` every step, and evaluation at
batch 4 through a DataLoader as well.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from cnnexp.cpu import cpu_settings
from cnnexp.data import Normalizer
from cnnexp.engine.evaluate import evaluate
from cnnexp.engine.kernels import CompiledStepper
from cnnexp.engine.optimizers import FlatSGD
from cnnexp.engine.steppers import Engine
from cnnexp.models import TutorialCNN

# ----------------------------------------------------------------- data


def cifar_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HWC images as the CIFAR-10 batches hold them, generated in chunks
    so that generating them does not set the peak memory."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(0, n, 2000):
        images[i : i + 2000] = rng.integers(0, 256, (min(2000, n - i), 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, n).astype(np.int64)


class TutorialDataset(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__: uint8 HWC -> PIL -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ----------------------------------------------------------------- the two loops


def reference_train(model, loader, steps: int) -> float:
    """The tutorial's loop; returns seconds per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    running_loss, done = 0.0, 0
    start = time.perf_counter()
    while done < steps:
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - start) / steps


def reference_eval(model, loader) -> float:
    start = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
    return time.perf_counter() - start


def cnnexp_train(model, x, y, steps: int, device: torch.device, cuda_graph: bool = True,
                 compiled: bool = False) -> float:
    """x: uint8 images on the device, normalised inside the step as in a real run."""
    optimizer = FlatSGD(model, lr=0.001, momentum=0.9, capturable=device.type == "cuda" and cuda_graph)
    engine = Engine(model, optimizer, steps * 4, 4, device, num_classes=10, cuda_graph=cuda_graph,
                    prepare=Normalizer([0.5] * 3, [0.5] * 3, 3, device), stepper_class=CompiledStepper if compiled else None)
    perm = torch.randperm(x.shape[0])[: steps * 4]
    engine.train_epoch(x, y, perm[: 4 * 8])  # warm-up (and graph capture on CUDA)
    if device.type == "cuda":
        torch.cuda.synchronize()
    onednn = False if device.type == "cpu" else None
    with cpu_settings(1 if device.type == "cpu" else None, onednn):
        start = time.perf_counter()
        engine.train_epoch(x, y, perm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed / steps


def cnnexp_eval(model, x, y, device: torch.device) -> float:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with cpu_settings(threads, False if device.type == "cpu" else None):
        start = time.perf_counter()
        evaluate(model, x, y, 1000, 10, Normalizer([0.5] * 3, [0.5] * 3, 3, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


# ----------------------------------------------------------------- peak memory


def rss_probe(kind: str) -> None:
    """Child process: a CIFAR-10-sized dataset through one side's data path, a few hundred steps."""
    images, labels = cifar_like(50_000, 0)
    test_images, test_labels = cifar_like(10_000, 1)
    torch.set_num_threads(1)
    model = TutorialCNN()
    if kind == "reference":
        loader = torch.utils.data.DataLoader(TutorialDataset(images, labels), batch_size=4, shuffle=True,
                                             num_workers=2)
        reference_train(model, loader, 300)
    else:
        from omegaconf import OmegaConf

        from cnnexp.data import ImageSplits, to_device

        cfg = OmegaConf.create({"mean": [0.5] * 3, "std": [0.5] * 3})
        splits = ImageSplits(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                             torch.from_numpy(test_images).permute(0, 3, 1, 2).contiguous(),
                             torch.from_numpy(test_labels), [str(i) for i in range(10)])
        del images, test_images
        data = to_device(splits, cfg, torch.device("cpu"))
        del splits
        cnnexp_train(model, data.train_x, data.train_y, 300, torch.device("cpu"))
        cnnexp_eval(model, data.test_x, data.test_y, torch.device("cpu"))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"self_mb": own, "largest_child_mb": children}))


def peak_rss(kind: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-probe", kind], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- main


def tuner_plan(device: torch.device):
    """The step cnnexp's auto-tuner picks for the tutorial net at batch 4 here
    (read from the user cache when a run already timed it)."""
    from omegaconf import OmegaConf

    from cnnexp.cpu import cpu_budget
    from cnnexp.engine.autotune import plan_cpu_step

    sgd = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.001, "momentum": 0.9,
                            "weight_decay": 0.0, "nesterov": False})
    trainer = OmegaConf.create({"num_threads": None, "fast_path": True, "cpu_step": "auto"})
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    return plan_cpu_step(TutorialCNN(), sgd, trainer, x, torch.arange(4),
                         prepare=Normalizer([0.5] * 3, [0.5] * 3, 3, device), num_classes=10, budget=cpu_budget())


def compiled_problem() -> str | None:
    from cnnexp.engine.kernels import unsupported_reason

    return unsupported_reason(TutorialCNN(), torch.zeros(4, 3, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------- one real epoch


def real_epochs(root: str, compiled: bool) -> dict:
    """One epoch of each side on the real images: training over all 50,000 and
    evaluation of all 10,000, wall seconds. The tutorial side reads the JPEGs
    through torchvision's ImageFolder and a 2-worker DataLoader (the original's
    pipeline); cnnexp reads its decoded cache (built on the first run)."""
    import torchvision
    import torchvision.transforms as T
    from omegaconf import OmegaConf

    from cnnexp.data import to_device
    from cnnexp.data.imagefolder import read_imagefolder

    times = {}
    torch.set_num_threads(os.cpu_count())
    transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    train_set = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
    test_set = torchvision.datasets.ImageFolder(os.path.join(root, "test"), transform=transform)
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=True, num_workers=2)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=4, num_workers=2)
    start = time.perf_counter()
    model = TutorialCNN()
    reference_train(model, loader, len(loader))
    reference_eval(model, test_loader)
    times["tutorial"] = time.perf_counter() - start

    cfg = OmegaConf.create({"name": "imagefolder", "root": root, "resize": None, "cache": True,
                            "mean": [0.5] * 3, "std": [0.5] * 3})
    data = to_device(read_imagefolder(cfg), cfg, torch.device("cpu"))
    for kind in ["eager"] + (["compiled"] if compiled else []):
        start = time.perf_counter()
        model = TutorialCNN()
        optimizer = FlatSGD(model, lr=0.001, momentum=0.9)
        n = data.train_x.shape[0]
        engine = Engine(model, optimizer, n, 4, torch.device("cpu"), num_classes=10, prepare=data.normalize,
                        stepper_class=CompiledStepper if kind == "compiled" else None)
        with cpu_settings(1, False):
            engine.train_epoch(data.train_x, data.train_y, torch.randperm(n))
        cnnexp_eval_data(model, data)
        times[kind] = time.perf_counter() - start
    return times


def cnnexp_eval_data(model, data) -> None:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with cpu_settings(threads, False):
        evaluate(model, data.test_x, data.test_y, 1000, 10, data.normalize)


def startup_seconds(root: str) -> float:
    """Seconds from `python -m cnnexp +experiment=reference ...` to its first
    training step (the log line printed just before it), images cached."""
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "cnnexp", "+experiment=reference", f"data.root={root}",
                                 "trainer.progress=log", f"hydra.run.dir={run_dir}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        elapsed = float("nan")
        for line in proc.stdout:
            if "Training TutorialCNN" in line:
                elapsed = time.perf_counter() - start
                break
        proc.kill()
        proc.wait()
    return elapsed


# ----------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", help="CIFAR-10 in the image-folder layout: adds one real epoch and start-up")
    parser.add_argument("--rss-probe", choices=["reference", "cnnexp"], help=argparse.SUPPRESS)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory probes")
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    from cnnexp.cpu import cpu_model

    print(f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
          f" usable cores); torch {torch.__version__}, device {device}")
    problem = compiled_problem() if cpu else "CPU only"
    if cpu:
        print("compiled step: " + (f"not available ({problem})" if problem else "available"))
        plan = tuner_plan(device)
        timed = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(plan.ms_per_step.items(), key=lambda kv: kv[1]))
        print(f"auto-tuner picks: {plan.label} ({plan.chosen_by}{'; ' + timed if timed else ''})")
    print(f"{args.steps} steps x {args.repeats} interleaved rounds, batch 4, tutorial CNN, SGD lr 0.001 momentum 0.9")
    torch.manual_seed(0)
    images, labels = cifar_like(max(args.steps * 4, 10_000), 0)
    test_images, test_labels = cifar_like(10_000, 1)
    loader = torch.utils.data.DataLoader(TutorialDataset(images, labels), batch_size=4, shuffle=True, num_workers=2,
                                         persistent_workers=True)
    test_loader = torch.utils.data.DataLoader(TutorialDataset(test_images, test_labels), batch_size=4,
                                              num_workers=2, persistent_workers=True)
    to_x = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(device)  # noqa: E731
    x, y = to_x(images), torch.from_numpy(labels).to(device)
    tx, ty = to_x(test_images), torch.from_numpy(test_labels).to(device)

    results = {k: [] for k in ("ref_step", "eager_step", "compiled_step", "fast_step", "ref_eval", "fast_eval")}
    for round_ in range(args.repeats):
        if cpu:
            torch.set_num_threads(os.cpu_count())  # the tutorial leaves torch's default
            results["ref_step"].append(reference_train(TutorialCNN(), loader, args.steps))
            results["ref_eval"].append(reference_eval(TutorialCNN(), test_loader))
            results["eager_step"].append(cnnexp_train(TutorialCNN(), x, y, args.steps, device))
            if not problem:
                results["compiled_step"].append(cnnexp_train(TutorialCNN(), x, y, args.steps, device, stepper_class=CompiledStepper))
        else:
            results["eager_step"].append(cnnexp_train(TutorialCNN().to(device), x, y, args.steps, device, False))
            results["fast_step"].append(cnnexp_train(TutorialCNN().to(device), x, y, args.steps, device))
        results["fast_eval"].append(cnnexp_eval(TutorialCNN().to(device), tx, ty, device))
        print(f"  round {round_ + 1}: " + ", ".join(f"{k} {v[-1] * (1e3 if 'step' in k else 1):.3f}"
                                                   for k, v in results.items() if v))
    med = {k: statistics.median(v) for k, v in results.items() if v}
    steps_per_epoch = 12_500
    print("\nmedians (ratio = tutorial loop / cnnexp)")
    if cpu:
        ref = med["ref_step"]
        print(f"  training step      tutorial loop {ref * 1e3:.3f} ms   eager engine {med['eager_step'] * 1e3:.3f} ms"
              f" ({ref / med['eager_step']:.2f}x)" + (
                  f"   compiled step {med['compiled_step'] * 1e3:.3f} ms ({ref / med['compiled_step']:.2f}x;"
                  f" {med['eager_step'] / med['compiled_step']:.2f}x the eager engine)" if "compiled_step" in med else ""))
        print(f"  eval 10,000 imgs   tutorial loop {med['ref_eval']:.3f} s    cnnexp {med['fast_eval']:.3f} s"
              f"    ratio {med['ref_eval'] / med['fast_eval']:.2f}x")
        best = med.get("compiled_step", med["eager_step"])
        ref_run = 50 * (steps_per_epoch * ref + med["ref_eval"]) / 60
    else:
        print(f"  training step     eager {med['eager_step'] * 1e3:.3f} ms   CUDA graph {med['fast_step'] * 1e3:.3f} ms"
              f"   ratio {med['eager_step'] / med['fast_step']:.2f}x")
        print(f"  eval 10,000 imgs  {med['fast_eval']:.3f} s")
        best, ref_run = med["fast_step"], None
    fast_run = 50 * (steps_per_epoch * best + med["fast_eval"]) / 60
    print(f"  full default run (50 epochs x 12,500 steps + eval), from the step times: cnnexp ~{fast_run:.1f} min"
          + (f", tutorial loop ~{ref_run:.1f} min" if ref_run else ""))
    if args.data_root and cpu:
        epochs = real_epochs(args.data_root, compiled=not problem)
        line = ", ".join(f"{k} {v:.1f} s" + (f" ({epochs['tutorial'] / v:.2f}x)" if k != "tutorial" else "")
                         for k, v in epochs.items())
        print(f"  one real epoch (train 50,000 + eval 10,000): {line}")
        print(f"  command to first training step (image cache warm): {startup_seconds(args.data_root):.1f} s")
    if not args.no_rss and cpu:
        ref_rss, fast_rss = peak_rss("reference"), peak_rss("cnnexp")
        print(f"  peak RSS, CIFAR-10-sized data: cnnexp {fast_rss['self_mb']:.0f} MB; reference "
              f"{ref_rss['self_mb']:.0f} MB + {ref_rss['largest_child_mb']:.0f} MB per loader worker")


if __name__ == "__main__":
    main()
