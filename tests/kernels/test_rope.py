import pytest
import torch

from lightning_slide.kernels import apply_rope


def reference(q, k, cos, sin, unsqueeze_dim=1):
    """x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1], in fp32."""
    cos, sin = cos.float().unsqueeze(unsqueeze_dim), sin.float().unsqueeze(unsqueeze_dim)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    q, k = q.float(), k.float()
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def angles(b, t, d, hf_style):
    if hf_style:  # HF: the two halves carry the same frequencies
        f = torch.randn(b, t, d // 2) * 3
        emb = torch.cat((f, f), dim=-1)
    else:  # distinct halves: catches a kernel that reads one half for both
        emb = torch.randn(b, t, d) * 3
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,HKV,T,D", [(1, 1, 1, 1, 2), (2, 4, 2, 5, 6), (2, 6, 3, 7, 20)])
@pytest.mark.parametrize("layout", ["hf_transposed", "contiguous"])
@pytest.mark.parametrize("cos_batch", ["full", "one", "2d"])
@pytest.mark.parametrize("hf_style", [True, False])
def test_rope_matches_reference(dtype, B, H, HKV, T, D, layout, cos_batch, hf_style, assert_close):
    if layout == "hf_transposed":  # what HF attention passes: [B, T, H, D] projections viewed as [B, H, T, D]
        q = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)
        k = torch.randn(B, T, HKV, D).to(dtype).transpose(1, 2)
    else:
        q, k = torch.randn(B, H, T, D).to(dtype), torch.randn(B, HKV, T, D).to(dtype)
    q.requires_grad_(), k.requires_grad_()
    cos, sin = angles(B if cos_batch == "full" else 1, T, D, hf_style)
    if cos_batch == "2d":
        cos, sin = cos[0], sin[0]
    cos, sin = cos.to(dtype), sin.to(dtype)
    dq, dk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)

    qe, ke = apply_rope(q, k, cos, sin)
    (qe.float() * dq.float()).sum().add((ke.float() * dk.float()).sum()).backward()

    qr, kr = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    c, s = (cos.unsqueeze(0), sin.unsqueeze(0)) if cos_batch == "2d" else (cos, sin)
    qer, ker = reference(qr, kr, c, s)
    (qer * dq.float()).sum().add((ker * dk.float()).sum()).backward()

    assert qe.grad_fn.name() == "_RoPEBackward" and qe.dtype == dtype and qe.shape == q.shape
    assert_close(qe, qer, dtype)
    assert_close(ke, ker, dtype)
    assert_close(q.grad, qr.grad, dtype)
    assert_close(k.grad, kr.grad, dtype)


def test_rope_unsupported_layout_falls_back(assert_close):
    # unsqueeze_dim=2 ([B, T, H, D] inputs) is not the kernel's layout: the torch path must still be right.
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = angles(2, 5, 8, True)
    qe, ke = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    qer, ker = reference(q, k, cos, sin, unsqueeze_dim=2)
    assert qe.grad_fn is None or qe.grad_fn.name() != "_RoPEBackward"
    assert_close(qe, qer, torch.float32)
    assert_close(ke, ker, torch.float32)
