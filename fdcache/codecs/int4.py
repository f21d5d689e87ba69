"""``int4``: 4-bit values packed two per byte, a float16 (scale, offset) per group of ``group``
channels of a token (``x ~ q * scale + offset``, ``q`` in 0..15): 0.31 of fp16's bytes at
group 32.

Rounding is to the nearest level, or dithered (``int4-dither``: ``floor(v + u)``, ``u``
uniform in [0, 1), an unbiased estimate of ``v``) with ``u`` a counter-based hash of (seed,
sample, token, channel), so a store re-made from the same views is byte-identical and a
resumed shard matches an uninterrupted one. The fused loss does not read the packed form:
it receives the decoded map (``loss_inputs`` default).
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import ArraySpec, Codec, register

__all__ = ["dither", "quantize_int4", "dequantize_int4", "Int4"]

_MASK = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    """32-bit integer finalizer in int64 arithmetic (constants < 2**31: no overflow), the
    same bits on every device."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK
    h = h ^ (h >> 15)
    h = (h * 0x5BD1E995) & _MASK
    return h ^ (h >> 16)


def dither(seed: int, samples: torch.Tensor, tokens: int, dim: int) -> torch.Tensor:
    """Uniform [0, 1) float32 ``[len(samples), tokens, dim]`` keyed by (seed, sample, token, dim).

    Part of the store format (a store resumed or re-made by another version draws the same u):
    ``h = mix(sample * 0x27D4EB2F + seed * 0x165667B1 + 0x3C6EF372)``, then
    ``h = mix(h ^ token * 0x61C88647)``, ``h = mix(h ^ channel * 0x2545F491)`` (each modulo
    2**32, ``mix`` the finalizer above), ``u = (h >> 8) / 2**24``."""
    dev = samples.device
    h = _mix((samples.to(torch.int64).view(-1, 1, 1) * 0x27D4EB2F + int(seed) * 0x165667B1 + 0x3C6EF372) & _MASK)
    h = _mix((h ^ torch.arange(tokens, device=dev, dtype=torch.int64).view(1, -1, 1) * 0x61C88647) & _MASK)
    h = _mix((h ^ torch.arange(dim, device=dev, dtype=torch.int64).view(1, 1, -1) * 0x2545F491) & _MASK)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def quantize_int4(x: torch.Tensor, group: int = 32, u: torch.Tensor | None = None):
    """``(packed uint8 [..., D/2], qparams float16 [..., D/group, 2])``; ``u``: dither in
    [0, 1) shaped like ``x`` (None: round to nearest)."""
    D = x.shape[-1]
    if D % group or group % 2:
        raise ValueError(f"int4: dim {D} must be a multiple of the (even) group size {group}")
    g = x.detach().float().reshape(*x.shape[:-1], D // group, group)
    lo = g.amin(dim=-1, keepdim=True)
    scale = (g.amax(dim=-1, keepdim=True) - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Quantize against the float16 scale/offset that decoding will use.
    scale, lo = scale.half().float(), lo.half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # underflow to 0 in fp16
    v = (g - lo) / scale
    v = torch.round(v) if u is None else torch.floor(v + u.reshape(v.shape))
    q = v.clamp_(0, 15).to(torch.uint8).reshape(*x.shape[:-1], D)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, torch.cat([scale, lo], dim=-1).half()


def dequantize_int4(packed: torch.Tensor, qparams: torch.Tensor, group: int = 32) -> torch.Tensor:
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    g = q.float().reshape(*q.shape[:-1], -1, group)
    qp = qparams.float()
    return (g * qp[..., 0:1] + qp[..., 1:2]).reshape(q.shape)


class Int4(Codec):
    def __init__(self, group: int = 32, dithered: bool = False):
        self.group, self.dithered = group, dithered
        self.name = "int4" + ("-dither" if dithered else "") + ("" if group == 32 else f"-g{group}")
        self.description = (f"4-bit per value, fp16 scale/offset per {group} channels, "
                            + ("dithered (unbiased) rounding" if dithered else "nearest rounding"))
        # Relative L2 after whitening on Gaussian-like groups (~7.8% on real ViT-S/14 maps, group 32).
        self.error_bound = (0.15 if dithered else 0.10) * (1 + 0.25 * np.log2(group / 32))

    def arrays(self, tokens, dim):
        return (ArraySpec("targets", np.dtype(np.uint8), (tokens, dim // 2), ("token", "dim_pairs")),
                ArraySpec("qparams", np.dtype(np.float16), (tokens, dim // self.group, 2),
                          ("token", "group", "scale_offset")))

    def encode(self, x, seed=None, samples=None):
        u = None
        if self.dithered:
            if seed is None or samples is None:
                raise ValueError(f"{self.name} needs the (seed, samples) its dither is keyed by")
            u = dither(seed, torch.as_tensor(samples, device=x.device), x.shape[-2], x.shape[-1])
        packed, qp = quantize_int4(x, self.group, u)
        return {"targets": packed, "qparams": qp}

    def decode(self, stored):
        return dequantize_int4(stored["targets"], stored["qparams"], self.group)


register(Int4())
register(Int4(dithered=True))
