"""FD's loss, fused: ``smooth_l1(pred, layer_norm(target, no affine, eps), beta)``.

One Triton program per token row reads that row of ``pred`` and ``target`` once (int8
targets are dequantized in the same pass from their per-token scale/offset), whitens the
target in fp32, and writes both the row's loss partial and ``d loss / d pred``. The
backward only scales that saved gradient by ``grad_output`` (in place; skipped when it is
exactly 1, a check that syncs the device once per backward, as Liger-Kernel does), so
training reads each input once and keeps one gradient-sized buffer. Row partials are summed by
``torch.sum`` afterwards: deterministic, no float atomics.

:func:`fd_loss_reference` is the same maths in plain PyTorch (used by tests, on CPU, and
by ``--loss-impl torch``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fdcache.codecs.int8 import dequantize_int8

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
    def _fd_loss_fwd_kernel(pred_ptr, tgt_ptr, qp_ptr, grad_ptr, loss_ptr,
                            D, pred_stride, tgt_stride, qp_stride, grad_stride,
                            beta, eps, grad_scale,
                            BLOCK_D: tl.constexpr, INT8: tl.constexpr, BETA_ZERO: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        t = tl.load(tgt_ptr + row * tgt_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if INT8:
            scale = tl.load(qp_ptr + row * qp_stride).to(tl.float32)
            offset = tl.load(qp_ptr + row * qp_stride + 1).to(tl.float32)
            t = t * scale + offset
        t = tl.where(mask, t, 0.0)
        mean = tl.sum(t, axis=0) / D
        tc = tl.where(mask, t - mean, 0.0)
        var = tl.sum(tc * tc, axis=0) / D
        tn = tc / tl.sqrt(var + eps)
        p = tl.load(pred_ptr + row * pred_stride + cols, mask=mask, other=0.0).to(tl.float32)
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
        loss = tl.where(mask, loss, 0.0)
        tl.store(loss_ptr + row, tl.sum(loss, axis=0))
        tl.store(grad_ptr + row * grad_stride + cols, (g * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """2-D ``[rows, D]`` view with unit column stride (copies only if no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _fd_loss_forward_triton(pred, target, qparams, beta, eps, reduction):
    D = pred.shape[-1]
    if D > MAX_D:
        raise ValueError(f"fd_loss: D={D} exceeds the kernel's maximum {MAX_D}")
    p2, t2 = _rows(pred), _rows(target)
    int8 = target.dtype == torch.int8
    q2 = _rows(qparams.float()) if int8 else t2  # dummy pointer when unused
    n_rows = p2.shape[0]
    grad = _empty((n_rows, D), dtype=pred.dtype, device=pred.device)
    row_loss = _empty(n_rows, dtype=torch.float32, device=pred.device)
    numel = n_rows * D
    grad_scale = {"mean": 1.0 / max(numel, 1), "sum": 1.0, "none": 1.0 / D}[reduction]
    if n_rows:
        block = triton.next_power_of_2(D)
        _fd_loss_fwd_kernel[(n_rows,)](
            p2, t2, q2, grad, row_loss, D, p2.stride(0), t2.stride(0), q2.stride(0), grad.stride(0),
            float(beta), float(eps), grad_scale,
            BLOCK_D=block, INT8=int8, BETA_ZERO=beta == 0, num_warps=_num_warps(block))
    if reduction == "mean":
        loss = row_loss.sum() / numel
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = (row_loss / D).view(pred.shape[:-1])
    return loss, grad.view(pred.shape)


class _FDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, qparams, beta, eps, reduction):
        loss, grad = _fd_loss_forward_triton(pred, target, qparams, beta, eps, reduction)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("fd_loss (triton) scales its saved gradient in place: backward "
                               "can run once per forward (no retain_graph double backward)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(-1).to(grad.dtype))
        elif not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None


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
