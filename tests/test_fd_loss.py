"""The fused kernel against the plain-PyTorch reference in float64 (TRITON_INTERPRET=1 on CPU).

``FDCACHE_KERNEL_TEST_DEVICE=cuda TRITON_INTERPRET=0`` runs the same tests on the kernels
compiled for a GPU (benchmarks/gpu/check.py does); the reference stays on the CPU."""

import itertools
import os

import fdcache.kernels.loss as kmod
import pytest
import torch
from fdcache.kernels import fd_loss, fd_loss_reference

from fdcache.codecs import quantize_int8

pytestmark = pytest.mark.skipif(not kmod.triton_available(), reason="triton not installed")

DEVICE = torch.device(os.environ.get("FDCACHE_KERNEL_TEST_DEVICE", "cpu"))
# Triton reads TRITON_INTERPRET when a kernel is decorated (at import), not at each launch.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
compiled_kernels = pytest.mark.skipif(
    INTERPRETED,
    reason="the kernels were built for the interpreter: run with TRITON_INTERPRET=0 FDCACHE_KERNEL_TEST_DEVICE=cuda")
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
SCALER = 2.0 ** 16  # GradScaler's initial scale: the grad_output fp16 AMP training passes


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every output buffer starts as NaN, so an element the kernel misses fails the test. Each
    is placed on a device named explicitly: left to torch's default it is on the CPU, where a
    GPU kernel cannot write it (a bug the CPU interpreter alone would not show)."""
    def empty(shape, dtype=None, device=None, **kw):
        assert device is not None, "the launcher allocated an output buffer without naming its device"
        return torch.full(shape if isinstance(shape, tuple) else (shape,), float("nan"),
                          dtype=dtype, device=device)
    monkeypatch.setattr(kmod, "_empty", empty)


def _inputs(shape, pred_dtype, target_dtype=torch.float16, scale=1.0, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(shape, generator=g) * 1.5).to(device, pred_dtype).requires_grad_()
    target = (torch.randn(shape, generator=g) * scale + torch.randn(shape[:-1] + (1,), generator=g) * scale)
    return pred, target.to(device, target_dtype)


def _reference(pred, target, **kw):
    p64 = pred.detach().cpu().double().requires_grad_()
    kw = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
    loss = fd_loss_reference(p64, target.cpu(), **kw)
    grad_out = SCALER * (torch.randn_like(loss) if loss.ndim else torch.tensor(1.0, dtype=loss.dtype))
    loss.backward(grad_out)
    return loss.detach(), p64.grad, grad_out


def _check(pred, target, reduction="mean", **kw):
    ref_loss, ref_grad, grad_out = _reference(pred, target, reduction=reduction, **kw)
    loss = fd_loss(pred, target, reduction=reduction, impl="triton", **kw)
    loss.backward(grad_out.to(loss.device, loss.dtype))
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-7)
    tol = TOL[pred.dtype]
    # No subnormal slack: with a GradScaler-sized grad_output every gradient is a normal
    # number in every dtype, so only rounding separates it from the float64 reference.
    torch.testing.assert_close(pred.grad.double().cpu(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


@pytest.mark.parametrize("D,L,B", list(itertools.product([64, 100, 768, 1024], [1, 17, 197], [1, 3])))
def test_fp32_matches_reference_across_shapes(D, L, B):
    _check(*_inputs((B, L, D), torch.float32))


@pytest.mark.parametrize("pred_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [100, 768])
def test_low_precision_pred_and_target_dtypes(pred_dtype, target_dtype, D):
    _check(*_inputs((3, 17, D), pred_dtype, target_dtype))


@pytest.mark.parametrize("D", [4096, 4099, 8192, 8193, 20000])
def test_wide_rows_beyond_4096(D):
    _check(*_inputs((1, 3, D), torch.float32))


def test_wide_int8_rows_loop_over_d():
    pred, target = _inputs((1, 2, 3 * 4096 + 5), torch.bfloat16, torch.float32, scale=3.0)
    q, qp = quantize_int8(target)
    _check(pred, q, qparams=qp)


def test_fp16_amp_gradient_survives_a_realistic_numel():
    """1M elements: 1/numel (1e-6) alone is subnormal in fp16 and GradScaler's 65536 is
    out of its range; only their product (0.06) may be rounded to fp16."""
    _check(*_inputs((2, 64, 8192), torch.float16))


def test_backward_scaling_alone_at_training_size():
    """The backward's scaling with the numel of batch 128 x 197 tokens x 768 and fp16."""
    numel = 128 * 197 * 768
    g = torch.linspace(-1, 1, 2 * 768).to(torch.float16).view(2, 768)
    expected = (g.double() * SCALER / numel).to(torch.float16)
    out = kmod.scale_grad_(g.clone().to(DEVICE), torch.tensor(SCALER, device=DEVICE), 1.0 / numel)
    assert torch.equal(out.cpu(), expected)
    per_row = torch.tensor([SCALER, -2 * SCALER])
    out = kmod.scale_grad_(g.clone().to(DEVICE), per_row.to(DEVICE), 1.0 / 768)
    assert torch.equal(out.cpu(), (g.double() * per_row.double()[:, None] / 768).to(torch.float16))


def test_backward_never_reads_the_device(monkeypatch):
    """No host sync in the backward (the old ``grad_output == 1`` check was one per step)."""
    pred, target = _inputs((2, 5, 64), torch.float16)
    loss = fd_loss(pred, target, impl="triton")

    def sync(*a, **k):
        raise AssertionError("host sync in backward")
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "equal", sync)
    loss.backward(torch.tensor(SCALER, device=DEVICE))
    monkeypatch.undo()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_and_per_token_reductions_with_upstream_gradients(reduction, dtype):
    _check(*_inputs((2, 17, 100), dtype), reduction=reduction)


def test_per_token_losses_have_the_token_shape_and_average_to_the_mean():
    pred, target = _inputs((3, 17, 64), torch.float32)
    per_token = fd_loss(pred, target, reduction="none", impl="triton")
    assert per_token.shape == (3, 17)
    torch.testing.assert_close(per_token.mean(), fd_loss(pred, target, impl="triton"))


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0, 10.0])
def test_beta_follows_torch_semantics_including_l1_at_zero(beta):
    _check(*_inputs((2, 17, 100), torch.float32), beta=beta)


def test_eps_is_an_argument():
    _check(*_inputs((2, 5, 64), torch.float32, scale=1e-3), eps=1e-2)


def test_constant_target_rows_have_zero_variance_and_stay_finite():
    pred, target = _inputs((2, 17, 100), torch.float32)
    target = target.clone()
    target[0, 3] = 7.0
    target[1, :] = -2.0
    _check(pred, target)


def test_large_magnitudes():
    pred, target = _inputs((2, 17, 768), torch.float32, target_dtype=torch.float32, scale=1e4)
    with torch.no_grad():
        pred.mul_(1e4)
    _check(pred, target)


@pytest.mark.parametrize("D", [64, 100, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_targets_match_dequantize_then_reference(D, dtype):
    pred, target = _inputs((3, 17, D), dtype, torch.float32, scale=3.0)
    q, qp = quantize_int8(target)
    _check(pred, q, qparams=qp)
    # ...and the reference on the dequantized fp32 target is the same loss.
    deq = q.float() * qp[..., :1] + qp[..., 1:]
    torch.testing.assert_close(fd_loss(pred, q, qparams=qp, impl="triton"),
                               fd_loss_reference(pred, deq), rtol=1e-5, atol=1e-7)


def test_non_contiguous_inputs_are_handled():
    base_p, base_t = _inputs((17, 3, 100), torch.float32)
    pred = base_p.detach().transpose(0, 1).requires_grad_()  # [3, 17, 100], rows not contiguous
    target = base_t.transpose(0, 1)
    assert not pred.is_contiguous()
    _check(pred, target)
    wide_t = torch.randn(3, 17, 200, device=DEVICE).half()[..., ::2]  # last dim strided
    p2 = torch.randn(3, 17, 100, device=DEVICE, requires_grad=True)
    _check(p2, wide_t)
    # Column-major [rows, D] (a transposed [D, rows]): unit stride between rows, not along them.
    cm_p = torch.randn(100, 51, device=DEVICE).T.requires_grad_()
    cm_t = torch.randn(100, 51, device=DEVICE).half().T
    assert cm_p.stride() == (1, 51) and cm_t.stride() == (1, 51)
    _check(cm_p, cm_t)


@pytest.mark.gpu
@compiled_kernels
def test_reduction_is_deterministic():
    """Bit-identical loss and gradient run after run on a GPU, where a float-atomic reduction
    would not be (the interpreter runs programs one by one: it cannot show this)."""
    pred, target = _inputs((64, 197, 768), torch.float32)
    pred, target = pred.detach().cuda(), target.cuda()
    runs = []
    for _ in range(5):
        p = pred.clone().requires_grad_()
        loss = fd_loss(p, target, impl="triton")
        loss.backward()
        runs.append((loss.detach(), p.grad))
    assert all(torch.equal(a, runs[0][0]) and torch.equal(g, runs[0][1]) for a, g in runs[1:])


def test_reference_gradient_passes_finite_differences():
    pred = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: fd_loss_reference(p, target, beta=0.7), (pred,))


def test_reference_equals_fd_definition():
    pred, target = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    want = torch.nn.SmoothL1Loss(beta=2.0)(pred, torch.nn.LayerNorm(16, elementwise_affine=False)(target))
    torch.testing.assert_close(fd_loss_reference(pred, target), want)


def test_bad_inputs_are_rejected_clearly():
    p = torch.randn(2, 3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="differ in shape"):
        fd_loss(p, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="qparams"):
        fd_loss(p, torch.zeros(2, 3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="reduction"):
        fd_loss(p, torch.randn(2, 3, 8), reduction="max")


def test_second_backward_through_the_kernel_is_refused():
    pred, target = _inputs((1, 2, 8), torch.float32)
    loss = fd_loss(pred, target, impl="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


@pytest.mark.skipif(not INTERPRETED, reason="checks the choice made under the interpreter")
def test_auto_uses_triton_under_the_interpreter_and_the_reference_otherwise(monkeypatch):
    pred, target = _inputs((1, 2, 8), torch.float32, device="cpu")
    assert fd_loss(pred, target).grad_fn.name().startswith("_FDLoss")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "_FDLoss" not in fd_loss(pred, target).grad_fn.name()


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernel_on_gpu_matches_reference(dtype):
    pred, target = _inputs((8, 197, 768), dtype)
    pred = pred.detach().cuda().requires_grad_()
    target = target.cuda()
    ref_loss, ref_grad, grad_out = _reference(pred, target)
    loss = fd_loss(pred, target)
    loss.backward(grad_out.cuda())
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pred.grad.double().cpu(), ref_grad, rtol=TOL[dtype],
                               atol=TOL[dtype] * ref_grad.abs().max().item())


def test_launch_config_is_its_definition_at_the_one_block_boundary():
    """A row up to ONE_BLOCK_MAX (8192) wide is one block of the next power of two; wider rows
    loop in blocks of 4096. Warps: each thread holds 16 bytes of the narrowest input's row."""
    assert kmod.launch_config(768) == {"BLOCK_D": 1024, "ONE_BLOCK": True, "num_warps": 4}  # 1024 / (32 * 8)
    assert kmod.launch_config(768, min_itemsize=1) == {"BLOCK_D": 1024, "ONE_BLOCK": True, "num_warps": 2}
    assert kmod.launch_config(8192) == {"BLOCK_D": 8192, "ONE_BLOCK": True, "num_warps": 16}  # 32 capped at 16
    assert kmod.launch_config(8193) == {"BLOCK_D": 4096, "ONE_BLOCK": False, "num_warps": 16}
    assert kmod.launch_config(20) == {"BLOCK_D": 32, "ONE_BLOCK": True, "num_warps": 1}
