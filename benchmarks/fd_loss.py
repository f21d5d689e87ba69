"""Fused FD loss, forward + backward, against eager and ``torch.compile`` references (GPU).

    python benchmarks/fd_loss.py                       # B=256, L=197, D=768 and 1024
    python benchmarks/fd_loss.py --B 64 --D 768 --repeats 50

For each (D, target dtype): median time of forward+backward, achieved GB/s over the bytes
that must move (pred and target read once, gradient written once), that traffic's floor
time at the device copy bandwidth measured in the same run, the peak extra memory of one
step, and each implementation's error against the float64 reference (loss: relative;
gradient: max |diff| over max |reference|). :func:`measure` is also what
``benchmarks/gpu/check.py`` runs (on CPU in its dry run: the Triton interpreter, wall-clock
times, an ``aot_eager`` compile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from fdcache.kernels import fd_loss, fd_loss_reference

from fdcache.codecs import quantize_int8

TARGETS = ("fp16", "bf16", "int8")
IMPLS = ("triton", "eager", "compile")


def median_seconds(fn, repeats: int, device: torch.device, warmup: int = 3) -> float:
    """Median time of ``fn()``: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    y = torch.empty_like(x)
    return 2 * nbytes / median_seconds(lambda: y.copy_(x), repeats, device)


def _targets(shape, device, g) -> dict:
    t = torch.randn(shape, generator=g).mul_(2).add_(torch.randn(shape[:-1] + (1,), generator=g))
    q, qp = quantize_int8(t)
    return {"fp16": (t.half().to(device), None), "bf16": (t.bfloat16().to(device), None),
            "int8": (q.to(device), qp.to(device))}


def _errors(pred, target, qparams, loss, grad) -> dict:
    p64 = pred.detach().double().requires_grad_()
    ref = fd_loss_reference(p64, target, qparams=qparams)
    ref.backward()
    gref = p64.grad
    return {"loss_rel_err": abs(loss.item() - ref.item()) / abs(ref.item()),
            "grad_max_err": ((grad.double() - gref).abs().max() / gref.abs().max()).item()}


def measure(shape, device: torch.device, repeats: int = 30, warmup: int = 3, targets=TARGETS,
            compile_backend: str = "inductor", copy_Bps: float | None = None) -> list[dict]:
    """One row per target dtype of ``shape`` = (B, L, D), bf16 ``pred``: every implementation's
    time, GB/s and error (see the module docstring)."""
    compiled = torch.compile(fd_loss_reference, backend=compile_backend, dynamic=False)
    impls = {"triton": lambda p, t, q: fd_loss(p, t, qparams=q, impl="triton"),
             "eager": lambda p, t, q: fd_loss_reference(p, t, qparams=q),
             "compile": lambda p, t, q: compiled(p, t, qparams=q)}
    g = torch.Generator().manual_seed(0)
    pred = (torch.randn(shape, generator=g) * 1.5).to(device, torch.bfloat16).requires_grad_()
    rows = []
    for name, (target, qparams) in _targets(shape, device, g).items():
        if name not in targets:
            continue
        moved = 2 * pred.numel() * pred.element_size() + target.numel() * target.element_size()
        moved += 0 if qparams is None else qparams.numel() * qparams.element_size()
        row = {"shape": list(shape), "pred": "bf16", "target": name, "bytes_moved": moved}
        if copy_Bps:
            row |= {"copy_GBps": copy_Bps / 1e9, "floor_ms": moved / copy_Bps * 1e3}
        for impl, fn in impls.items():
            def step():
                pred.grad = None
                fn(pred, target, qparams).backward()
            pred.grad = None
            loss = fn(pred, target, qparams)
            loss.backward()
            row |= {f"{impl}_{k}": v for k, v in _errors(pred, target, qparams, loss, pred.grad).items()}
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t = median_seconds(step, repeats, device, warmup)
            row[f"{impl}_ms"] = t * 1e3
            row[f"{impl}_GBps"] = moved / t / 1e9
            if device.type == "cuda":
                row[f"{impl}_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 1e6
        row["grad_MB"] = pred.numel() * pred.element_size() / 1e6
        if copy_Bps:
            row["triton_fraction_of_floor"] = row["floor_ms"] / row["triton_ms"]
        row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
        row["speedup_vs_compile"] = row["compile_ms"] / row["triton_ms"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | target | triton ms | GB/s | % of floor | eager ms | compile ms | x eager | x compile "
             "| max grad err (triton/eager/compile) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{100 * r['triton_fraction_of_floor']:.0f}%" if "triton_fraction_of_floor" in r else "-"
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['target']} | {r['triton_ms']:.3f} | "
                     f"{r['triton_GBps']:.0f} | {floor} | {r['eager_ms']:.3f} | {r['compile_ms']:.3f} | "
                     f"{r['speedup_vs_eager']:.1f} | {r['speedup_vs_compile']:.2f} | "
                     + " / ".join(f"{r[f'{i}_grad_max_err']:.1e}" for i in IMPLS) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--L", type=int, default=197)
    ap.add_argument("--D", type=int, nargs="+", default=[768, 1024])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fd_loss.py needs a CUDA device (correctness on CPU: tests/test_fd_loss.py)")
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    rows = [r for D in args.D for r in measure((args.B, args.L, D), device, args.repeats, copy_Bps=bw)]
    for r in rows:
        r["device"] = torch.cuda.get_device_name()
    print(json.dumps(rows, indent=2))
    print()
    print(table(rows))
    if args.json:
        open(args.json, "w").write(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
