"""Page-locked host buffers of exactly the size asked for (the pinned path needs a CUDA machine)."""

import gc
from pathlib import Path

import pytest
import torch

from lightning_slide.engine.pinned import EXACT_FROM_BYTES, anonymous_buffer, host_empty


def test_unpinned_buffer_is_a_plain_tensor():
    buffer = host_empty(1000, torch.float32, pin=False)
    assert buffer.shape == (1000,) and buffer.dtype == torch.float32 and not buffer.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA")
def test_large_pinned_buffer_is_exact_page_locked_and_outlives_its_first_tensor():
    numel = EXACT_FROM_BYTES  # 4 MiB of fp32: above the threshold, not a power of two once offset below
    buffer = host_empty(numel + 12345, torch.float32, pin=True)
    assert buffer.numel() == numel + 12345 and buffer.is_pinned()
    view = buffer[100:200]
    del buffer
    gc.collect()
    view.fill_(2.0)  # still mapped and registered while a view lives
    device = view.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert device.sum().item() == 200.0


def _vm_flags(address: int) -> list[str]:
    """The kernel's flags of the mapping holding ``address`` (``/proc/self/smaps``)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise LookupError(hex(address))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("huge", [False, True])
def test_large_buffers_follow_torchs_transparent_huge_page_setting(monkeypatch, huge):
    if huge:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    else:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    buffer = anonymous_buffer(8 << 20)
    tensor = torch.frombuffer(buffer, dtype=torch.uint8)
    assert ("hg" in _vm_flags(tensor.data_ptr())) == huge
