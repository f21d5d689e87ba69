"""The codec interface, the name registry, and the spec a store records. No torch import:
the CLI lists codec names for ``--help``, and the store's layout declares its arrays, from
here alone; an implementation module is imported when its codec is first used.

Adding a codec is one module (a :class:`Codec` subclass that calls :func:`register` on
import) plus its line in :data:`BUILTIN`. Codecs registered at run time (a benchmark's
variant, a user's experiment) are listed and used the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["BUILTIN", "COMPRESSORS", "ArraySpec", "Codec", "CodecSpec", "get_codec", "list_codecs", "register",
           "unregister"]

# name -> the module that implements and registers it (imported on first use)
BUILTIN = {
    "fp16": "fdcache.codecs.fp16",
    "int8": "fdcache.codecs.int8",
    "int4": "fdcache.codecs.int4",
    "int4-dither": "fdcache.codecs.int4",
}
COMPRESSORS = ("zstd", "none")
_REGISTRY: dict[str, "Codec"] = {}


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
    """Subclass, set ``name`` and ``description``, implement ``arrays``, ``encode`` and
    ``decode`` (``loss_inputs`` when the fused loss can read the stored form), then
    :func:`register` an instance."""

    name: str = ""
    description: str = ""
    error_bound: float = 0.0  # promised relative L2 after whitening on feature-like maps (tested)

    def arrays(self, tokens: int, dim: int) -> tuple[ArraySpec, ...]:
        """The arrays this codec stores for a ``[tokens, dim]`` map, in a fixed order."""
        raise NotImplementedError

    def encode(self, x: "torch.Tensor", seed: int | None = None,
               samples: "torch.Tensor | None" = None) -> dict[str, "torch.Tensor"]:
        """Stored arrays of ``x [b, L, D]``, computed on ``x``'s device. ``seed`` and
        ``samples [b]`` name the rows, for codecs whose rounding is keyed by them (dither)."""
        raise NotImplementedError

    def decode(self, stored: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        """float32 ``[..., L, D]`` on the stored arrays' device."""
        raise NotImplementedError

    def loss_inputs(self, stored: Mapping[str, "torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor | None"]:
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


def unregister(name: str) -> None:
    """Forget a codec registered at run time (a test's or an experiment's); built-ins stay."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in codec")
    _REGISTRY.pop(name, None)


def list_codecs() -> list[str]:
    """Every codec name: the built-in ones (nothing imported) and any registered since."""
    return list(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def get_codec(name: str) -> Codec:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose from {', '.join(list_codecs())}") from None


@dataclass(frozen=True)
class CodecSpec:
    """What a store records: the codec's name and the lossless compressor under it.
    ``CodecSpec.of("int8")`` turns a name (or a spec) into a spec: the one conversion."""

    name: str = "fp16"
    # zstd saves 6-8% on trained token maps (fp16 and int8) but reads 3-6x slower (one core
    # decodes ~1 GB/s): off unless disk, not the loader, is the limit (docs/benchmarks.md).
    compressor: str = "none"  # none | zstd
    level: int = 1

    def __post_init__(self):
        if self.name not in list_codecs():
            raise ValueError(f"unknown codec {self.name!r}; choose from {', '.join(list_codecs())}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.compressor!r}; use zstd or none")

    @classmethod
    def of(cls, value: "str | CodecSpec", compressor: str | None = None) -> "CodecSpec":
        if isinstance(value, CodecSpec):
            return value if compressor is None else cls(value.name, compressor, value.level)
        return cls(name=value) if compressor is None else cls(name=value, compressor=compressor)

    @property
    def codec(self) -> Codec:
        return get_codec(self.name)

    def arrays(self, tokens: int, dim: int) -> tuple[ArraySpec, ...]:
        return self.codec.arrays(tokens, dim)

    def encode(self, x: "torch.Tensor", seed: int | None = None,
               samples: "torch.Tensor | None" = None) -> dict[str, "torch.Tensor"]:
        return self.codec.encode(x, seed=seed, samples=samples)

    def decode(self, stored: Mapping) -> "torch.Tensor":
        """Accepts torch tensors or numpy arrays (moved to torch without a copy)."""
        import torch

        return self.codec.decode({k: torch.as_tensor(v) for k, v in stored.items()})

    def loss_inputs(self, stored: Mapping) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        return self.codec.loss_inputs(stored)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecSpec":
        return cls(**d)
