"""``tuning.device_layers``: the first decoder layers kept and updated on the compute device train exactly as the
others (and as plain Lightning), in every step mode, and come back to the host for checkpoints and after the run."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide import optim
from tests.core.test_parity import TOLERANCE, assert_same_training, train
from tests.core.tiny import (
    ACCELERATOR,
    TinyLM,
    assert_resumes_exactly,
    batches,
    growing_batches,
    inf_grad,
    initial_state,
    relative_error,
    trainer,
)


class Records(L.Callback):
    """What the engine did with the layers kept on the device."""

    def __init__(self) -> None:
        self.device_layers, self.loaded, self.host_updated = None, set(), set()

    def on_train_start(self, trainer, pl_module):
        engine = trainer.strategy.engine
        self.device_layers = sorted(engine.device_layers)
        window, before_load = engine.window, engine.window.before_load

        def spy(index):
            self.loaded.add(index)
            before_load(index)

        window.before_load = spy  # called for every layer the window loads: which layers ever slide through it
        submit = engine.updates.submit

        def submitted(key, *args, **kwargs):
            self.host_updated.add(key)
            submit(key, *args, **kwargs)

        engine.updates.submit = submitted


@pytest.mark.parametrize(
    ("accumulate", "clip", "algorithm", "window", "resident"),
    [
        (2, 0.5, "norm", 1, "host"),  # accumulated on the device, updated once the global norm is known
        (1, None, "norm", 2, "host"),  # a streamed step: updated at the end of its backward
        (1, 0.5, "norm", 1, "device"),  # with the resident parts on the device too
        (2, 0.002, "value", 2, "host"),
    ],
)
def test_layers_kept_on_the_device_train_as_plain_lightning(accumulate, clip, algorithm, window, resident):
    options = dict(gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    torch.manual_seed(123)
    plain = TinyLM("llama", initial_state("llama"))
    trainer("auto", max_steps=6, accumulate_grad_batches=accumulate, **options).fit(plain, batches(6 * accumulate))
    records = Records()
    strategy = lightning_slide.SlideFormerStrategy(
        window=window, tuning=dict(device_layers=2, resident_optimizer=resident)
    )
    torch.manual_seed(123)
    ours = TinyLM("llama", initial_state("llama"))
    run = trainer(strategy, max_steps=6, accumulate_grad_batches=accumulate, callbacks=[records], **options)
    run.fit(ours, batches(6 * accumulate))
    assert_same_training(ours, plain)
    assert records.device_layers == [0, 1]
    assert records.loaded == {2, 3}  # the layers kept on the device never slide
    assert not records.host_updated & {0, 1}  # nor does the host update them
    assert all(p.device.type == "cpu" for p in ours.parameters())  # after the run: the host masters


def test_device_layers_parity_with_the_default_suite_model():
    plain = train("qwen3", "auto")
    ours = train("qwen3", lightning_slide.SlideFormerStrategy(window=1, tuning=dict(device_layers=1)))
    assert_same_training(ours, plain)


def test_hooks_see_the_device_layers_gradients_and_weights():
    seen = {}

    class Look(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            weight = pl_module.model.model.layers[0].mlp.up_proj.weight
            seen.setdefault("grad", weight.grad is not None and weight.grad.dtype == torch.float32)
            seen.setdefault("weight", weight.dtype == torch.float32)
            weight.grad.zero_()  # what the hook does is what the step uses

    strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=dict(device_layers=1))
    torch.manual_seed(123)
    module = TinyLM("llama", initial_state("llama"), lr=3e-3, warmup=1)
    before = module.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer(strategy, max_steps=1, accumulate_grad_batches=1, gradient_clip_val=None, callbacks=[Look()]).fit(
        module, batches(1)
    )
    assert seen == {"grad": True, "weight": True}
    after = module.model.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(after, before * (1 - 3e-3 * 0.1))  # a zero gradient: weight decay alone


def test_a_nan_in_a_device_layer_skips_the_step():
    class Poison(TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 1:
                loss = loss + inf_grad(self.model.model.layers[0].mlp.up_proj.weight)
            return loss

    strategy = lightning_slide.SlideFormerStrategy(window=1, nonfinite="skip", tuning=dict(device_layers=1))
    module = Poison("llama", initial_state("llama"))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(strategy, max_steps=1, accumulate_grad_batches=2, gradient_clip_val=None).fit(module, batches(2))
    for name, param in module.named_parameters():
        assert torch.equal(param, before[name]), name  # the one step was skipped: nothing moved


def test_checkpoint_and_resume_with_device_layers(tmp_path):
    tuning = dict(device_layers=2)
    assert_resumes_exactly(tmp_path, lambda: lightning_slide.SlideFormerStrategy(window=1, tuning=tuning))


@pytest.mark.parametrize(
    ("tuning", "options", "message"),
    [
        (dict(device_layers=4), {}, "at least one of the 4 layers must slide"),
        (dict(device_layers=1), dict(offload_dir="DIR", offload="both"), "masters on disk"),
        (dict(device_layers=-1), {}, "tuning.device_layers must be a non-negative integer or .auto."),
    ],
)
def test_impossible_device_layers_are_refused(tmp_path, tuning, options, message):
    if options.get("offload_dir") == "DIR":
        options["offload_dir"] = str(tmp_path)
    with pytest.raises(ValueError, match=message):
        strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=tuning, **options)
        trainer(strategy, max_steps=1).fit(TinyLM("llama", initial_state("llama")), batches(2))


def test_the_plan_counts_the_layers_kept_on_the_device_as_allocated():
    seen = {}

    class Snapshot(L.Callback):
        def on_train_end(self, trainer, pl_module):
            engine = trainer.strategy.engine
            seen["allocated"] = sum(
                t.nbytes
                for d in engine.device_layers.values()
                for t in (d.weights, d.grads, d.master, d.grad, *engine.updates.optimizers[d.key].state.values())
            )
            seen["plan"] = trainer.strategy.plan

    strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=dict(device_layers=2))
    trainer(strategy, max_steps=1, accumulate_grad_batches=1, callbacks=[Snapshot()]).fit(
        TinyLM("llama", initial_state("llama")), batches(2)
    )
    plan = seen["plan"]
    assert plan.gpu["layers kept on the device (weights, gradients, fp32 masters, Adam moments)"] == seen["allocated"]
    assert plan.settings.device_layers == 2
    host_adamw = plan.time["host AdamW"] * plan.machine.host_adamw_params_per_s
    resident = 0 if plan.settings.resident_on_device else plan.shape.resident_trainable
    assert host_adamw == 2 * plan.shape.layer_trainable + resident  # the 2 layers that slide (and the resident parts)


def test_device_layers_with_the_moments_of_the_others_on_disk(tmp_path):
    plain = train("llama", "auto")
    strategy = lightning_slide.SlideFormerStrategy(
        window=1, offload_dir=str(tmp_path), offload="optimizer", tuning=dict(device_layers=1)
    )
    ours = train("llama", strategy)
    assert_same_training(ours, plain)
    assert not any(tmp_path.glob("layer00000.*"))  # the layer on the device has no files
    assert any(tmp_path.glob("layer00001.*"))


def auto():
    """device_layers="auto" (the default; named, as the GPU suite keeps every layer sliding otherwise): as many as
    the first batch's plan leaves room for under the limit (all but one here)."""
    return lightning_slide.SlideFormerStrategy(window=1, gpu_memory_limit="1GiB", tuning=dict(device_layers="auto"))


def test_auto_keeps_what_the_first_batch_plan_allows_and_trains_the_same():
    records = Records()
    plain = train("llama", "auto")
    ours = train("llama", auto(), callbacks=[records])
    assert_same_training(ours, plain)
    assert records.device_layers == []  # at setup: none yet (the activations are not known before the first batch)
    assert records.loaded == {3}  # moved before the first forward: only the last layer ever slides
    assert not records.host_updated & {0, 1, 2}  # and the host never updates the three kept on the device


def test_auto_resumes_exactly(tmp_path):
    assert_resumes_exactly(tmp_path, auto)


class KeptPerBatch(L.Callback):
    def __init__(self) -> None:
        self.kept: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        engine = getattr(trainer.strategy, "engine", None)
        self.kept.append(None if engine is None else len(engine.device_layers))


def _growing_run(strategy, accumulate, clip, moments=torch.float32):
    """llama_deep trained on batches of 2 x 16 tokens, then of 2 x 64; the layers kept on the device per batch."""
    torch.manual_seed(123)
    optimizer = "adamw"  # torch's, as TinyLM builds it; else bf16 moments with its hyperparameters
    if moments != torch.float32:
        optimizer = functools.partial(optim.AdamW, lr=3e-3, betas=(0.9, 0.95), state_dtype=moments)
    module = TinyLM("llama_deep", initial_state("llama_deep"), optimizer=optimizer)
    kept = KeptPerBatch()
    options = dict(accumulate_grad_batches=accumulate, gradient_clip_val=clip, callbacks=[kept])
    trainer(strategy, max_steps=6 // accumulate, **options).fit(module, growing_batches(6))
    return module, kept.kept


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="a GPU's caching allocator reserves more than this tiny plan")
@pytest.mark.parametrize(
    ("accumulate", "clip", "moments"), [(1, None, torch.float32), (2, 0.05, torch.float32), (1, None, torch.bfloat16)]
)
def test_auto_lets_layers_slide_when_a_larger_batch_comes_and_trains_the_same(accumulate, clip, moments):
    """Padding each batch to its longest makes later batches longer than the first: "auto" plans each larger batch
    and lets the last layers kept on the device slide again (their masters, moments and, mid-accumulation, the
    gradients summed so far go with them), so that its activations fit. Training is unchanged."""
    plain, _ = _growing_run("auto", accumulate, clip, moments)
    # With fp32 moments this limit leaves room for 6 of the 24 layers beside 2 x 16 tokens' activations, and for 3
    # beside 2 x 64's.
    strategy = lightning_slide.SlideFormerStrategy(
        window=2, gpu_memory_limit="2000000", tuning=dict(device_layers="auto")
    )
    ours, kept = _growing_run(strategy, accumulate, clip, moments)
    short, long = (6, 3) if moments == torch.float32 else (7, 4)  # bf16 moments take less room on the device
    assert kept == [short] * 3 + [long] * 3  # with 2 micro-batches per step, the larger batch comes mid-step
    tolerance = TOLERANCE if moments == torch.float32 else 1e-4  # (as test_low_precision_adamw.py says why)
    assert len(ours.losses) == len(plain.losses) == 6
    for a, b in zip(ours.losses, plain.losses):
        assert abs(a - b) <= tolerance * abs(b)
    theirs = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        assert relative_error(param.detach(), theirs[name].detach()) <= tolerance, name


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="a GPU's caching allocator reserves more than this tiny plan")
def test_layers_letting_go_of_the_device_put_their_moments_on_disk_beside_the_others(tmp_path):
    """With the others' optimizer state on disk, a layer that slides again gets its files there too."""
    plain, _ = _growing_run("auto", 1, None)
    tuning = dict(device_layers="auto")
    options = dict(offload_dir=str(tmp_path), offload="optimizer", gpu_memory_limit="2000000", tuning=tuning)
    ours, kept = _growing_run(lightning_slide.SlideFormerStrategy(window=2, **options), 1, None)
    assert kept[0] > kept[-1] > 0
    assert_same_training(ours, plain)
    assert not any(tmp_path.glob(f"layer{kept[-1] - 1:05d}.*"))  # still on the device: no files
    assert any(tmp_path.glob(f"layer{kept[-1]:05d}.*"))  # slid again: files beside the others'
