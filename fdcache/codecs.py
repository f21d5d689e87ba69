"""Target codecs: how a float token map ``[b, L, D]`` becomes stored arrays and back.

``fp16`` keeps the teacher's half-precision output as is. ``int8`` stores per-token
``scale``/``offset`` (float32) and ``q = round((x - lo) / scale) - 128``; dequantized
``x ~ q * scale + offset``. Whitening-LN removes any per-token affine map, so int8 loses
only the rounding (<1% relative L2 after whitening; see tests and docs/benchmarks.md).
Lossless compression and checksums sit below, in the Zarr codec chain (see ``store``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CodecSpec:
    name: str = "fp16"  # fp16 | int8
    compressor: str = "zstd"  # zstd | none
    level: int = 1

    def __post_init__(self):
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose from {', '.join(CODECS)}")
        if self.compressor not in ("zstd", "none"):
            raise ValueError(f"unknown compressor {self.compressor!r}; use zstd or none")

    @property
    def target_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.name == "int8" else np.float16)

    @property
    def has_qparams(self) -> bool:
        return self.name == "int8"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecSpec":
        return cls(**d)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored arrays of ``x``, computed on ``x``'s device (copy them to host later)."""
        return CODECS[self.name][0](x)

    def decode(self, targets, qparams=None) -> torch.Tensor:
        return CODECS[self.name][1](targets, qparams)


def _fp16_encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"targets": x.detach().to(torch.float16)}


def _fp16_decode(targets, qparams=None) -> torch.Tensor:
    return torch.as_tensor(np.asarray(targets)).float()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token affine int8: returns ``q`` int8 ``[..., D]`` and ``qparams`` float32
    ``[..., 2]`` = (scale, offset) with ``x ~ q * scale + offset``."""
    x = x.detach().float()
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - lo) / scale).clamp_(0, 255) - 128
    offset = lo + 128.0 * scale
    return q.to(torch.int8), torch.cat([scale, offset], dim=-1)


def dequantize_int8(q: torch.Tensor, qparams: torch.Tensor) -> torch.Tensor:
    qparams = qparams.float()
    return q.float() * qparams[..., 0:1] + qparams[..., 1:2]


def _int8_encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
    q, qp = quantize_int8(x)
    return {"targets": q, "qparams": qp}


def _int8_decode(targets, qparams=None) -> torch.Tensor:
    if qparams is None:
        raise ValueError("int8 targets need their qparams (scale, offset)")
    return dequantize_int8(torch.as_tensor(np.asarray(targets)), torch.as_tensor(np.asarray(qparams)))


CODECS = {"fp16": (_fp16_encode, _fp16_decode), "int8": (_int8_encode, _int8_decode)}


def whitened_error(reference: torch.Tensor, decoded: torch.Tensor, eps: float = 1e-5) -> dict[str, float]:
    """Error a codec introduces *after* FD's whitening (non-affine LayerNorm per token)."""
    a = torch.nn.functional.layer_norm(reference.double(), reference.shape[-1:], eps=eps)
    b = torch.nn.functional.layer_norm(decoded.double(), decoded.shape[-1:], eps=eps)
    rel_l2 = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)).item()
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean().item()
    return {"rel_l2": rel_l2, "cosine": cos, "max_abs": (a - b).abs().max().item()}
