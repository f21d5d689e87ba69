"""GPU placement and overlap, checked on CPU: which device DALI and the Triton launch use,
that DALI outputs are not copied again, and that loader workers overlap the step."""

import contextlib
import dataclasses
import importlib
import os
import time
from pathlib import Path

import fdcache.kernels.loss as kmod
import numpy as np
import pytest
import torch

from fdcache.distill import loader, pixels
from fdcache.distill.sources import TrainSource
from fdcache.distill.train import DistillTask, TrainConfig
from fdcache.errors import FdcacheError
from fdcache.models import TINY_TEACHER


@pytest.fixture
def gpu_host(monkeypatch):
    """CUDA reported present (current device 0), as on a GPU host run with --device cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


class _Built(Exception):
    pass


def _online(out, image_root, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), online=True, teacher=TINY_TEACHER, random_init=True, data=str(image_root),
                       student="fd-tiny", steps=2, batch_size=4, warmup_steps=0, loss_impl="torch",
                       progress=False, num_threads=1, **kw)


def test_dali_device_and_id_follow_the_torch_device(gpu_host):
    assert pixels.dali_device("cpu") == {"device": "cpu", "device_id": None}
    assert pixels.dali_device(torch.device("cuda", 1)) == {"device": "gpu", "device_id": 1}
    assert pixels.dali_device("cuda") == {"device": "gpu", "device_id": 0}


def test_extract_with_device_cpu_on_a_gpu_host_decodes_on_the_cpu(gpu_host, monkeypatch, image_root, tmp_path):
    ex = importlib.import_module("fdcache.distill.extract")  # the module (fdcache.extract is the API function)

    seen = {}

    def stream(work, **kw):
        seen.update(kw)
        raise _Built

    monkeypatch.setattr(ex, "PixelStream", stream)
    with pytest.raises(_Built):
        ex.extract(ex.ExtractConfig(data=str(image_root), out=str(tmp_path / "s.zarr"), teacher=TINY_TEACHER,
                                    random_init=True, device="cpu", progress=False, num_threads=1))
    assert (seen["device"], seen["device_id"]) == ("cpu", None)


def test_training_with_device_cpu_on_a_gpu_host_loads_on_the_cpu(gpu_host, monkeypatch, image_root, tmp_path):
    tr = importlib.import_module("fdcache.distill.train")  # the module (fdcache.train is the API function)

    seen = {}
    monkeypatch.setattr(tr, "batches", lambda source, **kw: seen.update(kw))
    DistillTask(_online(tmp_path / "t", image_root, device="cpu")).stream()
    assert (seen["device"], seen["device_id"]) == ("cpu", None)
    assert seen["parallel"] is False  # auto: no workers on CPU


def test_triton_launches_run_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device (triton/runtime/jit.py), so both of the
    loss's launches must sit inside a guard for the tensors' device."""
    current = [None]
    launched = []

    @contextlib.contextmanager
    def guard(device):
        current[0] = device
        yield
        current[0] = None

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **k):
                launched.append(current[0])
                return self.kernel[grid](*a, **k)
            return launch

    monkeypatch.setattr(kmod, "_device_guard", guard)
    monkeypatch.setattr(kmod, "_fd_loss_fwd_kernel", Recorder(kmod._fd_loss_fwd_kernel))
    monkeypatch.setattr(kmod, "_fd_loss_bwd_kernel", Recorder(kmod._fd_loss_bwd_kernel))
    pred = torch.randn(2, 3, 16, requires_grad=True)
    kmod.fd_loss(pred, torch.randn(2, 3, 16), impl="triton").backward()
    assert launched == [pred.device, pred.device]


def test_device_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    with kmod._device_guard(torch.device("cuda", 1)):
        pass
    with kmod._device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_dali_outputs_are_used_without_a_copy_and_stay_valid(monkeypatch, image_root):
    """exec_dynamic allocates each run's outputs anew: tensors kept from earlier batches
    keep their values after later runs and after the pipeline is gone."""
    files = sorted(str(p) for p in Path(image_root).rglob("*") if p.is_file())[:12]
    views = np.array([[0, 0, 8, 8, k % 2] for k in range(len(files))], np.int32)
    batches = [np.arange(i, i + 4) for i in range(0, 12, 4)]
    work = pixels.ViewBatches(files, batches, [views[b] for b in batches])
    stream = pixels.PixelStream(work, resolution=16, mean=(0.5,) * 3, std=(0.25,) * 3, num_threads=1)

    def no_clone(*a, **k):
        raise AssertionError("DALI output copied")

    kept, copies = [], []
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "clone", no_clone)
        for _, x in stream:
            kept.append(x)
            copies.append(x.numpy().copy())
    del stream
    for x, c in zip(kept, copies):
        np.testing.assert_array_equal(x.numpy(), c)
    assert not np.array_equal(copies[0], copies[1])


def test_loader_workers_default_on_with_cuda_only():
    assert loader.resolve_workers("auto", torch.device("cuda", 0)) >= 1
    assert loader.resolve_workers("auto", torch.device("cpu")) == 0
    assert loader.resolve_workers("3", torch.device("cpu")) == 3
    with pytest.raises(FdcacheError, match="loader-workers"):
        loader.resolve_workers("many", torch.device("cpu"))


@dataclasses.dataclass
class StampedSource(TrainSource):
    """A TrainSource that leaves a file per batch it reads: the reading process's pid, and
    whether the main process was inside ``next(stream)`` then (the ``inside`` file)."""

    stamps: str = ""

    def __call__(self, info):
        out = super().__call__(info)
        inside = Path(self.stamps, "inside").exists()
        Path(self.stamps, f"{info.epoch_idx}-{info.iteration}").write_text(f"{os.getpid()} {int(inside)}")
        return out


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_reads_overlap_the_step_only_with_workers(image_root, tmp_path, workers):
    """With workers, batches are read by other processes, ahead of the batch the step asks
    for, so reads run while the step does; with 0, every read happens in this process
    inside ``next(stream)``, between steps. (Pids and a flag, not the clock.)"""
    t = DistillTask(_online(tmp_path / "t", image_root, loader_workers=workers))
    src = t.source
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    inside = stamps / "inside"
    source = StampedSource(**{f.name: getattr(src, f.name) for f in dataclasses.fields(TrainSource)},
                           stamps=str(stamps))
    inside.touch()
    stream = loader.batches(source, resolution=t.sspec.resolution, mean=t.sspec.mean, std=t.sspec.std,
                            num_threads=1, parallel=workers > 0, py_workers=max(1, workers), device="cpu")
    for _ in range(3):
        inside.touch()
        next(stream)
        inside.unlink()  # the step
    ahead = stamps / "0-3"  # a batch no step has asked for yet
    for _ in range(6000 if workers else 0):  # up to 60 s: a condition, not a duration
        if ahead.exists():
            break
        time.sleep(0.01)
    read = [p.read_text().split() for p in stamps.glob("0-*")]
    assert len(read) >= 3
    if workers:
        assert ahead.exists() and all(int(pid) != os.getpid() for pid, _ in read)
    else:
        assert all(int(pid) == os.getpid() and flag == "1" for pid, flag in read)


class _FakeStream:
    """Stands in for torch.cuda.Stream/Event and logs what the copy does, in order."""

    def __init__(self, log):
        self.log, self.device = log, torch.device("cuda", 0)

    def wait_stream(self, other):
        self.log.append(("wait_stream", other))

    def record_event(self):
        self.log.append(("record_event",))
        log = self.log

        class Event:
            def synchronize(self):
                log.append(("synchronize",))
        return Event()


def test_extraction_copies_to_pinned_memory_on_a_side_stream(monkeypatch):
    """The CUDA branch of the shard copy, driven with fake streams on CPU: the side stream
    waits for the teacher's, the copies are non-blocking into pinned buffers under it, the
    source tensors are kept from reuse until it ends, and the writer waits on its event."""
    ex = importlib.import_module("fdcache.distill.extract")  # the module (fdcache.extract is the API function)

    log, current = [], ["teacher"]
    side = _FakeStream(log)

    @contextlib.contextmanager
    def use(stream):
        current[0] = stream
        yield
        current[0] = "teacher"

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "teacher")
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(ex, "_pinned_like", lambda t: log.append(("pinned", current[0] is side)) or torch.empty_like(t))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record_stream", s is side)))
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, src, non_blocking=False: (
        log.append(("copy", current[0] is side, non_blocking)), real_copy(t, src))[1])
    arrays = {"targets": torch.randn(4, 3, 8).half(), "qparams": torch.randn(4, 3, 2)}
    copy = ex.HostCopy(arrays, side)
    assert log[0] == ("wait_stream", "teacher")
    assert log[1:5] == [("pinned", True), ("copy", True, True)] * 2
    assert log[5:] == [("record_stream", True)] * 2 + [("record_event",)]

    class Store:
        def write_shard(self, seed, k, host, skipped):
            log.append(("write",))
            np.testing.assert_array_equal(host["targets"][1:], arrays["targets"][1:].numpy())
            assert not host["targets"][0].any()

    ex._write(Store(), 0, 0, copy, np.array([True, False, False, False]))
    assert log[-2:] == [("synchronize",), ("write",)]


def test_extraction_copy_on_cpu_runs_the_same_calls():
    ex = importlib.import_module("fdcache.distill.extract")  # the module (fdcache.extract is the API function)

    t = torch.randn(2, 3)
    assert ex.HostCopy({"x": t}).wait()["x"] is t
