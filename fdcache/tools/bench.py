"""``fdcache bench``: offline vs online distillation vs the synthetic ceiling, one process.

Modes, measured interleaved (each repeat runs every mode in turn, same student and batch):

- ``ceiling``: the student's fwd+bwd+step on synthetic images and targets already on the
  device (no loader, no store): the limit for this student;
- ``offline``: the trainer's real path (DALI loader + store reads + fused loss);
- ``online``: the trainer's real path with the teacher forward in the loop;
- ``teacher``: the teacher's forward alone on in-device images;
- ``extract``: the extraction path (decode + teacher + codec + writes) into a fresh store.

Ratios: offline/ceiling, offline/online and the FLOP-ratio limit of offline/online,
``(student fwd+bwd + teacher fwd) / (student fwd+bwd)`` from ``torch.utils.flop_counter``.
Break-even: extracting a cache pays for itself after ``(1/extract) / (1/online - 1/offline)``
student runs, when each run trains one epoch per cached seed.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..codecs import CodecSpec
from ..options import require
from ..distill.extract import ExtractConfig, extract
from ..store.manifest import index
from ..store.store import Store
from ..distill.teachers import load_teacher
from ..distill.train import DistillTask, TrainConfig
from ..samples import make_image_folder

__all__ = ["MODES", "BenchConfig", "flops", "run_bench", "diagnose", "plot"]

MODES = ("ceiling", "offline", "online", "teacher", "extract")


@dataclass
class BenchConfig:
    student: str
    teacher: str
    pretrained: str | None = None
    random_init: bool = False
    resolution: int | None = None
    batch_size: int = 32
    steps: int = 10
    warmup: int = 2
    repeats: int = 3
    cache: str | None = None
    data: str | None = None
    images: int | None = None  # synthetic images when no --data (default: enough for the run)
    student_overrides: dict = field(default_factory=dict)
    codec: CodecSpec | str = "fp16"  # a name or a spec
    loss_impl: str = "auto"
    amp: str = "auto"
    threads: int = 4
    loader_workers: int | str = "auto"
    modes: tuple[str, ...] = MODES
    workdir: str | None = None

    def __post_init__(self):
        require(self)
        self.codec = CodecSpec.of(self.codec)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def flops(trainer: DistillTask, teacher) -> dict[str, float]:
    """Per-image FLOPs of the student's fwd+bwd (with the FD head) and the teacher's fwd."""
    from torch.utils.flop_counter import FlopCounterMode

    dev, res = trainer.device, trainer.sspec.resolution
    x = torch.randn(2, 3, res, res, device=dev)
    with FlopCounterMode(display=False) as fc:
        trainer.model(x).float().square().mean().backward()
    student = fc.get_total_flops() / 2
    trainer.model.zero_grad(set_to_none=True)
    xt = torch.randn(2, 3, teacher.spec.resolution, teacher.spec.resolution, device=dev)
    with FlopCounterMode(display=False) as fc:
        teacher(xt)
    return {"student_fwd_bwd": student, "teacher_fwd": fc.get_total_flops() / 2}


class _Ceiling:
    """The trainer's own step on fixed in-device data: same model, optimizer, loss, AMP."""

    def __init__(self, trainer: DistillTask, batch):
        # The first offline batch, kept on the device: the codec's stored arrays, so the step is
        # the offline step without the loader (int8 targets reach the fused loss as int8; a
        # teacher grid of another size is resampled as in training). DALI allocates each run's
        # outputs anew, so later batches leave these untouched.
        def on(t):
            return None if t is None else t.to(trainer.device)

        self.trainer = trainer
        self.batch = replace(batch, images=on(batch.images), wait_s=0.0,
                             stored=[{k: on(v) for k, v in s.items()} for s in batch.stored])

    def step(self):
        self.trainer.engine.forward_backward(self.batch)
        self.trainer.engine.optimizer_step()


def _train_step(trainer: DistillTask, stream) -> float:
    t0 = time.perf_counter()
    batch = next(stream)
    wait = time.perf_counter() - t0
    trainer.engine.forward_backward(batch)
    trainer.engine.optimizer_step()
    return wait


def run_bench(cfg: BenchConfig, log=print, teacher=None) -> dict:
    """Every mode of ``cfg``, interleaved. ``teacher``: the one ``cfg`` names, already built
    (a caller that sized the batch with it need not build a ViT-L twice)."""
    if cfg.cache:  # the inputs first: a wrong one stops the bench before any model is loaded
        Store.open(cfg.cache)
    if cfg.data:
        index(cfg.data)
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="fdcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if teacher is None:
            teacher = load_teacher(cfg.teacher, cfg.pretrained, random_init=cfg.random_init,
                                   resolution=cfg.resolution, device=device)
        else:
            teacher = teacher.to(device)
        n_img = cfg.images or cfg.batch_size * (cfg.steps + cfg.warmup + 1)
        data = cfg.data
        if data is None:
            per_class = -(-n_img // 4)
            data = str(make_image_folder(work / "images", classes=4, per_class=per_class, min_size=256,
                                         max_size=500, variety=False))
        results: dict[str, list[float]] = {m: [] for m in cfg.modes}
        waits: dict[str, list[float]] = {"offline": [], "online": []}
        peaks: dict[str, float | None] = {}

        def extract_once(k: int) -> tuple[float, Path]:
            out = work / f"extract-{k}.zarr"
            r = extract(ExtractConfig(data=data, out=str(out), teacher=cfg.teacher, pretrained=cfg.pretrained,
                                      random_init=cfg.random_init, resolution=cfg.resolution,
                                      codec=cfg.codec, batch_size=cfg.batch_size,
                                      shard_size=max(cfg.batch_size, 64), progress=False,
                                      num_threads=cfg.threads), teacher=teacher)
            return r.samples / r.seconds, out

        cache = cfg.cache
        if cache is None:
            log("building a store for the offline mode ...")
            rate, out = extract_once(0)
            if "extract" in results:
                results["extract"].append(rate)
            cache = str(out)
        common = dict(student=cfg.student, student_overrides=cfg.student_overrides, resolution=teacher.spec.resolution,
                      batch_size=cfg.batch_size, steps=10**9, warmup_steps=0, loss_impl=cfg.loss_impl,
                      amp=cfg.amp, progress=False, num_threads=cfg.threads, loader_workers=cfg.loader_workers,
                      check_data=False, resize_targets=True)
        offline = DistillTask(TrainConfig(out=str(work / "off"), cache=cache, data=data, **common))
        online = DistillTask(TrainConfig(out=str(work / "on"), online=True, teacher=cfg.teacher,
                                     pretrained=cfg.pretrained, random_init=cfg.random_init, data=data, **common),
                         teacher=teacher)
        streams = {"offline": offline.stream(), "online": online.stream()}
        ceiling = _Ceiling(offline, next(streams["offline"]))
        timg = torch.randn(cfg.batch_size, 3, teacher.spec.resolution, teacher.spec.resolution, device=device)
        B = cfg.batch_size

        def measure(mode: str) -> float:
            if mode == "extract":
                return extract_once(len(results["extract"]) + 1)[0]
            if mode == "ceiling":
                fn = ceiling.step
            elif mode == "teacher":
                def fn():
                    teacher(timg)
            else:
                tr, st = (offline, streams["offline"]) if mode == "offline" else (online, streams["online"])
                wsum = [0.0]

                def fn():
                    wsum[0] += _train_step(tr, st)
            for _ in range(cfg.warmup):
                fn()
            if mode in waits:
                wsum[0] = 0.0
            _reset_peak(device)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                fn()
            _sync(device)
            dt = time.perf_counter() - t0
            peaks[mode] = max(peaks.get(mode) or 0, _peak_mb(device) or 0) if device.type == "cuda" else None
            if mode in waits:
                waits[mode].append(wsum[0] / dt)
            return cfg.steps * B / dt

        for r in range(cfg.repeats):
            for mode in cfg.modes:
                if mode == "extract" and cfg.cache is None and r == 0:
                    continue  # the store build above was repeat 0
                results[mode].append(measure(mode))
                log(f"repeat {r + 1}/{cfg.repeats} {mode}: {results[mode][-1]:,.1f} img/s")
        f = flops(offline, teacher)
        out = {}
        for mode, rates in results.items():
            if not rates:
                continue
            out[mode] = {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                         "repeats": len(rates), "peak_memory_MiB": peaks.get(mode),
                         "data_wait_fraction": statistics.median(waits[mode]) if waits.get(mode) else None}
        ips = {m: v["images_per_s"] for m, v in out.items()}
        flop_limit = (f["student_fwd_bwd"] + f["teacher_fwd"]) / f["student_fwd_bwd"]
        ratios = {"flop_ratio_limit": flop_limit}
        if "offline" in ips and "ceiling" in ips:
            ratios["offline_over_ceiling"] = ips["offline"] / ips["ceiling"]
        if "offline" in ips and "online" in ips:
            ratios["offline_over_online"] = ips["offline"] / ips["online"]
            ratios["offline_over_online_vs_limit"] = ratios["offline_over_online"] / flop_limit
        if {"extract", "online", "offline"} <= ips.keys():
            gain = 1 / ips["online"] - 1 / ips["offline"]
            ratios["break_even_student_runs"] = (1 / ips["extract"]) / gain if gain > 0 else None
        if "extract" in ips and "teacher" in ips:
            ratios["extract_over_teacher"] = ips["extract"] / ips["teacher"]
        import nvidia.dali
        import triton
        return {**out, "ratios": ratios, "diagnosis": diagnose(out, ratios), "flops_per_image": f, "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({platform.machine()}, {torch.get_num_threads()} threads) - CPU figures",
            "torch": torch.__version__, "triton": triton.__version__, "dali": nvidia.dali.__version__,
            "student": cfg.student, "student_overrides": cfg.student_overrides, "teacher": teacher.spec.label,
            "resolution": teacher.spec.resolution, "student_tokens": offline.sspec.tokens,
            "teacher_tokens": teacher.spec.tokens, "teacher_dim": teacher.spec.dim, "batch_size": B,
            "steps": cfg.steps, "warmup": cfg.warmup, "amp": str(offline.engine.amp_dtype), "codec": cfg.codec.name,
            "loss_impl": cfg.loss_impl}}
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def diagnose(out: dict, ratios: dict, target: float = 0.9) -> list[str]:
    """Which stage holds a missed target back, in words (from the measured figures)."""
    notes = []
    off = out.get("offline")
    if off and ratios.get("offline_over_ceiling", 1) < target:
        wait = off["data_wait_fraction"] or 0
        if wait > 0.1:
            notes.append(f"offline is {ratios['offline_over_ceiling']:.2f} of the ceiling and waits on the loader "
                         f"{100 * wait:.0f}% of the time: decode and store reads are not hidden (more --threads / "
                         "--loader-workers, GPU decoding, or smaller source images)")
        else:
            notes.append(f"offline is {ratios['offline_over_ceiling']:.2f} of the ceiling with little loader wait: "
                         "the step itself costs more (host-to-device copies, target decode, loss)")
    if ratios.get("offline_over_online_vs_limit", 1) < target and off:
        notes.append(f"offline/online reaches {ratios['offline_over_online_vs_limit']:.2f} of the FLOP-ratio limit: "
                     "see the offline note" if notes else "offline/online is below the FLOP-ratio limit")
    if ratios.get("extract_over_teacher", 1) < target:
        notes.append(f"extract runs at {ratios['extract_over_teacher']:.2f} of the teacher's forward: decode, "
                     "device-to-host copies, compression or writes are not hidden behind it")
    return notes


def plot(result: dict, path: str) -> None:
    """The figures as ratios (:func:`fdcache.tools.plots.bench_figure`)."""
    from .plots import bench_figure

    bench_figure(result, path)
