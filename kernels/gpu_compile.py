"""Compile the loss kernels for a CUDA GPU on a machine without one.

Triton lowers a kernel to PTX for any ``GPUTarget`` with no device present, and its
bundled ``ptxas -v`` reports registers and spill bytes of the SASS it assembles. This is
how the project checks, in CI on CPU, what it cannot run: that no width spills and that
row loads are 128-bit (``ld.global.v4``). Used by ``tests/test_kernel_compile.py`` and
``benchmarks/kernel_compile.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import loss

__all__ = ["Compiled", "ptxas_path", "compile_forward", "compile_backward", "compile_all"]

_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int8: "*i8"}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    D: int
    pred: str
    target: str
    num_warps: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    load_bits: tuple[int, ...]  # widths of the global loads in the PTX, per instruction
    loads_first: bool  # every global load is issued before the first cross-thread reduction

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def ptxas_path() -> str:
    from triton import knobs

    return knobs.nvidia.ptxas.path


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = fn
    # Pointers and the integer arguments that are multiples of 16 get Triton's alignment
    # hint, as the launcher gives them for contiguous rows of such widths.
    aligned = [k for k, v in signature.items() if v.startswith("*") or k in constexprs.get("_aligned", ())]
    constexprs = {k: v for k, v in constexprs.items() if k != "_aligned"}
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(jit.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn=jit, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    from triton.compiler import make_backend

    options = make_backend(target).parse_options({"num_warps": num_warps})
    return triton.compile(src, target=target, options=options.__dict__).asm["ptx"]


def _ptxas(ptx: str, arch: int) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.ptx"
        f.write_text(ptx)
        r = subprocess.run([ptxas_path(), "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                            str(f), "-o", str(f.with_suffix(".o"))], capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, stores, loads


def _load_bits(ptx: str) -> tuple[int, ...]:
    bits = []
    for m in re.finditer(r"ld\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)", ptx):
        bits.append(int(m.group(1) or 1) * int(m.group(2)))
    return tuple(bits)


def _loads_first(ptx: str) -> bool:
    """True when no ``ld.global`` follows the first ``shfl.sync`` (a row reduction): the
    row's loads are all in flight at once, not one DRAM round trip after another."""
    lines = ptx.splitlines()
    loads = [i for i, line in enumerate(lines) if "ld.global" in line]
    shuffles = [i for i, line in enumerate(lines) if "shfl.sync" in line]
    return not shuffles or not loads or max(loads) < shuffles[0]


def compile_forward(D: int, pred=torch.float16, target=torch.float16, arch: int = 90,
                    one_block: bool = False) -> Compiled:
    """``one_block=True`` forces a whole row per program (the kernel's layout before wide
    rows looped over D), to show where that spills."""
    cfg = loss.launch_config(D, min(pred.itemsize, target.itemsize))
    name = "forward, one block" if one_block and not cfg["ONE_BLOCK"] else "forward"
    if one_block:
        cfg = {"BLOCK_D": max(cfg["BLOCK_D"], 1 << (D - 1).bit_length()), "ONE_BLOCK": True,
               "num_warps": cfg["num_warps"]}
    int8 = target == torch.int8
    signature = {"pred_ptr": _TYPES[pred], "tgt_ptr": _TYPES[target], "qp_ptr": "*fp32",
                 "grad_ptr": _TYPES[pred], "loss_ptr": "*fp32", "D": "i32", "pred_stride": "i32",
                 "tgt_stride": "i32", "qp_stride": "i32", "grad_stride": "i32", "beta": "fp32", "eps": "fp32"}
    aligned = ("D", "pred_stride", "tgt_stride", "grad_stride") if D % 16 == 0 else ()
    constexprs = {"BLOCK_D": cfg["BLOCK_D"], "ONE_BLOCK": cfg["ONE_BLOCK"], "INT8": int8, "BETA_ZERO": False,
                  "_aligned": aligned}
    ptx = _compile(loss._fd_loss_fwd_kernel, signature, constexprs, cfg["num_warps"], arch)
    regs, st, ld = _ptxas(ptx, arch)
    return Compiled(name, D, str(pred).removeprefix("torch."), str(target).removeprefix("torch."),
                    cfg["num_warps"], regs, st, ld, _load_bits(ptx), _loads_first(ptx))


def compile_backward(pred=torch.float16, arch: int = 90) -> Compiled:
    """The backward is flat over the gradient: its code does not depend on D (the mean's
    scalar ``grad_output``, ``PER_ROW=False``)."""
    signature = {"grad_ptr": _TYPES[pred], "go_ptr": "*fp32", "numel": "i64", "D": "i32", "factor": "fp32"}
    constexprs = {"BLOCK": loss.BWD_BLOCK, "PER_ROW": False, "_aligned": ("numel",)}
    ptx = _compile(loss._fd_loss_bwd_kernel, signature, constexprs, loss.BWD_WARPS, arch)
    regs, st, ld = _ptxas(ptx, arch)
    return Compiled("backward", 0, str(pred).removeprefix("torch."), "-", loss.BWD_WARPS, regs, st, ld,
                    _load_bits(ptx), _loads_first(ptx))


def compile_all(Ds, dtypes=((torch.float16, torch.float16),), arch: int = 90) -> list[Compiled]:
    """Forward for each (D, (pred, target) dtypes) and the backward for each pred dtype.

    Under ``TRITON_INTERPRET=1`` (the tests) ``@triton.jit`` made interpreter wrappers that
    cannot be compiled, so the work runs in a child process with the interpreter off."""
    cases = [(D, str(p).removeprefix("torch."), str(t).removeprefix("torch.")) for D in Ds for p, t in dtypes]
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = dict(os.environ, TRITON_INTERPRET="0")
        r = subprocess.run([sys.executable, "-m", "fdcache.kernels.gpu_compile", json.dumps([cases, arch])],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(f"compiling for sm_{arch} failed:\n{r.stderr[-3000:]}")
        return [Compiled(**{**d, "load_bits": tuple(d["load_bits"])}) for d in json.loads(r.stdout)]
    out = []
    for D, p, t in cases:
        out.append(compile_forward(D, getattr(torch, p), getattr(torch, t), arch))
    for p in sorted({p for _, p, _ in cases}):
        out.append(compile_backward(getattr(torch, p), arch))
    return out


if __name__ == "__main__":
    cases, arch = json.loads(sys.argv[1])
    dtypes = sorted({(p, t) for _, p, t in cases})
    Ds = sorted({D for D, _, _ in cases})
    res = compile_all(Ds, [(getattr(torch, p), getattr(torch, t)) for p, t in dtypes], arch)
    print(json.dumps([asdict(c) for c in res]))
