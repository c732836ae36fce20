"""Code ML teams already have trains under slideformer as under plain Lightning: Hugging Face gradient checkpointing
left on, hooks that read or change a step, callbacks that read weights between steps."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities import grad_norm

import lightning_slide
from tests.core.test_parity import assert_same_training
from tests.core.tiny import ACCELERATOR, TinyLM, batches, initial_state, relative_error, trainer


def fit_both(module_class=TinyLM, *, strategy_options=None, callbacks=(), steps=6, **trainer_options):
    """Train ``module_class`` with plain Lightning and with slideformer on the same data; returns (ours, plain)."""
    options = dict(max_steps=steps, accumulate_grad_batches=1, gradient_clip_val=None)
    options.update(trainer_options)
    modules = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1, **(strategy_options or {}))):
        torch.manual_seed(123)
        module = module_class("llama", initial_state("llama"))
        made = [callback() for callback in callbacks]
        trainer(strategy, callbacks=made, **options).fit(module, batches(steps * options["accumulate_grad_batches"]))
        module.callbacks = made
        modules.append(module)
    return modules[1], modules[0]


# ------------------------------------------------------------------ Hugging Face gradient checkpointing left on
class _Checkpointed(TinyLM):
    reentrant = False

    def configure_model(self):
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": self.reentrant})
        self.mlp_calls = 0
        mlp = self.model.model.layers[0].mlp
        forward = mlp.forward  # counted by a wrapper: module hooks do not run in a checkpoint's recompute

        def counted(*args, **kwargs):
            self.mlp_calls += 1
            return forward(*args, **kwargs)

        mlp.forward = counted


class _Reentrant(_Checkpointed):
    reentrant = True


@pytest.mark.parametrize("module_class", [_Checkpointed, _Reentrant], ids=["non-reentrant", "reentrant"])
def test_hf_gradient_checkpointing_left_on(module_class):
    ours, plain = fit_both(module_class, steps=4, accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert_same_training(ours, plain)
    # Each micro-batch runs a layer twice, forward and one recompute, as plain checkpointed training does.
    assert ours.mlp_calls == plain.mlp_calls == 2 * 4 * 2
    assert all(layer.gradient_checkpointing for layer in ours.model.model.layers)  # left as the user set it


# ------------------------------------------------------------------ hooks between backward and step
class _LrZeroOnOddSteps(TinyLM):
    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step % 2:
            for group in optimizer.param_groups:
                group["lr"] = 0.0


class _LrZeroCallback(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step % 2:
            for group in optimizer.param_groups:
                group["lr"] = 0.0


def test_learning_rate_set_in_on_before_optimizer_step():
    """Streaming would have run the updates with the old learning rate before the hook ran."""
    ours, plain = fit_both(_LrZeroOnOddSteps)
    assert_same_training(ours, plain)


def test_learning_rate_set_by_a_callback():
    ours, plain = fit_both(callbacks=[_LrZeroCallback])
    assert_same_training(ours, plain)


class _ReadsAndChangesGradients(TinyLM):
    """Logs gradient norms after each backward and before each step (Lightning's grad_norm), halves the gradients in
    place after a backward and replaces the head's before the step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norms: list[dict] = []

    def on_after_backward(self):
        self.norms.append(grad_norm(self, norm_type=2))
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(0.5)

    def on_before_optimizer_step(self, optimizer):
        self.norms.append(grad_norm(self, norm_type=2))
        head = self.model.lm_head.weight
        head.grad = head.grad * 2.0


@pytest.mark.parametrize("resident", ["host", "device"])
def test_hooks_see_and_change_the_gradients(resident):
    ours, plain = fit_both(
        _ReadsAndChangesGradients,
        steps=4,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        strategy_options={"tuning": {"resident_optimizer": resident}},
    )
    assert_same_training(ours, plain)
    assert len(ours.norms) == len(plain.norms) == 4 * 3  # two micro-batches and one step each
    for mine, theirs in zip(ours.norms, plain.norms):
        assert mine.keys() == theirs.keys()
        for name in theirs:
            assert torch.allclose(mine[name].cpu(), theirs[name].cpu(), rtol=1e-5), name


class _StepsOnQuietGradients(TinyLM):
    """An overridden optimizer_step that runs the closure itself and skips the update when the gradients are large."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]))
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if norm > 2.0 else self.lr
        optimizer.step()


def test_overridden_optimizer_step():
    ours, plain = fit_both(_StepsOnQuietGradients)
    assert_same_training(ours, plain)


class _ScheduledEveryOtherStep(TinyLM):
    def lr_scheduler_step(self, scheduler, metric):
        if self.trainer.global_step % 2 == 0:
            scheduler.step()


def test_overridden_lr_scheduler_step():
    ours, plain = fit_both(_ScheduledEveryOtherStep)
    assert_same_training(ours, plain)


@pytest.mark.parametrize(("module_class", "streams"), [(TinyLM, True), (_LrZeroOnOddSteps, False)])
def test_updates_stream_unless_a_hook_observes_the_step(module_class, streams):
    from tests.core.test_semantics import _WatchStreaming  # reads the engine after each batch: observes no step

    ours, plain = fit_both(module_class, callbacks=[_WatchStreaming])
    assert_same_training(ours, plain)
    assert ours.callbacks[0].streamed == [streams] * 6


# ------------------------------------------------------------------ reading weights between steps
class _RecordsWeights(L.Callback):
    """Reads every parameter at the start of each training batch, as an EMA or evaluation callback would."""

    def __init__(self):
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if isinstance(trainer.strategy, lightning_slide.SlideFormerStrategy):
            trainer.strategy.finish_updates()
        self.seen.append({n: p.detach().float().cpu().clone() for n, p in module.named_parameters()})


@pytest.mark.parametrize("resident", ["host", "device"])
def test_callbacks_read_the_weights_of_the_last_step(resident):
    ours, plain = fit_both(callbacks=[_RecordsWeights], strategy_options={"tuning": {"resident_optimizer": resident}})
    assert_same_training(ours, plain)
    mine, theirs = ours.callbacks[0].seen, plain.callbacks[0].seen
    assert len(mine) == len(theirs) == 6
    for step, (a, b) in enumerate(zip(mine, theirs)):
        for name in b:  # (a GPU's AdamW and the host's round differently: a relative error as the parity tests')
            assert relative_error(a[name], b[name]) <= 1e-5, (step, name)


def test_lightning_weight_averaging_is_refused_clearly():
    module = TinyLM("llama", initial_state("llama"))
    run = trainer(lightning_slide.SlideFormerStrategy(), callbacks=[EMAWeightAveraging()], max_steps=2)
    with pytest.raises(ValueError, match="finish_updates"):
        run.fit(module, batches(2))


# ------------------------------------------------------------------ the GPU cap, and what the startup line says
@pytest.mark.skipif(ACCELERATOR != "gpu", reason="a cap set with torch.cuda.set_per_process_memory_fraction")
def test_a_cap_set_by_the_user_is_the_limit():
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(0.25, device)
    try:
        strategy = lightning_slide.SlideFormerStrategy()
        assert abs(strategy.device_memory_limit() - total // 4) <= 1
        assert lightning_slide.SlideFormerStrategy(gpu_memory_limit=total // 8).device_memory_limit() == total // 8
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_startup_line_names_the_kernels_that_run():
    """Without TRITON_INTERPRET on a CPU the kernels fall back to torch: the line says so instead of listing them."""
    script = (
        "import torch, lightning_slide\n"
        "from lightning_slide.kernels import apply_kernels, running_kernels\n"
        "from tests.core.tiny import TinyLM, initial_state\n"
        "module = TinyLM('llama', initial_state('llama'))\n"
        "apply_kernels(module, 'all')\n"
        "print(running_kernels(module, torch.device('cpu')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    ).stdout
    assert "([], " in out and "TRITON_INTERPRET=1" in out
