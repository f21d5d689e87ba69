"""``int8``: per-token affine quantization, ``x ~ q * scale + offset``.

``q = round((x - lo) / scale) - 128`` with ``scale = (hi - lo) / 255`` per token; ``qparams``
holds (scale, offset) as float32. Whitening-LN removes any per-token affine map, so int8 loses
only the rounding (<1% relative L2 after whitening). The fused loss reads ``q`` and
``qparams`` directly and dequantizes in its own pass.
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import ArraySpec, Codec, register

__all__ = ["quantize_int8", "dequantize_int8", "Int8"]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` int8 ``[..., D]`` and ``qparams`` float32 ``[..., 2]`` = (scale, offset)."""
    x = x.detach().float()
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - lo) / scale).clamp_(0, 255) - 128
    offset = lo + 128.0 * scale
    return q.to(torch.int8), torch.cat([scale, offset], dim=-1)


def dequantize_int8(q: torch.Tensor, qparams: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The one dequantization (the fused kernel does the same sum in its own pass)."""
    qparams = qparams.to(dtype)
    return q.to(dtype) * qparams[..., 0:1] + qparams[..., 1:2]


class Int8(Codec):
    name = "int8"
    error_bound = 0.01  # relative L2 after whitening, rounding to 256 levels per token
    description = "int8 per token (scale, offset): half the bytes of fp16, ~0.7% rel. L2 after whitening"

    def arrays(self, tokens, dim):
        return (ArraySpec("targets", np.dtype(np.int8), (tokens, dim)),
                ArraySpec("qparams", np.dtype(np.float32), (tokens, 2), ("token", "scale_offset")))

    def encode(self, x, seed=None, samples=None):
        q, qp = quantize_int8(x)
        return {"targets": q, "qparams": qp}

    def decode(self, stored):
        return dequantize_int8(stored["targets"], stored["qparams"])

    def loss_inputs(self, stored):
        return stored["targets"], stored["qparams"]


register(Int8())
