"""``fp16``: the teacher's half-precision output as is (lossless vs an fp16 teacher)."""

from __future__ import annotations

import numpy as np
import torch

from .spec import ArraySpec, Codec, register

__all__ = ["Fp16"]


class Fp16(Codec):
    name = "fp16"
    error_bound = 0.005  # relative L2 after whitening vs fp32: fp16 rounding of offset-heavy tokens
    description = "fp16 token maps, lossless vs the teacher's fp16 output"

    def arrays(self, tokens, dim):
        return (ArraySpec("targets", np.dtype(np.float16), (tokens, dim)),)

    def encode(self, x, seed=None, samples=None):
        return {"targets": x.detach().to(torch.float16)}

    def decode(self, stored):
        return stored["targets"].float()

    def loss_inputs(self, stored):
        return stored["targets"], None


register(Fp16())
