import math

import pytest
import torch

from lightning_slide.kernels import swiglu


def reference(g, u, activation):
    """act(g) * u from the definitions, in fp32 (tanh-GeLU written out, not torch's gelu)."""
    g, u = g.float(), u.float()
    if activation == "silu":
        act = g / (1 + torch.exp(-g))
    else:
        act = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    return act * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 77), (2, 3001)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_swiglu_matches_reference(dtype, shape, activation, assert_close):
    g = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    u = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)

    y = swiglu(g, u, activation)
    y.backward(dy)

    gr, ur = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    yr = reference(gr, ur, activation)
    yr.backward(dy.float())

    assert y.dtype == dtype and y.grad_fn.name() == "_GLUBackward"
    assert_close(y, yr, dtype)
    assert_close(g.grad, gr.grad, dtype)
    assert_close(u.grad, ur.grad, dtype)


def test_swiglu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        swiglu(torch.ones(3), torch.ones(3), "relu")
    with pytest.raises(ValueError, match="match"):
        swiglu(torch.ones(3), torch.ones(4))
