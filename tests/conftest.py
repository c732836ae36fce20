import dataclasses
import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter when there is no GPU; it must be set before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _every_layer_slides_on_a_gpu(monkeypatch):
    """With no cap, tuning.device_layers="auto" keeps none of a tiny test model's layers on the CPU but all of them
    but one on a GPU: the GPU suite runs what the CPU suite runs (every layer sliding through real CUDA copies), and
    the tests of "auto" ask for it by name."""
    if os.environ.get("SLIDE_TEST_ACCELERATOR") != "gpu":
        return
    from lightning_slide.engine.options import Tuning

    names = [field.name for field in dataclasses.fields(Tuning)]
    defaults = list(Tuning.__init__.__defaults__)
    defaults[names.index("device_layers")] = 0
    monkeypatch.setattr(Tuning.__init__, "__defaults__", tuple(defaults))
