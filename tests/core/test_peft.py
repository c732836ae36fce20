"""PEFT / LoRA: a LightningModule whose model is wrapped by ``peft.get_peft_model`` trains under slideformer as
under plain Lightning, and its frozen base weights cost no fp32 master and no optimizer state (with bf16 compute
they live on the host in bf16 only, 2 bytes per parameter)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_slide
from tests.core.tiny import TinyLM, batches, initial_state, relative_error, trainer

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5  # fp32, as tests/core/test_parity.py
# The adapters' weights: Adam at lr=1e-2 turns rounding in their small gradients into whole update steps, which the
# CPU's kernels order differently from machine to machine (up to 1.4e-5 seen on an AMD EPYC host)
ADAPTER_TOLERANCE = 3e-5
# bf16-true: plain Lightning keeps the adapters and Adam's moments in bf16, slideformer in fp32 (the masters), so
# the adapters drift apart by the rounding of each update (an Adam step of lr=1e-2 is a few bf16 ulps of a weight
# near 0.1); the losses stay close. Both sides run bf16 matmuls (on the CPU in tests: torch's CPU bf16 kernels).
LOSS_TOLERANCE_BF16 = 2e-3
ADAPTER_TOLERANCE_BF16 = 1e-1
STEPS = 8


class LoraLM(TinyLM):
    """A user's LoRA module: the tiny HF model wrapped by PEFT (rank 4 on every linear layer but the head)."""

    def __init__(self, family: str, rank: int = 4) -> None:
        torch.manual_seed(123)  # the adapters' initialisation
        super().__init__(family, initial_state(family), lr=1e-2, warmup=2)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
        self.model = peft.get_peft_model(self.model, config)
        self.initial = {n: p.detach().clone() for n, p in self.named_parameters()}


class HostBytes(L.Callback):
    """The engine's host bytes and its units at the end of training (before teardown releases scratch memory)."""

    def on_train_end(self, trainer, module):
        engine = trainer.strategy.engine
        self.host = engine.host_bytes()
        self.layers = engine.layers
        self.resident = engine.resident


def train(family, strategy, *, precision="32-true", accumulate=2, clip=0.5, callbacks=()):
    module = LoraLM(family)
    trainer(
        strategy,
        precision=precision,
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        callbacks=list(callbacks),
    ).fit(module, batches(STEPS * accumulate))
    return module


_plain: dict = {}


def plain(family, **options):
    key = (family, tuple(sorted(options.items())))
    if key not in _plain:
        _plain[key] = train(family, "auto", **options)
    return _plain[key]


def frozen(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if not p.requires_grad}


def assert_frozen_unchanged(module, dtype):
    """Every frozen parameter holds its initial value in ``dtype`` (rounded once): the decoder layers' and the
    resident parts' (embeddings, head, final norm: LoRA trains none of them)."""
    for name, param in frozen(module).items():
        expected = dtype
        assert param.device.type == "cpu" and param.dtype == expected, (name, param.dtype)
        assert torch.equal(param.detach(), module.initial[name].to(expected)), name


@pytest.mark.parametrize(
    ("family", "window", "device_layers"),
    [("llama", 1, 0), ("llama", 2, 0), ("qwen3", 1, 0), ("qwen3", 2, 0), ("llama", 1, 2)],
)
def test_lora_equals_plain_training_in_fp32(family, window, device_layers):
    reference = plain(family)
    strategy = lightning_slide.SlideFormerStrategy(window=window, tuning=dict(device_layers=device_layers))
    ours = train(family, strategy)
    assert len(ours.losses) == len(reference.losses) > 0
    for step, (a, b) in enumerate(zip(ours.losses, reference.losses)):
        assert abs(a - b) <= TOLERANCE * abs(b), f"loss {step}: {a} vs {b}"
    assert sum(reference.losses[-4:]) < sum(reference.losses[:4])  # the adapters learned
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert param.dtype == torch.float32
        assert relative_error(param.detach(), theirs[name].detach()) <= ADAPTER_TOLERANCE, name
    assert_frozen_unchanged(ours, torch.float32)


@pytest.mark.parametrize(
    "family,window,accumulate,clip",
    [
        ("llama", 1, 2, 0.5),
        ("llama", 2, 2, 0.5),
        ("qwen3", 2, 2, 0.5),
        ("llama", 2, 1, None),  # no clipping, one micro-batch: the updates stream out of the backward
    ],
)
def test_lora_in_bf16_keeps_frozen_weights_in_bf16_only(family, window, accumulate, clip):
    options = {"precision": "bf16-true", "accumulate": accumulate, "clip": clip}
    reference = plain(family, **options)
    seen = HostBytes()
    ours = train(family, lightning_slide.SlideFormerStrategy(window=window), callbacks=[seen], **options)
    assert len(ours.losses) == len(reference.losses) > 0
    for step, (a, b) in enumerate(zip(ours.losses, reference.losses)):
        assert abs(a - b) <= LOSS_TOLERANCE_BF16 * abs(b), f"loss {step}: {a} vs {b}"
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:  # the adapters: fp32 masters here, bf16 in plain Lightning
            assert param.dtype == torch.float32 and not torch.equal(param, ours.initial[name]), name
            assert relative_error(param.detach(), theirs[name].detach()) <= ADAPTER_TOLERANCE_BF16, name
    assert_frozen_unchanged(ours, torch.bfloat16)
    for name, param in frozen(ours).items():  # what plain bf16-true computes with too
        assert torch.equal(param.detach().bfloat16(), theirs[name].detach()), name

    # Host memory: fp32 masters only for the adapters, 2 bytes per frozen parameter (the layers' and the resident
    # parts', none of which LoRA trains).
    layer_frozen = sum(p.numel() for n, p in frozen(ours).items() if ".layers." in n)
    adapters = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    resident = sum(p.numel() for n, p in ours.named_parameters() if ".layers." not in n)
    assert seen.host["fp32 masters"] == 4 * adapters
    assert seen.host["frozen weights"] == 2 * (layer_frozen + resident) > 2 * layer_frozen > 0
    assert seen.resident.master.numel() == 0 and seen.resident.frozen.dtype == torch.bfloat16
    assert seen.host["compute copies"] == 0
    assert seen.host["optimizer state"] == 8 * adapters  # Adam's moments of the adapters only
    for unit in seen.layers:
        assert unit.master.numel() == unit.trainable_numel and unit.frozen.dtype == torch.bfloat16


def test_frozen_resident_parts_go_up_once(monkeypatch):
    """Nothing trains the embeddings, final norm and head of a LoRA run: their compute copy is uploaded once for the
    run, not before every step, and training is unchanged."""
    from lightning_slide.engine import resident as resident_module

    uploads = []
    real = resident_module.copy_cast

    def counting(dst, src, staging):
        uploads.append(src.numel())
        real(dst, src, staging)

    monkeypatch.setattr(resident_module, "copy_cast", counting)
    options = {"precision": "bf16-true", "accumulate": 1, "clip": None}
    reference = plain("llama", **options)
    ours = train("llama", lightning_slide.SlideFormerStrategy(window=2), **options)
    for step, (a, b) in enumerate(zip(ours.losses, reference.losses, strict=True)):
        assert abs(a - b) <= LOSS_TOLERANCE_BF16 * abs(b), f"loss {step}: {a} vs {b}"
    resident = sum(p.numel() for n, p in ours.named_parameters() if ".layers." not in n)
    assert STEPS > 1 and sum(uploads) == resident  # its pieces, once


def test_frozen_layers_and_parts_of_layers_in_bf16():
    """Not only LoRA: a whole frozen layer (no fp32 master at all) and a layer frozen in part, in bf16."""

    def run(strategy, callbacks=()):
        module = TinyLM("llama", initial_state("llama"), freeze=("layers.1.", "layers.2.mlp", "embed_tokens"))
        trainer(strategy, precision="bf16-true", max_steps=STEPS, callbacks=list(callbacks)).fit(
            module, batches(2 * STEPS)
        )
        return module

    seen = HostBytes()
    reference, ours = run("auto"), run(lightning_slide.SlideFormerStrategy(window=1), [seen])
    for a, b in zip(ours.losses, reference.losses, strict=True):
        assert abs(a - b) <= LOSS_TOLERANCE_BF16 * abs(b)
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert relative_error(param.detach(), theirs[name].detach()) <= ADAPTER_TOLERANCE_BF16, name
        else:
            assert torch.equal(param.detach().bfloat16(), theirs[name].detach()), name
            assert param.dtype == (torch.bfloat16 if ".layers." in name else torch.float32), name
    assert seen.layers[1].master.numel() == 0 and seen.layers[0].frozen is None
    assert 0 < seen.layers[2].master.numel() < seen.layers[2].numel


def test_lora_with_a_host_compute_copy_uploads_the_same_values():
    """host_weights="compute": the frozen weights are the compute copy's frozen part (no second bf16 copy)."""
    options = {"precision": "bf16-true"}
    seen = HostBytes()
    copied = train(
        "llama",
        lightning_slide.SlideFormerStrategy(window=2, tuning=dict(host_weights="compute")),
        callbacks=[seen],
        **options,
    )
    masters = train("llama", lightning_slide.SlideFormerStrategy(window=2, tuning=dict(host_weights="fp32")), **options)
    assert copied.losses == masters.losses
    theirs = dict(masters.named_parameters())
    for name, param in copied.named_parameters():
        assert torch.equal(param, theirs[name]), name
    layer_params = sum(p.numel() for n, p in copied.named_parameters() if ".layers." in n)
    resident = sum(p.numel() for n, p in copied.named_parameters() if ".layers." not in n)  # no compute copy there
    assert seen.host["compute copies"] == 2 * layer_params and seen.host["frozen weights"] == 2 * resident
    for unit in seen.layers:
        assert unit.frozen.data_ptr() == unit.weights[unit.trainable_numel :].data_ptr()


@pytest.mark.parametrize("offload", ["optimizer", "both"])
def test_lora_with_the_disk_tier_trains_as_in_memory(tmp_path, offload):
    """The adapters' Adam moments on disk; with the masters on disk too the frozen weights keep fp32 masters there
    (the layers' bf16 compute copy is then what the host holds), and training is the same."""
    on_disk = train(
        "llama",
        lightning_slide.SlideFormerStrategy(window=2, offload_dir=str(tmp_path), offload=offload),
        precision="bf16-true",
    )
    in_memory = train("llama", lightning_slide.SlideFormerStrategy(window=2), precision="bf16-true")
    assert on_disk.losses == in_memory.losses
    theirs = dict(in_memory.named_parameters())
    for name, param in on_disk.named_parameters():
        assert torch.equal(param.detach().to(theirs[name].dtype), theirs[name].detach()), name


def test_lora_checkpoint_saves_bf16_frozen_weights_and_resumes_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import load_file

    def run(steps, ckpt_path=None, directory=tmp_path / "ckpt"):
        module = LoraLM("qwen3")
        saver = ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=1, every_n_train_steps=1)
        trainer(
            lightning_slide.SlideFormerStrategy(window=1),
            precision="bf16-true",
            max_steps=steps,
            max_epochs=-1,
            enable_checkpointing=True,
            callbacks=[saver],
        ).fit(module, batches(2), ckpt_path=ckpt_path)
        return module

    first = run(3)
    layer = load_file(tmp_path / "ckpt" / "last.ckpt" / "model" / "layer-00001.safetensors")
    for name, tensor in layer.items():  # frozen base weights as the run keeps them: bf16; adapters: fp32 masters
        assert tensor.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    resumed = run(6, ckpt_path="last")
    uninterrupted = run(6, directory=tmp_path / "other")
    assert first.losses == uninterrupted.losses[:6] and resumed.losses == uninterrupted.losses[6:]
    theirs = dict(uninterrupted.named_parameters())
    for name, param in resumed.named_parameters():
        assert param.dtype == theirs[name].dtype and torch.equal(param, theirs[name]), name
    assert_frozen_unchanged(resumed, torch.bfloat16)
