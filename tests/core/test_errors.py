"""Bad input gets a clear error that names what to change, before anything large is allocated."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

import lightning_slide
from tests.core.tiny import TinyLM, batches, initial_state, trainer


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true", "64-true"])
def test_unsupported_precision(precision):
    with pytest.raises(ValueError, match="supports precision 'bf16-true' or '32-true'"):
        trainer("slideformer", precision=precision)


@pytest.mark.parametrize("window", [0, -1, 1.5, "2", True])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        lightning_slide.SlideFormerStrategy(window=window)


class NoBlocks(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0].float()).sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def test_unknown_architecture():
    with pytest.raises(ValueError, match="Cannot find the decoder layers of NoBlocks.*blocks="):
        trainer("slideformer").fit(NoBlocks(), batches(2))


def test_blocks_path_that_is_not_a_block_list():
    module = TinyLM("llama", initial_state("llama"))
    with pytest.raises(ValueError, match="blocks='model.model.norm' must name an nn.ModuleList"):
        trainer(lightning_slide.SlideFormerStrategy(blocks="model.model.norm")).fit(module, batches(2))
    with pytest.raises(ValueError, match="does not name a submodule"):
        trainer(lightning_slide.SlideFormerStrategy(blocks="model.nothing")).fit(module, batches(2))


def test_explicit_blocks_path_trains():
    module = TinyLM("llama", initial_state("llama"))
    trainer(lightning_slide.SlideFormerStrategy(blocks="model.model.layers"), max_steps=1).fit(module, batches(2))


def test_unsupported_optimizer():
    module = TinyLM("llama", initial_state("llama"), optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
    with pytest.raises(ValueError, match="supports torch.optim.AdamW, torch.optim.Adam.*SGD"):
        trainer("slideformer").fit(module, batches(2))


def test_manual_optimization():
    module = TinyLM("llama", initial_state("llama"))
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer("slideformer", gradient_clip_val=None, accumulate_grad_batches=1).fit(module, batches(2))


def test_unknown_start_method():
    with pytest.raises(ValueError, match="start_method"):
        lightning_slide.SlideFormerStrategy(start_method="thread")


def test_failed_fit_leaves_the_model_usable():
    module = TinyLM("llama", initial_state("llama"))

    def explode(batch, batch_idx):
        raise RuntimeError("boom")

    module.training_step = explode
    with pytest.raises(RuntimeError, match="boom"):
        trainer("slideformer").fit(module, batches(2))
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
    assert "forward" not in module.model.model.layers[0].__dict__  # the window's wrapper is gone
    assert not [t for t in __import__("threading").enumerate() if t.name.startswith("slide-update")]


@pytest.mark.parametrize(
    "text, size", [("24GiB", 24 * 2**30), ("22.5 GB", 22_500_000_000), (1024, 1024), ("1.5KiB", 1536)]
)
def test_memory_sizes(text, size):
    assert lightning_slide.SlideFormerStrategy(gpu_memory_limit=text).options.gpu_memory_limit == size


@pytest.mark.parametrize("text", ["24 gigs", "-1GiB", "", True])
def test_bad_memory_size(text):
    with pytest.raises(ValueError, match="memory size"):
        lightning_slide.SlideFormerStrategy(gpu_memory_limit=text)


def test_window_that_cannot_fit_the_memory_limit():
    module = TinyLM("llama", initial_state("llama"))
    strategy = lightning_slide.SlideFormerStrategy(window=4, gpu_memory_limit="100KiB")
    with pytest.raises(
        ValueError,
        match=r"(?s)GPU: needs \d+\.\d\d KiB, more than the 100\.00 KiB available.*window slots"
        r".*lower the window \(now 4\)",
    ):
        trainer(strategy).fit(module, batches(2))
    assert all(p.device.type == "cpu" for p in module.parameters())


def test_memory_limit_that_fits_trains():
    trainer(lightning_slide.SlideFormerStrategy(window=2, gpu_memory_limit="1GiB"), max_steps=1).fit(
        TinyLM("llama", initial_state("llama")), batches(2)
    )


def test_a_decoder_layer_weight_used_outside_its_forward():
    # Outside its forward a layer's parameter is parked on its fp32 host master. With bf16 compute (as on any GPU,
    # where the device changes too) autograd gives the loss term its own gradient accumulator, whose gradient
    # arrives outside the layer's backward; the engine must say so rather than train on a partial gradient.
    class Regularized(TinyLM):
        def training_step(self, batch, batch_idx):
            weight = self.model.model.layers[1].mlp.down_proj.weight
            return super().training_step(batch, batch_idx) + 1e-3 * weight.float().square().sum()

    module = Regularized("llama", initial_state("llama"))
    with pytest.raises(RuntimeError, match=r"layer 1 arrived after .* used only inside its forward"):
        trainer("slideformer", precision="bf16-true").fit(module, batches(4))
