"""The compiled step at its C boundary and in its build: sizes, labels and
descriptions it refuses, a fall-back to eager, both compilers, the shared
cache, and a failed build that is remembered."""

import ctypes
import os
import shutil
import stat

import pytest
import torch
from omegaconf import OmegaConf

from cnnexp.data import Normalizer
from cnnexp.engine.kernels import CompiledStepper, build
from cnnexp.engine.kernels import layers as chain_of
from cnnexp.engine.optimizers import build_optimizer
from cnnexp.engine.steppers import Stepper
from cnnexp.models import TutorialCNN

SGD = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9})


@pytest.fixture(scope="module")
def lib():
    if build.compiler() is None:
        pytest.skip("no C++ compiler here: the compiled step falls back to eager")
    try:
        return build.load()
    except build.BuildError as err:
        pytest.skip(f"the compiled step does not build here: {err}")


def make_stepper(rows=16, batch_size=4, seed=0, cls=CompiledStepper):
    torch.manual_seed(seed)
    model = TutorialCNN()
    optimizer = build_optimizer(SGD, model, fast_path=True)
    norm = Normalizer([0.5] * 3, [0.5] * 3, 3, "cpu")
    return cls(model, optimizer, rows, 10, batch_size, torch.device("cpu"), norm), optimizer


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def create(lib, spec, optimizer):
    t = torch.tensor(spec, dtype=torch.int32)
    reason = ctypes.create_string_buffer(512)
    handle = lib.cnx_create(t.data_ptr(), t.numel(), optimizer.params.data_ptr(), optimizer.grads.data_ptr(), None,
                            optimizer.params.numel(), reason, 512)
    return handle, reason.value.decode()


# ----------------------------------------------------------------- sizes
def test_a_huge_batch_is_refused_with_the_memory_it_needs_not_a_crash(lib):
    stepper, optimizer = make_stepper()
    spec = chain_of.spec(stepper.layers, (3, 32, 32), 2**31 - 1, optimizer.params)
    handle, reason = create(lib, spec, optimizer)
    assert handle is None
    assert "could not allocate the buffers for batches of 2147483647 images" in reason and "GB" in reason


def test_a_batch_size_beyond_the_epoch_allocates_for_the_epoch_only(lib):
    stepper, optimizer = make_stepper(rows=40, batch_size=100_000)
    x, y = batch(40)
    stepper.step_slice(x, y, 0, 40)
    assert stepper.max_images == 40 and stepper.eager_because is None
    eager, eager_opt = make_stepper(rows=40, batch_size=100_000, cls=Stepper)
    eager.step_slice(x, y, 0, 40)
    torch.testing.assert_close(optimizer.params, eager_opt.params, rtol=1e-4, atol=1e-5)


def test_a_library_that_refuses_to_set_up_falls_back_to_eager_saying_why(lib, caplog):
    class Refusing:  # the library's answer when its buffers cannot be allocated
        def __getattr__(self, name):
            return getattr(lib, name)

        def cnx_create(self, *args):
            args[-2].value = b"could not allocate the buffers for batches of 4 images (over 9 GB)"
            return None

    stepper, optimizer = make_stepper()
    stepper.lib = Refusing()
    eager, eager_opt = make_stepper(cls=Stepper)
    x, y = batch(16)
    with caplog.at_level("WARNING", logger="cnnexp"):
        for lo in range(0, 16, 4):
            stepper.step_slice(x, y, lo, lo + 4)
            eager.step_slice(x, y, lo, lo + 4)
    assert [r.getMessage() for r in caplog.records].count(
        "The compiled CPU step is not used: could not allocate the buffers for batches of 4 images (over 9 GB); "
        "this run steps eagerly.") == 1
    assert torch.equal(optimizer.params, eager_opt.params)
    assert torch.equal(stepper.logits, eager.logits)


# ----------------------------------------------------------------- the C boundary
@pytest.mark.parametrize("bad", [10, -1, 2**40])
def test_labels_outside_the_classes_raise_as_eager_does_and_change_nothing(lib, bad):
    stepper, optimizer = make_stepper()
    x, y = batch(16)
    y[6] = bad
    before = optimizer.params.clone()
    with pytest.raises(IndexError, match=f"label {bad} of sample 2 in the batch is outside \\[0, 10\\)"):
        stepper.step_slice(x, y, 4, 8)  # the direct path
    with pytest.raises(IndexError, match=f"label {bad} of sample 2"):
        stepper.step(x[4:8], y[4:8], row=4)  # the checked path
    assert torch.equal(optimizer.params, before)
    eager, _ = make_stepper(cls=Stepper)
    with pytest.raises((IndexError, RuntimeError)):  # eager refuses the same labels
        eager.step(x[4:8], y[4:8], row=4)


def test_int32_labels_are_refused_not_read_as_int64(lib):
    stepper, optimizer = make_stepper()
    x, y = batch(8)
    before = optimizer.params.clone()
    with pytest.raises(TypeError, match="int64 labels, not torch.int32"):
        stepper.step(x[:4], y[:4].int(), row=0)
    with pytest.raises(TypeError, match="int64 labels"):
        stepper.step(x[:4], y[:3], row=0)
    assert torch.equal(optimizer.params, before)


def test_the_library_checks_the_description_against_the_parameters(lib):
    stepper, optimizer = make_stepper()
    good = chain_of.spec(stepper.layers, (3, 32, 32), 4, optimizer.params)
    handle, reason = create(lib, good, optimizer)
    assert handle and reason == ""
    lib.cnx_destroy(handle)
    weight_offset = 6 + 5  # after the 6-int header, the first layer (a conv): its weight offset
    cases = {
        "parameters outside the buffer": {weight_offset: optimizer.params.numel() - 10},
        "a convolution 4->6": {6 + 1: 4},  # in_channels that the input does not have
        "unknown kind 9": {6 + 8: 9},
        "layer description version 7": {0: 7},
        "a batch of 0 images": {2: 0},
    }
    for expected, changes in cases.items():
        spec = list(good)
        for i, v in changes.items():
            spec[i] = v
        handle, reason = create(lib, spec, optimizer)
        assert handle is None and expected in reason, (expected, reason)
    handle, reason = create(lib, good[:-8], optimizer)  # one layer fewer than the header says
    assert handle is None and "do not match" in reason


def test_the_library_refuses_more_images_than_it_was_set_up_for(lib):
    stepper, optimizer = make_stepper(rows=16, batch_size=4)
    x, y = batch(16)
    stepper.step_slice(x, y, 0, 4)
    logits = torch.zeros(8, 10)
    status = lib.cnx_step(stepper.handle, x.data_ptr(), 1, stepper.prepare.shift.data_ptr(),
                          stepper.prepare.scale.data_ptr(), y.data_ptr(), 8, logits.data_ptr(), 0.01, 0.9, 0.0, 0)
    assert status == -1 and not logits.any()
    with pytest.raises(ValueError, match="samples 12:20 outside the epoch's 16"):
        stepper.step_slice(x, y, 12, 20)


# ----------------------------------------------------------------- the build
@pytest.mark.parametrize("cxx", ["g++", "clang++"])
def test_gcc_and_clang_build_a_library_that_steps_as_eager_does(cxx, tmp_path):
    if not shutil.which(cxx):
        pytest.skip(f"{cxx} is not installed here (CI installs clang from the distribution)")
    path = tmp_path / f"fused_step-{cxx}.so"
    build.build_library(shutil.which(cxx), path)
    lib = build.open_library(path)
    stepper, optimizer = make_stepper()
    stepper.lib = lib
    eager, eager_opt = make_stepper(cls=Stepper)
    x, y = batch(16)
    for lo in range(0, 16, 4):
        stepper.step_slice(x, y, lo, lo + 4)
        eager.step_slice(x, y, lo, lo + 4)
    torch.testing.assert_close(optimizer.params, eager_opt.params, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stepper.logits, eager.logits, rtol=1e-4, atol=1e-4)
    assert lib.cnx_cpu_supported() == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_node_without_a_compiler_uses_the_library_in_the_shared_cache(lib, monkeypatch):
    assert build.library_path().is_file()  # built by the fixture
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert build.load.__wrapped__().cnx_vector_width() in (4, 8, 16)


def fake_compiler(tmp_path, exit_code: int):
    """A compiler that counts its calls (and fails, or copies a real build)."""
    script = tmp_path / "fake-c++"
    script.write_text(f"#!/bin/sh\necho called >> {tmp_path / 'calls'}\n"
                      "[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\n"
                      f"echo 'fused_step.cpp:1: error: no such thing' >&2\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_a_failed_build_is_remembered_per_compiler_not_retried_every_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNEXP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, 1)))
    for _ in range(3):
        with pytest.raises(build.BuildError, match="no such thing"):
            build.load.__wrapped__()
    compiles = [line for line in (tmp_path / "calls").read_text().splitlines()]
    assert len(compiles) == 3 + 1  # three --version calls (to name the compiler), one compile
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]


def test_the_first_build_says_so_and_an_unwritable_cache_is_a_reason_not_a_crash(tmp_path, monkeypatch, caplog):
    if build.compiler() is None:
        pytest.skip("no C++ compiler here")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CNNEXP_CACHE_DIR", str(blocker / "cache"))  # below a file: cannot be created, even by root
    with pytest.raises(build.BuildError, match="cache dir .* cannot be written .* set CNNEXP_CACHE_DIR"):
        build.load.__wrapped__()
    monkeypatch.setenv("CNNEXP_CACHE_DIR", str(tmp_path / "fresh"))
    with caplog.at_level("INFO", logger="cnnexp"):
        build.load.__wrapped__()
    assert any("Building the compiled CPU step (once per CPU, ~10 s)" in r.getMessage() for r in caplog.records)
    names = os.listdir(tmp_path / "fresh" / "kernels")
    assert [n for n in names if n.endswith(".so")] and not [n for n in names if n.endswith(".tmp")]
