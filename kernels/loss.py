"""FD's loss, fused: ``smooth_l1(pred, layer_norm(target, no affine, eps), beta)``.

One Triton program per token row reads that row of ``pred`` and ``target`` once (int8
targets are dequantized in the same pass from their per-token scale/offset; rows wider than
``ONE_BLOCK_MAX`` are walked in blocks), whitens the target in fp32, and writes the row's
loss partial and the *unscaled* ``d smooth_l1 / d pred`` (``|g| <= 1``, exact enough in
fp16/bf16). The backward scales it in place by ``grad_output / numel`` in fp32 (a small
kernel, no host sync), so training reads each input once and keeps one gradient-sized
buffer, and fp16 AMP keeps its gradient: ``1 / numel`` alone is below fp16's smallest
subnormal at realistic sizes, ``grad_output`` (GradScaler's 65536) above its range. Row
partials are summed by ``torch.sum`` afterwards: deterministic, no float atomics.

:func:`fd_loss_reference` is the same maths in plain PyTorch (used by tests, on CPU, and
by ``--loss-impl torch``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from fdcache.codecs.int8 import dequantize_int8

__all__ = ["MAX_D", "triton_available", "fd_loss_reference", "ONE_BLOCK_MAX", "LOOP_BLOCK", "BWD_BLOCK",
           "BWD_WARPS", "launch_config", "scale_grad_", "fd_loss"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None

MAX_D = 65536
_empty = torch.empty  # the launcher's allocator (tests poison it to check every write)
_REDUCTIONS = ("mean", "sum", "none")


def triton_available() -> bool:
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# Reference


def fd_loss_reference(pred: torch.Tensor, target: torch.Tensor, *, qparams: torch.Tensor | None = None,
                      beta: float = 2.0, eps: float = 1e-5, reduction: str = "mean") -> torch.Tensor:
    """Plain PyTorch. Computes in fp32 (fp64 if ``pred`` is fp64); ``reduction="none"``
    returns per-token losses (mean over the last dim), shape ``pred.shape[:-1]``."""
    _check(pred, target, qparams, reduction)
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    if target.dtype == torch.int8:
        t = dequantize_int8(target, qparams, dtype)
    else:
        t = target.to(dtype)
    t = F.layer_norm(t, t.shape[-1:], eps=eps)
    loss = F.smooth_l1_loss(pred.to(dtype), t, beta=beta, reduction="none")
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.mean(dim=-1)


def _check(pred, target, qparams, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape; "
                         "resize the target token grid first (no broadcasting here)")
    if pred.ndim < 1 or pred.shape[-1] == 0:
        raise ValueError(f"pred must have a non-empty last dim, got {tuple(pred.shape)}")
    if target.dtype == torch.int8:
        if qparams is None or tuple(qparams.shape) != tuple(target.shape[:-1]) + (2,):
            raise ValueError(f"int8 targets need qparams of shape {tuple(target.shape[:-1]) + (2,)} "
                             f"(scale, offset), got {None if qparams is None else tuple(qparams.shape)}")
    elif not target.is_floating_point():
        raise ValueError(f"target dtype {target.dtype} unsupported: use a float type or int8 with qparams")
    if target.device != pred.device:
        raise ValueError(f"pred on {pred.device}, target on {target.device}")


# --------------------------------------------------------------------------------------
# Triton

if triton is not None:

    @triton.jit
    def _target_chunk(tgt_row, cols, mask, scale, offset, INT8: tl.constexpr):
        t = tl.load(tgt_row + cols, mask=mask, other=0.0).to(tl.float32)
        if INT8:
            t = tl.where(mask, t * scale + offset, 0.0)
        return t

    @triton.jit
    def _smooth_l1(p, tn, mask, beta, BETA_ZERO: tl.constexpr):
        """(masked loss, unscaled gradient) of ``smooth_l1(p, tn)``; ``|gradient| <= 1``."""
        diff = p - tn
        ad = tl.abs(diff)
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        if BETA_ZERO:
            loss = ad
            g = sign
        else:
            small = ad < beta
            loss = tl.where(small, 0.5 * diff * diff / beta, ad - 0.5 * beta)
            g = tl.where(small, diff / beta, sign)
        return tl.where(mask, loss, 0.0), g

    @triton.jit
    def _fd_loss_fwd_kernel(pred_ptr, tgt_ptr, qp_ptr, grad_ptr, loss_ptr,
                            D, pred_stride, tgt_stride, qp_stride, grad_stride, beta, eps,
                            BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr, INT8: tl.constexpr,
                            BETA_ZERO: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pred_row = pred_ptr + row * pred_stride
        tgt_row = tgt_ptr + row * tgt_stride
        grad_row = grad_ptr + row * grad_stride
        scale = 1.0
        offset = 0.0
        if INT8:
            scale = tl.load(qp_ptr + row * qp_stride).to(tl.float32)
            offset = tl.load(qp_ptr + row * qp_stride + 1).to(tl.float32)
        cols = tl.arange(0, BLOCK_D)
        if ONE_BLOCK:
            mask = cols < D
            # pred is loaded first so that both rows are in flight before the reductions.
            p = tl.load(pred_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = _target_chunk(tgt_row, cols, mask, scale, offset, INT8)
            mean = tl.sum(t, axis=0) / D
            tc = tl.where(mask, t - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(tc * tc, axis=0) / D + eps)
            loss, g = _smooth_l1(p, tc * rstd, mask, beta, BETA_ZERO)
            tl.store(loss_ptr + row, tl.sum(loss, axis=0))
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # Wide rows: loop over D in blocks (a whole row in registers would spill);
            # two-pass mean/variance as in the one-block path, the row re-read from cache.
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for off in range(0, D, BLOCK_D):
                mask = off + cols < D
                acc += _target_chunk(tgt_row, off + cols, mask, scale, offset, INT8)
            mean = tl.sum(acc, axis=0) / D
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for off in range(0, D, BLOCK_D):
                mask = off + cols < D
                tc = tl.where(mask, _target_chunk(tgt_row, off + cols, mask, scale, offset, INT8) - mean, 0.0)
                acc += tc * tc
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for off in range(0, D, BLOCK_D):
                mask = off + cols < D
                p = tl.load(pred_row + off + cols, mask=mask, other=0.0).to(tl.float32)
                t = _target_chunk(tgt_row, off + cols, mask, scale, offset, INT8)
                loss, g = _smooth_l1(p, (t - mean) * rstd, mask, beta, BETA_ZERO)
                acc += loss
                tl.store(grad_row + off + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
            tl.store(loss_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _fd_loss_bwd_kernel(grad_ptr, go_ptr, numel, D, factor, BLOCK: tl.constexpr, PER_ROW: tl.constexpr):
        """Flat, contiguous ``grad``: ``grad[i] *= grad_output[i // D if PER_ROW else 0] *
        factor``, in fp32."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        if PER_ROW:
            s = tl.load(go_ptr + offs // D, mask=mask, other=0.0).to(tl.float32) * factor
        else:
            s = tl.load(go_ptr).to(tl.float32) * factor
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, (g * s).to(grad_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """2-D ``[rows, D]`` view with unit column stride (copies only if no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


ONE_BLOCK_MAX = 8192  # wider rows loop over D (a whole row per program would spill registers)
LOOP_BLOCK = 4096
BWD_BLOCK = 4096
BWD_WARPS = 8


def launch_config(D: int, min_itemsize: int = 2) -> dict:
    """Block size, one-block-or-loop and warps for rows of width ``D``.

    Warps are chosen so each thread holds 16 bytes of the narrowest input's row (8 fp16,
    16 int8 elements): one 128-bit load, which ``tests/test_kernel_compile.py`` checks in
    the PTX compiled for sm_90. ``min_itemsize``: the smaller element size of pred/target."""
    block = triton.next_power_of_2(D)
    one_block = block <= ONE_BLOCK_MAX
    block = block if one_block else LOOP_BLOCK
    per_thread = 16 // min_itemsize
    return {"BLOCK_D": block, "ONE_BLOCK": one_block, "num_warps": max(1, min(16, block // (32 * per_thread)))}


def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device and stream (``triton/runtime/jit.py``),
    not on the tensors' device: make the tensors' device current for the launch."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grad_factor(reduction: str, n_rows: int, D: int) -> float:
    return {"mean": 1.0 / max(n_rows * D, 1), "sum": 1.0, "none": 1.0 / D}[reduction]


def _fd_loss_forward_triton(pred, target, qparams, beta, eps, reduction):
    """(loss, unscaled gradient ``[rows, D]`` in pred's dtype, ``|g| <= 1``). The 1/numel of
    the mean is applied in the backward, in fp32: in fp16 it is below the smallest
    subnormal at realistic sizes (128 x 197 x 768)."""
    D = pred.shape[-1]
    if D > MAX_D:
        raise ValueError(f"fd_loss: D={D} exceeds the kernel's maximum {MAX_D}")
    p2, t2 = _rows(pred), _rows(target)
    int8 = target.dtype == torch.int8
    q2 = _rows(qparams.float()) if int8 else t2  # dummy pointer when unused
    n_rows = p2.shape[0]
    grad = _empty((n_rows, D), dtype=pred.dtype, device=pred.device)
    row_loss = _empty(n_rows, dtype=torch.float32, device=pred.device)
    if n_rows:
        with _device_guard(pred.device):
            _fd_loss_fwd_kernel[(n_rows,)](
                p2, t2, q2, grad, row_loss, D, p2.stride(0), t2.stride(0), q2.stride(0), grad.stride(0),
                float(beta), float(eps), INT8=int8, BETA_ZERO=beta == 0,
                **launch_config(D, min(pred.element_size(), target.element_size())))
    if reduction == "mean":
        loss = row_loss.sum() / (n_rows * D)
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = (row_loss / D).view(pred.shape[:-1])
    return loss, grad


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, factor: float) -> torch.Tensor:
    """``grad[r] *= grad_output[r or 0] * factor`` in place, computed in fp32.

    ``grad`` is ``[rows, D]``; ``grad_output`` a scalar or one value per row. No host sync
    (no test for ``grad_output == 1``); fp16's range is only touched by the final product,
    as in autograd (a GradScaler-sized ``grad_output`` keeps it normal)."""
    n_rows, D = grad.shape
    assert grad.is_contiguous()
    per_row = grad_output.numel() > 1
    go = grad_output.reshape(-1).contiguous()
    if grad.numel():
        with _device_guard(grad.device):
            _fd_loss_bwd_kernel[(triton.cdiv(grad.numel(), BWD_BLOCK),)](
                grad, go, grad.numel(), D, float(factor), BLOCK=BWD_BLOCK, PER_ROW=per_row,
                num_warps=BWD_WARPS)
    return grad


class _FDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, qparams, beta, eps, reduction):
        loss, grad = _fd_loss_forward_triton(pred, target, qparams, beta, eps, reduction)
        ctx.save_for_backward(grad)
        ctx.factor = _grad_factor(reduction, grad.shape[0], grad.shape[1])
        ctx.shape = pred.shape
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("fd_loss (triton) scales its saved gradient in place: backward "
                               "can run once per forward (no retain_graph double backward)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        scale_grad_(grad, grad_output, ctx.factor)
        return grad.view(ctx.shape), None, None, None, None, None


def fd_loss(pred: torch.Tensor, target: torch.Tensor, *, qparams: torch.Tensor | None = None,
            beta: float = 2.0, eps: float = 1e-5, reduction: str = "mean",
            impl: str = "auto") -> torch.Tensor:
    """FD's loss between ``pred`` and the whitened ``target`` (same shape ``[..., D]``).

    ``target`` is fp16/bf16/fp32, or int8 with ``qparams [..., 2]`` = (scale, offset).
    ``reduction``: ``mean`` over all elements (FD), ``sum``, or ``none`` = per-token mean
    over D. ``impl``: ``triton`` (fused kernel), ``torch`` (reference), or ``auto`` = triton
    on CUDA tensors or under ``TRITON_INTERPRET=1``, else the reference.
    """
    _check(pred, target, qparams, reduction)
    if impl == "auto":
        impl = "triton" if triton is not None and (pred.is_cuda or _interpret()) else "torch"
    if impl == "torch":
        return fd_loss_reference(pred, target, qparams=qparams, beta=beta, eps=eps, reduction=reduction)
    if impl != "triton":
        raise ValueError(f"impl must be auto, triton or torch, got {impl!r}")
    if triton is None:
        raise RuntimeError("fd_loss(impl='triton') needs the triton package")
    if not pred.is_cuda and not _interpret():
        raise RuntimeError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                           "use impl='torch' on CPU")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return _FDLoss.apply(pred, target, qparams, float(beta), float(eps), reduction)
