"""Target codecs: how a float token map ``[b, L, D]`` becomes stored arrays and back.

A codec is a small object in a registry (timm's model registry is the pattern: names are
listed without building anything): it declares the arrays it stores (:class:`ArraySpec`:
name, dtype, per-sample shape), encodes on the teacher's device and decodes on the
student's device, both in torch. The store creates, writes and reads exactly the arrays a
codec declares. The names, the interface and :class:`CodecSpec` import without torch
(:mod:`.spec`); implementations load on first use.

Lossless compression and checksums sit below the codec, in the Zarr codec chain (the store).
"""

import importlib

from .spec import BUILTIN, COMPRESSORS, ArraySpec, Codec, CodecSpec, get_codec, list_codecs, register, unregister

_LAZY = {"whitened_error": "error", "Fp16": "fp16", "Int8": "int8", "quantize_int8": "int8",
         "dequantize_int8": "int8", "Int4": "int4", "quantize_int4": "int4", "dequantize_int4": "int4"}

__all__ = ["BUILTIN", "COMPRESSORS", "ArraySpec", "Codec", "CodecSpec", "get_codec", "list_codecs", "register",
           "unregister", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
