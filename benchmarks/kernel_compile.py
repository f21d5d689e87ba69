"""Registers and spills of the loss kernels compiled for a CUDA GPU, on any machine.

    python benchmarks/kernel_compile.py                 # sm_90, D in 384 768 1024 4096 16384 65536
    python benchmarks/kernel_compile.py --arch 80 --D 768

Triton lowers each kernel to PTX for the target (no GPU needed) and its bundled
``ptxas -v`` assembles it; the table lists registers per thread, spill bytes and the
widths of the global loads. ``one block`` rows force a whole row per program (the layout
before rows wider than ``ONE_BLOCK_MAX`` looped over D) to show why the loop exists.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from fdcache.kernels import gpu_compile
from fdcache.kernels.loss import ONE_BLOCK_MAX

DTYPES = {"fp16/fp16": (torch.float16, torch.float16), "bf16/int8": (torch.bfloat16, torch.int8),
          "fp32/fp32": (torch.float32, torch.float32)}


def _loads(bits) -> str:
    return ", ".join(f"{n}x{b}-bit" for b, n in sorted(Counter(bits).items(), reverse=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--D", type=int, nargs="+", default=[384, 768, 1024, 4096, 16384, 65536])
    args = ap.parse_args()
    rows = []
    for D in args.D:
        for name, (p, t) in DTYPES.items():
            rows.append((name, gpu_compile.compile_forward(D, p, t, args.arch)))
            if D > ONE_BLOCK_MAX:
                rows.append((name, gpu_compile.compile_forward(D, p, t, args.arch, one_block=True)))
    for name, (p, _) in DTYPES.items():
        rows.append((name.split("/")[0], gpu_compile.compile_backward(p, args.arch)))
    print("| kernel | D | pred/target | warps | registers | spill bytes (st/ld) | global loads | loads before 1st reduction |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c in rows:
        print(f"| {c.kernel} | {c.D or 'any'} | {name} | {c.num_warps} | {c.registers} | "
              f"{c.spill_stores}/{c.spill_loads} | {_loads(c.load_bits)} | {'yes' if c.loads_first else 'no'} |")


if __name__ == "__main__":
    main()
