import pytest
import torch

from lightning_slide.kernels import rms_norm


def reference(x, w, eps, offset):
    """RMSNorm from its definition, in fp32."""
    x, w = x.float(), w.float()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (3, 7, 100), (5, 257), (2, 3, 1000)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_matches_reference(dtype, shape, offset, assert_close):
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    w = torch.randn(shape[-1]).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    eps = 1e-5

    y = rms_norm(x, w, eps=eps, offset=offset)
    y.backward(dy)

    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = reference(xr, wr, eps, offset)
    yr.backward(dy.float())

    assert y.dtype == dtype and y.shape == x.shape and y.grad_fn.name() == "_RMSNormBackward"
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(y, yr, dtype)
    assert_close(x.grad, xr.grad, dtype)
    assert_close(w.grad, wr.grad, dtype)


def test_rmsnorm_non_contiguous_input(assert_close):
    # Qwen3 / Gemma3 normalise q and k per head after a transpose: a strided input must give the same result.
    x = torch.randn(2, 5, 3, 16).transpose(1, 2).requires_grad_()
    w = torch.randn(16, requires_grad=True)
    y = rms_norm(x, w, eps=1e-6)
    y.backward(torch.ones_like(y))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = reference(xr, wr, 1e-6, 0.0)
    yr.backward(torch.ones_like(yr))
    assert_close(y, yr, torch.float32)
    assert_close(x.grad, xr.grad, torch.float32)
    assert_close(w.grad, wr.grad, torch.float32)
