"""Target codecs: how a float token map ``[b, L, D]`` becomes stored arrays and back.

A codec is a small object in a registry (timm's optimizer registry is the pattern): it
declares the arrays it stores (:class:`ArraySpec`: name, dtype, per-sample shape), encodes
on the teacher's device and decodes on the student's device, both in torch. The store
creates, writes and reads exactly the arrays a codec declares; no other module knows them.
Adding a codec is one module that calls :func:`register`, imported below.

Lossless compression and checksums sit below the codec, in the Zarr codec chain (``store``).
"""

from .base import (ArraySpec, Codec, CodecSpec, get_codec, list_codecs, register,
                   whitened_error)
from .fp16 import Fp16
from .int4 import Int4, dequantize_int4, quantize_int4
from .int8 import Int8, dequantize_int8, quantize_int8

__all__ = ["ArraySpec", "Codec", "CodecSpec", "Fp16", "Int4", "Int8", "dequantize_int4", "dequantize_int8",
           "get_codec", "list_codecs", "quantize_int4", "quantize_int8", "register", "whitened_error"]
