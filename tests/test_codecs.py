"""Every registered codec passes the same suite; codec-specific limits follow."""

import numpy as np
import pytest
import torch
from fdcache.kernels.loss import fd_loss_reference

from fdcache.codecs import (
    Codec,
    CodecSpec,
    dequantize_int4,
    dequantize_int8,
    get_codec,
    list_codecs,
    quantize_int4,
    quantize_int8,
    register,
    unregister,
    whitened_error,
)
from fdcache.codecs.int4 import Int4, dither

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


def encode(codec: Codec, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """As extract calls it: the rows' seed and sample indices (keys of dithered rounding)."""
    return codec.encode(x, seed=seed, samples=torch.arange(len(x)))


def test_encode_gives_exactly_the_declared_arrays(codec):
    enc = encode(codec, feature_like(3, L, D))
    specs = codec.arrays(L, D)
    assert list(enc) == [a.name for a in specs]
    for a in specs:
        assert enc[a.name].shape == (3, *a.shape), a.name
        assert enc[a.name].dtype == torch.from_numpy(np.zeros(0, a.dtype)).dtype, a.name


def test_round_trip_error_after_whitening_is_within_the_codecs_bound(codec):
    x = feature_like(4, 197, 768)
    y = codec.decode(encode(codec, x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    err = whitened_error(x, y)
    assert err["rel_l2"] <= codec.error_bound, err


def test_decode_of_numpy_arrays_read_from_a_store_equals_decode_of_tensors(codec):
    enc = encode(codec, feature_like(2, L, D))
    from_numpy = CodecSpec(codec.name).decode({k: v.numpy() for k, v in enc.items()})
    assert torch.equal(from_numpy, codec.decode(enc))


def test_bytes_per_sample_view_is_the_sum_of_the_declared_arrays(codec):
    enc = encode(codec, feature_like(1, L, D))
    assert codec.bytes_per_sample(L, D) == sum(v.numel() * v.element_size() for v in enc.values())


def test_loss_on_the_fused_form_equals_loss_on_the_decoded_map(codec):
    x, pred = feature_like(2, L, D), torch.randn(2, L, D)
    enc = encode(codec, x)
    target, qparams = codec.loss_inputs(enc)
    torch.testing.assert_close(fd_loss_reference(pred, target, qparams=qparams),
                               fd_loss_reference(pred, codec.decode(enc)), rtol=1e-6, atol=1e-7)


def test_registering_a_codec_makes_it_usable_by_name():
    class Bf16(Codec):
        name, error_bound = "bf16-test", 0.01

        def arrays(self, tokens, dim):
            from fdcache.codecs import ArraySpec
            return (ArraySpec("targets", np.dtype(np.float16), (tokens, dim)),)

        def encode(self, x, seed=None, samples=None):
            return {"targets": x.to(torch.bfloat16).to(torch.float16)}

        def decode(self, stored):
            return stored["targets"].float()

    register(Bf16())
    try:
        assert "bf16-test" in list_codecs() and CodecSpec("bf16-test").arrays(L, D)[0].shape == (L, D)
        with pytest.raises(ValueError, match="already registered"):
            register(Bf16())
    finally:
        unregister("bf16-test")


def test_unregister_forgets_a_run_time_codec_once_and_refuses_built_ins():
    class Copy(Codec):
        name = "copy-test"

    register(Copy())
    unregister("copy-test")
    assert "copy-test" not in list_codecs()
    with pytest.raises(ValueError, match="unknown codec 'copy-test'"):
        get_codec("copy-test")
    unregister("copy-test")  # already gone: nothing to forget (a test's finally may run it twice)
    for name in ("fp16", "int8", "int4", "int4-dither"):
        with pytest.raises(ValueError, match=f"'{name}' is a built-in codec"):
            unregister(name)
        assert name in list_codecs()


@pytest.mark.parametrize("group, dithered, name, bound, rounding", [
    (32, False, "int4", 0.10, "nearest rounding"),
    (32, True, "int4-dither", 0.15, "dithered (unbiased) rounding"),
    (64, False, "int4-g64", 0.10 * 1.25, "nearest rounding"),
    (16, True, "int4-dither-g16", 0.15 * 0.75, "dithered (unbiased) rounding"),
])
def test_an_int4_codec_is_named_bounded_and_described_by_its_group_and_rounding(group, dithered, name, bound,
                                                                              rounding):
    """By the definitions in int4.py: the name carries -dither and -gN (N != 32); the error
    bound is 0.10 nearest, 0.15 dithered at group 32, times (1 + log2(group / 32) / 4)."""
    c = Int4(group=group, dithered=dithered) if group != 32 or dithered else Int4()
    assert (c.name, c.group, c.dithered) == (name, group, dithered)
    assert c.error_bound == pytest.approx(bound, rel=1e-12)
    assert c.description == f"4-bit per value, fp16 scale/offset per {group} channels, {rounding}"
    if group == 32:  # the registered instance (built at import) is the same codec
        reg = get_codec(name)
        assert (reg.name, reg.group, reg.dithered, reg.error_bound, reg.description) == \
            (c.name, c.group, c.dithered, c.error_bound, c.description)


def test_whitened_error_is_its_definition_at_its_eps():
    """Non-affine LayerNorm per token written out ((x - mean) / sqrt(var + eps), biased var),
    then relative L2, mean cosine per token and max abs difference. Tokens of variance ~1e-4
    make eps matter: the default is 1e-5 and a given eps normalizes both maps."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 8, generator=g, dtype=torch.float64) * 0.01
    dec = ref + torch.randn(2, 5, 8, generator=g, dtype=torch.float64) * 0.002

    def definition(eps):
        def ln(t):
            return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + eps)

        a, b = ln(ref), ln(dec)
        cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
        return {"rel_l2": ((a - b).norm() / a.norm()).item(), "cosine": cos.item(),
                "max_abs": (a - b).abs().max().item()}

    for eps, got in ((1e-5, whitened_error(ref, dec)), (1e-2, whitened_error(ref, dec, eps=1e-2))):
        want = definition(eps)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-9), (eps, k)
    # eps matters here: at 1e-2 (>> var) the normalized maps, and so max_abs, shrink ~10x
    assert whitened_error(ref, dec, eps=1e-2)["max_abs"] < 0.2 * whitened_error(ref, dec)["max_abs"]


def test_codecspec_of_turns_a_name_or_a_spec_into_a_spec_with_the_compressor_asked_for():
    spec = CodecSpec("int8", "none", level=5)
    assert CodecSpec.of(spec) is spec
    assert CodecSpec.of(spec, "zstd") == CodecSpec("int8", "zstd", 5)
    assert CodecSpec.of("int4") == CodecSpec("int4", "none", 1)
    assert CodecSpec.of("int4", "zstd") == CodecSpec("int4", "zstd", 1)
    assert CodecSpec.from_dict(CodecSpec.of(spec, "zstd").to_dict()) == CodecSpec("int8", "zstd", 5)


def test_unknown_codec_is_rejected():
    with pytest.raises(ValueError, match="unknown codec"):
        CodecSpec("fp8")
    with pytest.raises(ValueError) as e:
        CodecSpec("fp8")
    assert str(e.value) == f"unknown codec 'fp8'; choose from {', '.join(list_codecs())}" and "fp16, int8" in str(e.value)
    with pytest.raises(ValueError, match=r"^unknown compressor 'lz4'; use zstd or none$"):
        CodecSpec("int8", "lz4")


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


def test_int4_packs_two_values_per_byte_low_nibble_first():
    x = torch.tensor([[0.0, 15.0, 1.0, 14.0] + [0.0] * 28])  # group of 32, range 0..15: scale 1
    packed, qp = quantize_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 16) and qp.shape == (1, 1, 2)
    assert packed[0, :2].tolist() == [0 | 15 << 4, 1 | 14 << 4]
    assert torch.equal(dequantize_int4(packed, qp), x)


def test_int4_is_a_third_of_fp16_bytes_at_group_32():
    assert get_codec("int4").bytes_per_sample(197, 768) / (197 * 768 * 2) == pytest.approx(0.3125)


def test_int4_nearest_error_is_at_most_half_a_step_per_group():
    x = feature_like(3, L, D)
    packed, qp = quantize_int4(x, group=32)
    err = (dequantize_int4(packed, qp, 32) - x).reshape(3, L, D // 32, 32).abs()
    assert torch.all(err <= qp[..., :1].float() * 0.5 + 1e-3)


def test_int4_dither_is_reproducible_keyed_by_seed_sample_and_token():
    u = dither(3, torch.tensor([5, 9]), L, D)
    assert torch.equal(u, dither(3, torch.tensor([5, 9]), L, D)) and 0 <= u.min() and u.max() < 1
    assert torch.equal(u[1], dither(3, torch.tensor([9]), L, D)[0])  # a row's dither ignores its batch
    assert not torch.equal(u, dither(4, torch.tensor([5, 9]), L, D))
    assert not torch.equal(u[0, 0], u[0, 1])  # tokens differ
    assert abs(u.mean().item() - 0.5) < 0.02
    codec = get_codec("int4-dither")
    x = feature_like(2, L, D)
    a = codec.encode(x, seed=1, samples=torch.tensor([5, 9]))
    assert all(torch.equal(a[k], codec.encode(x, seed=1, samples=torch.tensor([5, 9]))[k]) for k in a)
    with pytest.raises(ValueError, match="seed, samples"):
        codec.encode(x)


def _dither_by_definition(seed: int, sample: int, token: int, channel: int) -> float:
    """int4-dither's u, in Python integers from the store format's definition (fdcache.codecs.int4):
    three rounds of the 32-bit finalizer over (sample, seed), then token, then channel; the top
    24 bits over 2**24. A store resumed by another fdcache version must draw the same u."""
    m = 0xFFFFFFFF

    def mix(h):
        h ^= h >> 16
        h = (h * 0x7FEB352D) & m
        h ^= h >> 15
        h = (h * 0x5BD1E995) & m
        return h ^ (h >> 16)

    h = mix((sample * 0x27D4EB2F + seed * 0x165667B1 + 0x3C6EF372) & m)
    h = mix((h ^ token * 0x61C88647) & m)
    h = mix((h ^ channel * 0x2545F491) & m)
    return (h >> 8) / 2 ** 24


@pytest.mark.parametrize("seed", [0, 7, 2 ** 32 - 1])
def test_int4_dither_is_its_defined_hash_of_seed_sample_token_and_channel(seed):
    samples = [0, 3, 65_535, 1_000_000_007]
    u = dither(seed, torch.tensor(samples), 3, 5)
    want = torch.tensor([[[_dither_by_definition(seed, s, t, c) for c in range(5)] for t in range(3)]
                         for s in samples], dtype=torch.float64)
    assert u.dtype == torch.float32 and torch.equal(u.double(), want)  # 24-bit values: exact in float32


def test_int4_dithered_rounding_is_unbiased_where_nearest_is_not():
    x = feature_like(1, L, D)
    codec = get_codec("int4-dither")
    mean = torch.stack([codec.decode(codec.encode(x, seed=s, samples=torch.tensor([0]))) for s in range(200)]).mean(0)
    nearest = get_codec("int4").decode(get_codec("int4").encode(x))
    assert (mean - x).abs().mean() < 0.3 * (nearest - x).abs().mean()


def test_int4_group_size_is_a_parameter():
    c = Int4(group=64)
    assert c.name == "int4-g64" and c.arrays(L, D)[1].shape == (L, 1, 2)
    x = feature_like(2, L, D)
    assert whitened_error(x, c.decode(c.encode(x)))["rel_l2"] < c.error_bound
    with pytest.raises(ValueError, match="multiple"):
        Int4(group=48).encode(feature_like(1, L, D))


@pytest.mark.parametrize("name", ["fp16", "int8", "int4", "int4-dither"])
def test_a_stores_arrays_name_their_dimensions(tmp_path, name):
    """Zarr's dimension_names of each per-sample array, from the codec's definition: seed and
    sample, then the array's own (token, dim; int8: token, scale_offset; int4: token,
    dim_pairs and token, group, scale_offset)."""
    import json

    from conftest import synthetic_store

    store, _ = synthetic_store(tmp_path / "s.zarr", CodecSpec(name), seeds=1)
    want = {"fp16": {"targets": ["token", "dim"]},
            "int8": {"targets": ["token", "dim"], "qparams": ["token", "scale_offset"]},
            "int4": {"targets": ["token", "dim_pairs"], "qparams": ["token", "group", "scale_offset"]}}
    for array, dims in want[name.split("-")[0]].items():
        meta = json.loads((tmp_path / "s.zarr" / array / "zarr.json").read_text())
        assert meta["dimension_names"] == ["seed", "sample", *dims], (array, meta["dimension_names"])



def test_the_views_array_is_declared_as_the_store_format_says(tmp_path):
    """README's store format: views ``[S, N, 5]`` int32, chunks of min(N, 65536) samples of one
    seed, -1 where nothing is recorded (no view has a negative size), named seed, sample, yxhwf."""
    import json

    import zarr
    from conftest import synthetic_store

    synthetic_store(tmp_path / "s.zarr", seeds=1, samples=10)
    meta = json.loads((tmp_path / "s.zarr" / "views" / "zarr.json").read_text())
    assert (meta["shape"], meta["data_type"], meta["fill_value"], meta["dimension_names"]) == \
        ([1, 10, 5], "int32", -1, ["seed", "sample", "yxhwf"])
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 10, 5]
    for name, dims in (("skipped", ["seed", "sample"]), ("done", ["seed", "shard"])):
        assert json.loads((tmp_path / "s.zarr" / name / "zarr.json").read_text())["dimension_names"] == dims, name
    views = zarr.open_array(str(tmp_path / "s.zarr" / "views"), mode="r+")
    views.resize((2, 10, 5))  # a seed whose views are not written yet
    assert (views[1] == -1).all() and (views[0][:, 2:4] > 0).all()

def test_int4_codes_are_clamped_to_0_15_where_the_fp16_offset_rounds_below_a_group():
    """Groups far from zero with a narrow range (values near 1000, range 0.3): the float16
    offset rounds by up to 0.25, so (x - lo16) / scale16 reaches past 15 (to 17 here). Each code
    is clamp(round((x - lo16) / scale16), 0, 15), packed two to a byte, low nibble first: by hand."""
    from fdcache.codecs.int4 import quantize_int4

    g = torch.Generator().manual_seed(0)
    x = 1000.0 + 0.3 * torch.rand(4, 64, generator=g)
    packed, qp = quantize_int4(x, group=32)
    s16, lo16 = qp[..., 0:1].float(), qp[..., 1:2].float()
    raw = torch.round((x.reshape(4, 2, 32) - lo16) / s16)
    assert raw.max() > 15  # the clamp is exercised
    q = raw.clamp(0, 15).to(torch.uint8).reshape(4, 64)
    assert torch.equal(packed, q[:, 0::2] | (q[:, 1::2] << 4))
