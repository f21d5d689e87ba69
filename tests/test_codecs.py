import numpy as np
import pytest
import torch

from fdcache.codecs import CodecSpec, dequantize_int8, quantize_int8, whitened_error


def test_fp16_codec_is_the_teachers_fp16_output():
    x = torch.randn(3, 17, 64)
    enc = CodecSpec("fp16").encode(x)
    assert set(enc) == {"targets"} and enc["targets"].dtype == torch.float16
    assert torch.equal(CodecSpec("fp16").decode(enc["targets"].numpy()), x.half().float())


def test_int8_error_after_whitening_is_under_one_percent():
    torch.manual_seed(0)
    # Per-token offsets and scales vary (whitening removes them; int8 keeps them exactly).
    x = torch.randn(4, 197, 768) * torch.rand(4, 197, 1) * 3 + torch.randn(4, 197, 1) * 5
    enc = CodecSpec("int8").encode(x)
    assert enc["targets"].dtype == torch.int8 and enc["qparams"].shape == (4, 197, 2)
    err = whitened_error(x, CodecSpec("int8").decode(enc["targets"], enc["qparams"]))
    assert err["rel_l2"] < 0.01 and err["cosine"] > 0.9999


def test_int8_round_trip_error_is_at_most_half_a_step():
    x = torch.randn(5, 33) * 3
    q, qp = quantize_int8(x)
    err = (dequantize_int8(q, qp) - x).abs()
    assert torch.all(err <= qp[..., :1] * 0.5 + 1e-6)
    assert q.min() >= -128 and q.max() <= 127


def test_int8_constant_token_decodes_exactly():
    x = torch.full((2, 3, 8), 4.25)
    q, qp = quantize_int8(x)
    assert torch.equal(dequantize_int8(q, qp), x)


def test_unknown_codec_is_rejected():
    with pytest.raises(ValueError, match="unknown codec"):
        CodecSpec("fp8")


def test_int8_loses_precision_on_a_dominant_outlier_channel():
    # Documented limit: per-token min/max spends the 256 levels on one huge channel.
    torch.manual_seed(0)
    x = torch.randn(2, 197, 768)
    x[..., 7] *= 40
    q = CodecSpec("int8").encode(x)
    assert whitened_error(x, CodecSpec("int8").decode(q["targets"], q["qparams"]))["rel_l2"] > 0.01
