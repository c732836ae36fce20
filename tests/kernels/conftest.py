import pytest
import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise within `TOL[dtype]` relative, with an absolute floor of the same fraction of the largest
    expected magnitude (entries near zero after cancellation carry the error of the large ones)."""
    tol = TOL[dtype]
    expected = expected.detach().float()
    floor = tol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().float(), expected, rtol=tol, atol=floor)


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
