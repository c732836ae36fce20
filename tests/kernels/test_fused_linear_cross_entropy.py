import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_slide.kernels import fused_linear_cross_entropy


def reference(h, w, y, ignore_index=-100, reduction="mean", softcap=None):
    """Cross-entropy of the full fp32 logits (what the fused op must equal without building them)."""
    logits = h.float() @ w.float().t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = y != ignore_index
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    total = (nll * keep).sum()
    return total / keep.sum() if reduction == "mean" else total


def make(n, h, v, dtype, ignore_every=3):
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) / h**0.5 * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,))
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V,chunk", [(1, 8, 5, None), (37, 48, 300, 16), (20, 24, 5000, 7)])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flce_matches_reference(dtype, N, H, V, chunk, softcap, reduction, assert_close):
    hidden, weight, labels = make(N, H, V, dtype, ignore_every=3 if N > 1 else None)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, softcap=softcap, chunk_size=chunk)
    (loss * 0.7).backward()  # a non-unit incoming gradient must scale both gradients

    hr, wr = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = reference(hr, wr, labels, reduction=reduction, softcap=softcap)
    (ref * 0.7).backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert_close(loss, ref, dtype)
    assert_close(hidden.grad, hr.grad, dtype)
    assert_close(weight.grad, wr.grad, dtype)


def test_flce_follows_autocast():
    """Under autocast (``bf16-mixed``: fp32 parameters) the GEMMs run in its dtype, as the stock head's
    ``nn.Linear`` does; the gradients reach the fp32 inputs in fp32."""
    hidden, weight, labels = make(37, 48, 300, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    loss.backward()
    in_bf16 = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
    expected = fused_linear_cross_entropy(*in_bf16, labels, chunk_size=16)
    expected.backward()
    assert torch.equal(loss, expected)
    for given, cast in zip((hidden, weight), in_bf16, strict=True):
        assert given.grad.dtype == torch.float32 and torch.equal(given.grad, cast.grad.float())


def test_flce_batched_labels_and_custom_ignore_index(assert_close):
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(70, 16, requires_grad=True)
    labels = torch.randint(0, 70, (2, 9))
    labels[1, 4:] = 7  # ignore_index=7 drops these, and any 7 drawn at random
    loss = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=7)
    loss.backward()
    hr, wr = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = reference(hr.reshape(-1, 16), wr, labels.reshape(-1), ignore_index=7)
    ref.backward()
    assert hidden.grad.shape == hidden.shape
    assert_close(loss, ref, torch.float32)
    assert_close(hidden.grad, hr.grad, torch.float32)
    assert_close(weight.grad, wr.grad, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flce_all_labels_ignored_gives_zero(reduction):
    hidden, weight, labels = make(6, 8, 40, torch.float32)
    labels[:] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_flce_only_requested_gradients(assert_close):
    hidden, weight, labels = make(10, 8, 30, torch.float32)
    weight.requires_grad_(False)  # a frozen head
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        loss_ng = fused_linear_cross_entropy(hidden, weight, labels)
    assert loss_ng.grad_fn is None
    assert_close(loss_ng, reference(hidden, weight, labels), torch.float32)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_flce_never_reads_a_device_value_on_the_host():
    # .item(), bool(tensor) and data-dependent shapes all go through these ops; a sync-free op calls none of them.
    hidden, weight, labels = make(12, 8, 50, torch.float32)
    with _Ops() as ops:
        fused_linear_cross_entropy(hidden, weight, labels, softcap=2.0, chunk_size=5).backward()
    assert "aten.mm" in ops.seen  # the mode did see the op's work
    assert not ops.seen & {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique"}


def test_flce_rejects_bad_arguments():
    hidden, weight, labels = make(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
