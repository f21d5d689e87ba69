"""Fused FD loss, forward + backward, against eager and ``torch.compile`` references (GPU).

    python benchmarks/fd_loss.py                       # B=256, L=197, D=768 and 1024
    python benchmarks/fd_loss.py --B 64 --D 768 --repeats 50

For each (D, target codec): median time of forward+backward, achieved GB/s over the bytes
that must move (pred and target read once, gradient written once), that traffic's floor
time at the measured device copy bandwidth, and the peak extra memory of one step.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from fdcache.kernels import fd_loss, fd_loss_reference

from fdcache.codecs import quantize_int8


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    x = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), 20)
    return 2 * nbytes / t  # read + write


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
    bw = copy_bandwidth()
    compiled = torch.compile(fd_loss_reference)
    rows = []
    for D in args.D:
        shape = (args.B, args.L, D)
        pred = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t16 = torch.randn(shape, device="cuda", dtype=torch.float16)
        q, qp = quantize_int8(t16)
        for codec, target, qparams in (("fp16", t16, None), ("int8", q, qp)):
            moved = pred.numel() * 2 + target.numel() * target.element_size() + pred.numel() * 2
            moved += 0 if qparams is None else qparams.numel() * 4
            row = {"device": torch.cuda.get_device_name(), "shape": list(shape), "pred": "bf16",
                   "target": codec, "bytes_moved": moved, "copy_GBps": bw / 1e9,
                   "floor_ms": moved / bw * 1e3}
            for impl, fn in (("triton", lambda: fd_loss(pred, target, qparams=qparams, impl="triton")),
                             ("eager", lambda: fd_loss_reference(pred, target, qparams=qparams)),
                             ("compile", lambda: compiled(pred, target, qparams=qparams))):
                def step():
                    pred.grad = None
                    fn().backward()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t = _time(step, args.repeats)
                row[f"{impl}_ms"] = t * 1e3
                row[f"{impl}_GBps"] = moved / t / 1e9
                row[f"{impl}_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 1e6
            row["grad_MB"] = pred.numel() * 2 / 1e6
            row["fraction_of_floor"] = row["floor_ms"] / row["triton_ms"]
            row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
            row["speedup_vs_compile"] = row["compile_ms"] / row["triton_ms"]
            rows.append(row)
    print(json.dumps(rows, indent=2))
    print("\n| D | target | triton ms | GB/s | % of floor | eager ms | compile ms | x eager | x compile | peak extra MB (grad MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape'][2]} | {r['target']} | {r['triton_ms']:.3f} | {r['triton_GBps']:.0f} | "
              f"{100 * r['fraction_of_floor']:.0f}% | {r['eager_ms']:.3f} | {r['compile_ms']:.3f} | "
              f"{r['speedup_vs_eager']:.1f} | {r['speedup_vs_compile']:.2f} | "
              f"{r['triton_peak_extra_MB']:.0f} ({r['grad_MB']:.0f}) |")
    if args.json:
        open(args.json, "w").write(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
