"""Every registered codec passes the same suite; codec-specific limits follow."""

import numpy as np
import pytest
import torch

from fdcache.codecs import (Codec, CodecSpec, dequantize_int8, get_codec, list_codecs, quantize_int8,
                            register, whitened_error)
from fdcache.kernels.loss import fd_loss_reference

L, D = 17, 64


def feature_like(*shape, seed=0) -> torch.Tensor:
    """Per-token offsets and scales vary (whitening removes them), like a ViT's token maps."""
    g = torch.Generator().manual_seed(seed)
    lead = shape[:-1] + (1,)
    return torch.randn(*shape, generator=g) * (torch.rand(*lead, generator=g) * 3 + 0.1) \
        + torch.randn(*lead, generator=g) * 5


@pytest.fixture(params=list_codecs())
def codec(request) -> Codec:
    return get_codec(request.param)


def test_encode_gives_exactly_the_declared_arrays(codec):
    enc = codec.encode(feature_like(3, L, D))
    specs = codec.arrays(L, D)
    assert list(enc) == [a.name for a in specs]
    for a in specs:
        assert enc[a.name].shape == (3, *a.shape), a.name
        assert enc[a.name].dtype == torch.from_numpy(np.zeros(0, a.dtype)).dtype, a.name


def test_round_trip_error_after_whitening_is_within_the_codecs_bound(codec):
    x = feature_like(4, 197, 768)
    y = codec.decode(codec.encode(x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    err = whitened_error(x, y)
    assert err["rel_l2"] <= codec.error_bound, err


def test_decode_of_numpy_arrays_read_from_a_store_equals_decode_of_tensors(codec):
    enc = codec.encode(feature_like(2, L, D))
    from_numpy = CodecSpec(codec.name).decode({k: v.numpy() for k, v in enc.items()})
    assert torch.equal(from_numpy, codec.decode(enc))


def test_bytes_per_sample_view_is_the_sum_of_the_declared_arrays(codec):
    enc = codec.encode(feature_like(1, L, D))
    assert codec.bytes_per_sample(L, D) == sum(v.numel() * v.element_size() for v in enc.values())


def test_loss_on_the_fused_form_equals_loss_on_the_decoded_map(codec):
    x, pred = feature_like(2, L, D), torch.randn(2, L, D)
    enc = codec.encode(x)
    target, qparams = codec.loss_inputs(enc)
    torch.testing.assert_close(fd_loss_reference(pred, target, qparams=qparams),
                               fd_loss_reference(pred, codec.decode(enc)), rtol=1e-6, atol=1e-7)


def test_registering_a_codec_makes_it_usable_by_name():
    class Bf16(Codec):
        name, error_bound = "bf16-test", 0.01

        def arrays(self, tokens, dim):
            from fdcache.codecs import ArraySpec
            return (ArraySpec("targets", np.dtype(np.float16), (tokens, dim)),)

        def encode(self, x):
            return {"targets": x.to(torch.bfloat16).to(torch.float16)}

        def decode(self, stored):
            return stored["targets"].float()

    register(Bf16())
    try:
        assert "bf16-test" in list_codecs() and CodecSpec("bf16-test").arrays(L, D)[0].shape == (L, D)
        with pytest.raises(ValueError, match="already registered"):
            register(Bf16())
    finally:
        from fdcache.codecs import base
        base._REGISTRY.pop("bf16-test")


def test_unknown_codec_is_rejected():
    with pytest.raises(ValueError, match="unknown codec"):
        CodecSpec("fp8")


def test_fp16_codec_is_the_teachers_fp16_output():
    x = torch.randn(3, L, D)
    enc = CodecSpec("fp16").encode(x)
    assert torch.equal(CodecSpec("fp16").decode({"targets": enc["targets"].numpy()}), x.half().float())


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


def test_int8_loses_precision_on_a_dominant_outlier_channel():
    # Documented limit: per-token min/max spends the 256 levels on one huge channel.
    torch.manual_seed(0)
    x = torch.randn(2, 197, 768)
    x[..., 7] *= 40
    codec = get_codec("int8")
    assert whitened_error(x, codec.decode(codec.encode(x)))["rel_l2"] > 0.01
