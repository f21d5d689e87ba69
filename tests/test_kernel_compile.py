"""The loss kernels compiled for an sm_90 GPU on this CPU-only machine (Triton's PTX +
its bundled ptxas): what the interpreter cannot show. No GPU needed; runs in CI."""

import os

import fdcache.kernels.loss as kmod
import pytest
import torch

pytestmark = [pytest.mark.gpu_compile,
              pytest.mark.skipif(not kmod.triton_available(), reason="triton not installed")]

DS = (384, 768, 1024, 4096, 65536)  # 65536: the loop over D for wide rows
DTYPES = ((torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
          (torch.bfloat16, torch.int8), (torch.float32, torch.float32))


@pytest.fixture(scope="module")
def compiled():
    from fdcache.kernels import gpu_compile

    try:
        path = gpu_compile.ptxas_path()
    except Exception as e:  # pragma: no cover - ptxas ships in triton's Linux wheels
        pytest.skip(f"triton's bundled ptxas is not available: {e}")
    if not os.access(path, os.X_OK):  # pragma: no cover
        pytest.skip(f"triton's bundled ptxas at {path} is not executable")
    return gpu_compile.compile_all(DS, DTYPES, arch=90)


def test_every_width_and_dtype_compiles(compiled):
    forward = {(c.D, c.pred, c.target) for c in compiled if c.kernel == "forward"}
    assert len(forward) == len(DS) * len(DTYPES)
    assert {c.pred for c in compiled if c.kernel == "backward"} == {"float16", "bfloat16", "float32"}


def test_no_kernel_spills_registers(compiled):
    spilled = [c for c in compiled if c.spills]
    assert not spilled, spilled
    assert all(c.registers <= 255 for c in compiled)


def test_row_loads_are_128_bit(compiled):
    """Every load of a row is ``ld.global.v4.b32`` (or ``.v2.b64``); the only narrower
    loads are the scalars: int8's (scale, offset) and the backward's grad_output."""
    for c in compiled:
        scalars = 2 if c.target == "int8" else 1 if c.kernel == "backward" else 0
        narrow = [b for b in c.load_bits if b != 128]
        assert narrow == [32] * scalars, c
        assert len(c.load_bits) > scalars, c


def test_one_block_rows_issue_both_loads_before_reducing(compiled):
    """pred is loaded with the target, not after the row's mean/variance reductions (one
    DRAM round trip per row instead of two in sequence)."""
    for c in compiled:
        if c.kernel == "forward" and c.D <= kmod.ONE_BLOCK_MAX:
            assert c.loads_first, c
