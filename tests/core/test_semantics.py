"""Every training feature the strategy claims, each checked against plain Lightning training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

import lightning_slide
from tests.core.test_parity import assert_same_training
from tests.core.tiny import TinyLM, batches, initial_state, relative_error, trainer


def fit_both(family="llama", window=2, loader=None, module_options=None, **trainer_options):
    modules = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=window)):
        torch.manual_seed(123)
        module = TinyLM(family, initial_state(family), **(module_options or {}))
        trainer(strategy, **trainer_options).fit(module, loader or batches(20))
        modules.append(module)
    return modules[1], modules[0]


def test_adam_with_l2_weight_decay():
    assert_same_training(*fit_both(module_options={"optimizer": "adam"}))


def test_mistral_family():
    assert_same_training(*fit_both("mistral", window=1))


def test_frozen_parameters_stay_frozen():
    ours, plain = fit_both(window=1, module_options={"freeze": ("layers.1.", "embed_tokens")})
    assert_same_training(ours, plain)
    start = initial_state("llama")
    for name, param in ours.model.named_parameters():
        if "layers.1." in name or "embed_tokens" in name:
            assert torch.equal(param.detach(), start[name]), name


class _WatchStreaming(L.Callback):
    """Records after each training batch whether an optimizer step's updates streamed out of its backward (a
    callback that observes no step: it runs after the step)."""

    def __init__(self) -> None:
        self.streamed = []
        self._count = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        engine = getattr(trainer.strategy, "engine", None)
        if engine is not None:
            count = engine.stats()["streamed_steps"]
            self.streamed.append(count > self._count)
            self._count = count


@pytest.mark.parametrize("accumulate", [1, 2])
def test_clipping_by_value_streams_updates_from_backward(accumulate):
    """Clipping by value is elementwise: the step's last backward streams its updates, each clamping its own
    gradients (and the resident parts' chunks), as clip_grad_value_ over every gradient would."""
    watch = _WatchStreaming()
    ours, plain = fit_both(
        window=1,
        gradient_clip_val=0.002,
        gradient_clip_algorithm="value",
        accumulate_grad_batches=accumulate,
        max_steps=5,
        callbacks=[watch],
    )
    assert_same_training(ours, plain)
    assert watch.streamed == ([False] * (accumulate - 1) + [True]) * 5


class _ClipsOddSteps(TinyLM):
    """A LightningModule whose own configure_gradient_clipping clips by value on odd steps only."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.trainer.global_step % 2:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_clipping_in_a_users_hook_waits_for_the_backward():
    """Trainer(gradient_clip_algorithm="value") with the module's own configure_gradient_clipping: how the step clips
    is known only after the backward, so its updates wait for it, and training equals plain training."""
    modules, watch = [], _WatchStreaming()
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1)):
        torch.manual_seed(123)
        module = _ClipsOddSteps("llama", initial_state("llama"))
        trainer(
            strategy,
            gradient_clip_val=0.002,
            gradient_clip_algorithm="value",
            accumulate_grad_batches=1,
            max_steps=8,
            callbacks=[watch],
        ).fit(module, batches(8))
        modules.append(module)
    assert_same_training(modules[1], modules[0])
    assert watch.streamed == [False] * 8


def test_no_clipping_no_accumulation():
    assert_same_training(*fit_both(gradient_clip_val=None, accumulate_grad_batches=1))


def test_accumulation_window_cut_by_epoch_end():
    # 5 batches per epoch with accumulation 2: plain Lightning steps on the epoch's last, lone micro-batch too.
    ours, plain = fit_both(loader=batches(5), max_steps=-1, max_epochs=3, accumulate_grad_batches=2)
    assert len(plain.losses) == 15
    assert_same_training(ours, plain)


def test_validation_test_and_predict_are_windowed_and_equal():
    results = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1)):
        torch.manual_seed(123)
        module = TinyLM("qwen3", initial_state("qwen3"))
        run = trainer(strategy, val_check_interval=4, check_val_every_n_epoch=None)
        run.fit(module, batches(20), batches(3, seed=7))
        fit_val = run.callback_metrics["val_loss"].item()
        validated = run.validate(module, batches(3, seed=8), verbose=False)[0]["val_loss"]
        module.test_step = module.validation_step
        tested = run.test(module, batches(3, seed=9), verbose=False)[0]["val_loss"]
        module.predict_step = lambda batch, *_, module=module: module.model(input_ids=batch[0]).logits
        predicted = torch.cat(run.predict(module, batches(2, seed=10)))
        results.append((module, fit_val, validated, tested, predicted))
    (ours, *our_values, our_logits), (plain, *plain_values, plain_logits) = results
    assert_same_training(ours, plain)
    for a, b in zip(our_values, plain_values):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert relative_error(our_logits, plain_logits) <= 1e-5


def test_second_fit_continues_from_trained_weights():
    modules = []
    for strategy in ("auto", "slideformer"):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
        trainer(strategy, max_steps=4).fit(module, batches(8))
        trainer(strategy, max_steps=4).fit(module, batches(8, seed=3))
        modules.append(module)
    assert_same_training(*modules)


def test_at_most_window_layers_on_the_compute_device():
    window = 2
    strategy = lightning_slide.SlideFormerStrategy(window=window)
    module = TinyLM("llama", initial_state("llama"))
    seen = {"checks": 0, "max_loaded": 0}

    def in_slot(tensor, slots):
        return any(s.data_ptr() <= tensor.data_ptr() < s.data_ptr() + s.numel() * s.element_size() for s in slots)

    def check(layer_index):
        def hook(submodule, args):
            slots = strategy.engine.window.weights
            layers = module.model.model.layers
            loaded = [i for i, layer in enumerate(layers) if in_slot(next(layer.parameters()), slots)]
            assert layer_index in loaded, "a layer computed with weights outside the window"
            assert len(loaded) <= window, f"layers {loaded} on the device with window {window}"
            seen["checks"] += 1
            seen["max_loaded"] = max(seen["max_loaded"], len(loaded))

        return hook

    for index, layer in enumerate(module.model.model.layers):
        for submodule in list(layer.modules())[1:]:  # inside the layer: fires in forward and in the recompute
            submodule.register_forward_pre_hook(check(index))
    trainer(strategy, max_steps=3).fit(module, batches(6))
    assert seen["checks"] > 0 and seen["max_loaded"] == window
    # At rest every parameter is back on its fp32 host master.
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())


def test_bf16_true_trains_with_fp32_masters():
    torch.manual_seed(123)
    module = TinyLM("llama", initial_state("llama"))
    run = trainer("slideformer", precision="bf16-true", max_steps=10)
    run.fit(module, batches(20))
    reference = TinyLM("llama", initial_state("llama"))
    trainer("auto", max_steps=10).fit(reference, batches(20))
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert sum(module.losses[-4:]) < sum(module.losses[:4])
    for a, b in zip(module.losses, reference.losses):
        assert abs(a - b) <= 0.05 * abs(b)


def test_save_pretrained_after_fit(tmp_path):
    module = TinyLM("gemma_tied", initial_state("gemma_tied"))
    trainer(lightning_slide.SlideFormerStrategy(window=1), max_steps=3).fit(module, batches(6))
    module.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(module.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(
        loaded.state_dict()["model.embed_tokens.weight"], initial_state("gemma_tied")["model.embed_tokens.weight"]
    )


def test_optimizer_state_dict_round_trip():
    module = TinyLM("llama", initial_state("llama"))
    strategy = lightning_slide.SlideFormerStrategy(window=1)
    run = trainer(strategy, max_steps=2)
    captured = {}

    class Capture(L.Callback):
        def on_train_end(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            state = optimizer.state_dict()
            captured["state"] = state
            zeroed = {
                "state": {i: {k: torch.zeros_like(v) for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": state["param_groups"],
            }
            optimizer.load_state_dict(zeroed)
            captured["zeroed"] = optimizer.state_dict()
            optimizer.load_state_dict(state)
            captured["restored"] = optimizer.state_dict()

    run.callbacks.append(Capture())
    run.fit(module, batches(4))
    count = sum(len(g["params"]) for g in captured["state"]["param_groups"])
    assert sorted(captured["state"]["state"]) == list(range(count))
    for index, state in captured["state"]["state"].items():
        assert not captured["zeroed"]["state"][index]["exp_avg"].any()
        for key, value in state.items():
            assert torch.equal(captured["restored"]["state"][index][key], value)


def test_lr_monitor_sees_one_optimizer_named_like_the_users(tmp_path):
    import warnings

    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    module = TinyLM("llama", initial_state("llama"))
    run = trainer(
        "slideformer",
        max_steps=4,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor("step")],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module, batches(8))
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    header = next((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()).strip().split(",")
    assert sorted(h for h in header if h.startswith("lr-")) == ["lr-AdamW/pg1", "lr-AdamW/pg2"]


def test_accumulation_without_clipping_streams_updates_from_backward():
    assert_same_training(*fit_both(window=1, gradient_clip_val=None, accumulate_grad_batches=3, max_steps=6))


class _ClipsInItsHook(TinyLM):
    """Clips by norm in its own configure_gradient_clipping although Trainer(gradient_clip_val=None)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, 0.05, "norm")


def test_clipping_in_a_users_hook_without_gradient_clip_val():
    modules = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1)):
        torch.manual_seed(123)
        module = _ClipsInItsHook("llama", initial_state("llama"))
        trainer(strategy, gradient_clip_val=None, accumulate_grad_batches=1, max_steps=5).fit(module, batches(5))
        modules.append(module)
    assert_same_training(modules[1], modules[0])


def test_kernels_all_matches_kernels_none():
    window = 2
    results = []
    for kernels in ("none", "all"):
        torch.manual_seed(123)
        module = TinyLM("qwen3", initial_state("qwen3"))
        trainer(lightning_slide.SlideFormerStrategy(window=window, kernels=kernels), max_steps=3).fit(
            module, batches(6)
        )
        results.append(module)
    plain, fused = results
    for a, b in zip(fused.losses, plain.losses):
        assert abs(a - b) <= 1e-4 * abs(b)
    theirs = dict(plain.named_parameters())
    for name, param in fused.named_parameters():
        assert relative_error(param.detach(), theirs[name].detach()) <= 1e-4, name
    assert "forward" in fused.model.model.norm.__dict__  # the kernels really were swapped in


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="unknown.*rmsnorm"):
        lightning_slide.SlideFormerStrategy(kernels=["flash"])


@pytest.mark.parametrize("clip", [0.5, None])
def test_resident_parts_updated_on_the_compute_device(clip):
    # The tied embedding is the resident part here; with clipping its update waits for the global norm.
    modules = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1, tuning=dict(resident_optimizer="device"))):
        torch.manual_seed(123)
        module = TinyLM("gemma_tied", initial_state("gemma_tied"))
        trainer(strategy, gradient_clip_val=clip).fit(module, batches(20))
        modules.append(module)
    plain, ours = modules
    assert_same_training(ours, plain)


def test_resident_optimizer_choice_is_validated():
    with pytest.raises(ValueError, match="resident_optimizer"):
        lightning_slide.SlideFormerStrategy(tuning=dict(resident_optimizer="gpu"))


@pytest.mark.parametrize("resident_optimizer", ["host", "device"])
def test_engine_load_state_dict_replaces_the_masters(resident_optimizer):
    module = TinyLM("gemma_tied", initial_state("gemma_tied"))

    class Reload(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:  # after the first optimizer step: put the initial weights back
                trainer.strategy.engine.load_state_dict(
                    {f"model.{k}": v for k, v in initial_state("gemma_tied").items()}
                )

    strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=dict(resident_optimizer=resident_optimizer))
    trainer(strategy, max_steps=2, callbacks=[Reload()]).fit(module, batches(4))
    ids = list(batches(4))[2][0]
    expected = TinyLM("gemma_tied", initial_state("gemma_tied")).model(input_ids=ids, labels=ids).loss.item()
    assert abs(module.losses[2] - expected) <= 1e-5 * expected


def test_monitor_logs_the_strategy_metrics(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = TinyLM("llama", initial_state("llama"))
    run = trainer("slideformer", max_steps=3, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    run.fit(module, batches(6))
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for name in (
        "tokens_per_sec",
        "tflops",
        "peak_host_gib",
        "host_busy_share",
        "compute_blocked_share",
        "skipped_steps",
        "parked_layers",
    ):
        assert f"slide/{name}" in header, name
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    tokens = [float(r["slide/tokens_per_sec"]) for r in rows if r["slide/tokens_per_sec"]]
    assert len(tokens) == 3 and all(t > 0 for t in tokens)  # one row per optimizer step (accumulation 2)


def test_streamed_updates_bound_the_host_gradient_buffers():
    import time

    module = TinyLM("llama", initial_state("llama"))  # 4 layers
    strategy = lightning_slide.SlideFormerStrategy(window=1)
    seen = {}

    class SlowHost(L.Callback):
        def on_train_start(self, trainer, pl_module):
            engine = trainer.strategy.engine
            update = engine.updates.run

            def slow_update(*args):  # a host far slower than the backward: gradients would pile up
                time.sleep(0.05)
                update(*args)

            engine.updates.run = slow_update

        def on_train_end(self, trainer, pl_module):
            seen["allocated"] = trainer.strategy.engine.loans.pool.allocated

    trainer(strategy, max_steps=3, gradient_clip_val=None, accumulate_grad_batches=1, callbacks=[SlowHost()]).fit(
        module, batches(3)
    )
    assert seen["allocated"] <= 1 + 2 < len(module.model.model.layers)


def test_model_called_outside_a_step_sees_the_updated_weights():
    probe = list(batches(1, seed=5))[0][0]

    class Probe(L.Callback):
        def __init__(self):
            self.outputs = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx % 2 == 1:  # right after an optimizer step, outside any training step
                with torch.no_grad():
                    self.outputs.append(pl_module.model(input_ids=probe.to(pl_module.device)).logits.cpu())

    seen = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1, tuning=dict(resident_optimizer="host"))):
        torch.manual_seed(123)
        module, callback = TinyLM("gemma_tied", initial_state("gemma_tied")), Probe()
        trainer(strategy, max_steps=3, callbacks=[callback]).fit(module, batches(6))
        seen.append(callback.outputs)
    for ours, plain in zip(seen[1], seen[0]):
        assert relative_error(ours, plain) <= 1e-5


def test_offloaded_activations_train_the_same():
    offloaded = {}

    class Count(L.Callback):
        def on_train_end(self, trainer, pl_module):
            engine = getattr(trainer.strategy, "engine", None)
            if engine is not None:
                offloaded["bytes"] = engine.activations.offloaded_bytes
                offloaded["prefetched"] = engine.activations.prefetched

    modules = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1, offload_activations=True)):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
        trainer(strategy, callbacks=[Count()]).fit(module, batches(20))
        modules.append(module)
    plain, ours = modules
    assert_same_training(ours, plain)
    # one B x T x H input per layer per micro-batch: 20 micro-batches x 4 layers x 2 x 16 x 32 fp32 values
    assert offloaded["bytes"] == 20 * 4 * 2 * 16 * 32 * 4
    # in backward every layer but the top one found its input already brought back by the layer above
    assert offloaded["prefetched"] == 20 * 3
