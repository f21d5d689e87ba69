"""The codec interface, the registry, and the spec a store records."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import torch

_REGISTRY: dict[str, "Codec"] = {}
COMPRESSORS = ("zstd", "none")


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: ``[seeds, samples, *shape]`` of ``dtype``, one chunk per sample-view."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    dims: tuple[str, ...] = ("token", "dim")  # Zarr dimension names after (seed, sample)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class Codec:
    """Subclass, set ``name`` and ``description``, implement the four methods, then
    :func:`register` an instance."""

    name: str = ""
    description: str = ""
    error_bound: float = 0.0  # promised relative L2 after whitening on feature-like maps (tested)

    def arrays(self, tokens: int, dim: int) -> tuple[ArraySpec, ...]:
        """The arrays this codec stores for a ``[tokens, dim]`` map, in a fixed order."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, seed: int | None = None,
               samples: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stored arrays of ``x [b, L, D]``, computed on ``x``'s device. ``seed`` and
        ``samples [b]`` name the rows, for codecs whose rounding is keyed by them (dither)."""
        raise NotImplementedError

    def decode(self, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 ``[..., L, D]`` on the stored arrays' device."""
        raise NotImplementedError

    def loss_inputs(self, stored: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(target, qparams)`` as ``fd_loss`` takes them: the stored form itself where the
        fused kernel reads it directly (no decoded copy), else the decoded map and None."""
        return self.decode(stored), None

    def bytes_per_sample(self, tokens: int, dim: int) -> int:
        """Uncompressed stored bytes of one sample-view."""
        return sum(a.nbytes for a in self.arrays(tokens, dim))


def register(codec: Codec) -> Codec:
    if not codec.name or codec.name in _REGISTRY:
        raise ValueError(f"codec name {codec.name!r} is empty or already registered")
    _REGISTRY[codec.name] = codec
    return codec


def list_codecs() -> list[str]:
    return list(_REGISTRY)


def get_codec(name: str) -> Codec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose from {', '.join(_REGISTRY)}") from None


@dataclass(frozen=True)
class CodecSpec:
    """What a store records: the codec's name and the lossless compressor under it."""

    name: str = "fp16"
    # zstd saves 6-8% on trained token maps (fp16 and int8) but reads 3-6x slower (one core
    # decodes ~1 GB/s): off unless disk, not the loader, is the limit (docs/benchmarks.md).
    compressor: str = "none"  # none | zstd
    level: int = 1

    def __post_init__(self):
        get_codec(self.name)
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.compressor!r}; use zstd or none")

    @property
    def codec(self) -> Codec:
        return get_codec(self.name)

    def arrays(self, tokens: int, dim: int) -> tuple[ArraySpec, ...]:
        return self.codec.arrays(tokens, dim)

    def encode(self, x: torch.Tensor, seed: int | None = None,
               samples: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.codec.encode(x, seed=seed, samples=samples)

    def decode(self, stored: Mapping) -> torch.Tensor:
        """Accepts torch tensors or numpy arrays (moved to torch without a copy)."""
        return self.codec.decode({k: torch.as_tensor(v) for k, v in stored.items()})

    def loss_inputs(self, stored: Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.codec.loss_inputs(stored)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecSpec":
        return cls(**d)


def whitened_error(reference: torch.Tensor, decoded: torch.Tensor, eps: float = 1e-5) -> dict[str, float]:
    """Error a codec introduces *after* FD's whitening (non-affine LayerNorm per token)."""
    a = torch.nn.functional.layer_norm(reference.double(), reference.shape[-1:], eps=eps)
    b = torch.nn.functional.layer_norm(decoded.double(), decoded.shape[-1:], eps=eps)
    rel_l2 = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)).item()
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean().item()
    return {"rel_l2": rel_l2, "cosine": cos, "max_abs": (a - b).abs().max().item()}
