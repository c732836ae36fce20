"""The planner (lightning_slide/engine/plan.py) against what the engine really allocates and what autograd really
saves, its refusals, and its suggestions."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

import lightning_slide
from lightning_slide.engine import plan as planner
from lightning_slide.engine.plan import (
    Machine,
    ModelShape,
    PlanError,
    Settings,
    device_bytes,
    largest_batch,
    largest_parking,
    largest_window,
    layer_saved_bytes_per_token,
    make_plan,
)

from .tiny import ACCELERATOR, TinyLM, batches, initial_state, trainer

LAYER_CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=64,
    ),
    "qwen3": lambda: Qwen3Config(
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=1,
        vocab_size=64,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
        vocab_size=64,
    ),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", sorted(LAYER_CONFIGS))
def test_layer_saved_bytes_match_autograd(family, dtype):
    """Count the bytes autograd saves in one decoder layer's forward (what its recompute holds) on the CPU."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LAYER_CONFIGS[family](), dtype=dtype, attn_implementation="sdpa")
    batch, seq = 2, 24
    x = torch.randn(batch, seq, model.config.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(seq)[None].expand(batch, seq))
    skip = {t.untyped_storage().data_ptr() for t in (x, cos, sin, *model.parameters())}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, position_embeddings=(cos, sin), attention_mask=None)
    shape = ModelShape.of(model)
    predicted = layer_saved_bytes_per_token(shape, torch.empty((), dtype=dtype).element_size()) * batch * seq
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.01)


class _Snapshot(L.Callback):
    """What the engine holds at the end of training (before teardown releases it)."""

    def on_train_end(self, trainer, module):
        engine = trainer.strategy.engine
        units = engine.units()
        # With the resident parts updated on the device (resident_optimizer="auto" on a GPU, or "device") their
        # moments are device memory (the CPU's, when it is the device), beside a device copy of their masters and a
        # device gradient accumulator.
        on_device_key = "resident" if engine.resident_parts.updates_on_device else None
        device = engine.resident_parts.device

        def moments(keys):
            return [
                t
                for k, o in engine.updates.optimizers.items()
                if k in keys and o.state is not None
                for t in o.state.values()
            ]

        on_host = moments([k for k in engine.updates.optimizers if k != on_device_key])
        on_device = moments([on_device_key])
        self.host = {
            "masters": sum(u.master.numel() * 4 for u in units.values()),
            "moments": sum(t.numel() * t.element_size() for t in on_host),
            "pool": 4 * engine.loans.pool.allocated * engine.loans.pool.numel,
            "resident grad": sum(
                t.nbytes for t in (engine.resident.grad, engine.resident_parts.chunk_buffer) if t is not None
            ),
            "staging": sum(b.numel() * b.element_size() for b in engine.downloads.staging.values()),
            "copies": sum(u.weights.nbytes for u in engine.layers if u.weights is not None),
            "frozen": sum(u.frozen.nbytes for u in units.values() if u.frozen is not None and u.weights is None),
        }
        self.device = {
            "slots": sum(s.weights.nbytes + s.grads.nbytes for s in engine.window.slots),
            "resident": engine.resident_parts.weights.nbytes + engine.resident_parts.grads.nbytes,
            "resident optimizer": sum(t.numel() * t.element_size() for t in on_device)
            + sum(t.nbytes for t in (device.master, device.grad) if t is not None),
        }
        self.parked = sum(buffer.nbytes for buffer, _ in engine.parking.free) + sum(
            entry[0].nbytes for entry in engine.parking.parked.values()
        )
        self.resident_on_device = engine.resident_parts.updates_on_device
        self.plan = trainer.strategy.plan
        self.depth = engine.window.depth


def _item(items, prefix):
    return next(v for k, v in items.items() if k.startswith(prefix))


@pytest.mark.parametrize(
    "clip,accumulate,host_weights,resident",
    [
        (0.5, 2, "auto", "auto"),
        (None, 1, "auto", "auto"),
        (0.5, 1, "compute", "auto"),
        (0.5, 2, "auto", "device"),
    ],
)
def test_plan_matches_the_engines_allocations(clip, accumulate, host_weights, resident):
    snap = _Snapshot()
    tuning = dict(host_weights=host_weights, resident_optimizer=resident)
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=tuning)
    precision = "bf16-true" if host_weights == "compute" else "32-true"
    trainer(
        strategy,
        max_steps=3,
        gradient_clip_val=clip,
        accumulate_grad_batches=accumulate,
        precision=precision,
        callbacks=[snap],
    ).fit(TinyLM("llama", initial_state("llama")), batches(8))
    plan = snap.plan
    assert plan.settings.batch == 2 and plan.settings.seq == 16  # redone at the first batch
    host = plan.host
    assert snap.host["masters"] == _item(host, "fp32 masters")
    assert snap.host["moments"] == _item(host, "Adam moments")
    # Updated on the device (a GPU), the resident parts have no host gradient buffer; in a streamed step (no
    # clipping, no accumulation) one chunk's; else an accumulator as large as they are.
    resident_grad = [v for k, v in host.items() if k.startswith("resident gradient")]
    assert [snap.host["resident grad"]] == (resident_grad or [0])
    if clip is not None:  # every layer keeps its gradients until the global norm
        assert snap.host["pool"] == _item(host, "layer gradient buffers")
        if accumulate > 1:
            assert snap.host["staging"] == _item(host, "accumulation staging")
    else:  # updates stream: at most window + 2 buffers
        assert 0 < snap.host["pool"] <= _item(host, "layer gradient buffers")
        assert _item(host, "layer gradient buffers") == 4 * (snap.depth + 2) * plan.shape.layer_trainable
        assert not any(k.startswith("accumulation staging") for k in host)
    if host_weights == "compute":
        assert snap.host["copies"] == _item(host, "layer compute copies") > 0
    else:
        assert snap.host["copies"] == 0 and not any(k.startswith("layer compute copies") for k in host)
    assert snap.device["slots"] == plan.gpu["window slots (weights + gradients)"]
    assert snap.device["resident"] == plan.gpu["resident weights + gradients"]
    assert plan.settings.resident_on_device == snap.resident_on_device == (ACCELERATOR == "gpu" or resident == "device")
    if snap.resident_on_device:
        assert snap.device["resident optimizer"] == plan.gpu["resident fp32 masters, gradients, Adam moments"] > 0
    else:
        assert snap.device["resident optimizer"] == 0
        assert not any(k.startswith("resident fp32 masters") for k in plan.gpu)


@pytest.mark.parametrize("host_weights,resident", [("auto", "auto"), ("compute", "device")])
def test_plan_matches_the_engine_with_lora(host_weights, resident):
    """LoRA (PEFT) in bf16: the frozen base weights cost 2 bytes per parameter on the host (no fp32 master, no
    optimizer state, no gradient buffer), in the plan as in the engine."""
    from tests.core.test_peft import LoraLM

    snap = _Snapshot()
    tuning = dict(host_weights=host_weights, resident_optimizer=resident)
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=tuning)
    trainer(strategy, max_steps=2, precision="bf16-true", callbacks=[snap]).fit(LoraLM("llama"), batches(4))
    plan, shape = snap.plan, snap.plan.shape
    assert 0 < shape.layer_trainable < shape.layer_params and shape.layers_frozen == shape.layers * (
        shape.layer_params - shape.layer_trainable
    )
    host = plan.host
    # Nothing trains the resident parts: they are kept apart in bf16 too, and their compute copy goes up once.
    assert shape.resident_frozen == shape.resident_params > 0
    frozen = shape.layers_frozen + shape.resident_frozen
    assert snap.host["masters"] == _item(host, "fp32 masters") == 4 * (shape.params - frozen)
    assert snap.host["moments"] == _item(host, "Adam moments") == 8 * shape.layers * shape.layer_trainable
    assert snap.host["pool"] == _item(host, "layer gradient buffers") == 4 * shape.layers * shape.layer_trainable
    resident_frozen = _item(host, "resident frozen weights")
    assert resident_frozen == 2 * shape.resident_frozen
    if host_weights == "compute":  # the compute copy's frozen part is the layers' frozen weights' only home
        assert snap.host["copies"] == _item(host, "layer compute copies") == 2 * shape.layers * shape.layer_params
        assert snap.host["frozen"] == resident_frozen and not any(k.startswith("layer frozen weights") for k in host)
    else:
        assert _item(host, "layer frozen weights") == 2 * shape.layers_frozen
        assert snap.host["frozen"] == _item(host, "layer frozen weights") + resident_frozen
    assert snap.device["slots"] == plan.gpu["window slots (weights + gradients)"]
    assert snap.device["resident"] == plan.gpu["resident weights + gradients"]
    # All frozen, the resident parts have nothing to update on the device, wherever resident_optimizer says.
    assert snap.device["resident optimizer"] == 0 and not any(k.startswith("resident fp32 masters") for k in plan.gpu)
    # The frozen weights go up as they are kept: 2 bytes per parameter, the adapters' masters 4 (or 2 from the copy).
    upload = 2 if host_weights == "compute" else 4
    layer_bytes = upload * (shape.layers * shape.layer_params - shape.layers_frozen) + 2 * shape.layers_frozen
    assert plan.time["H2D weights (forward + recompute)"] == pytest.approx(
        2 * 2 * layer_bytes / plan.machine.h2d_bytes_per_s
    )  # 2 micro-batches; the frozen resident parts went up once for the run


def test_planned_lora_of_a_known_shape():
    """The 8B shape with every layer frozen but its adapters (1% of a layer): about 2 bytes per base parameter."""
    base = _llama8b_shape()
    adapters = base.layer_params // 100
    shape = dataclasses.replace(
        base, layer_trainable=adapters, resident_trainable=0, layers_frozen=base.layers * (base.layer_params - adapters)
    )
    plan = make_plan(shape, Settings(window=2, accumulate=4), suggest=False)
    layer_params = base.layers * base.layer_params
    assert _item(plan.host, "layer frozen weights") == 2 * shape.layers_frozen
    assert _item(plan.host, "fp32 masters") == 4 * base.layers * adapters
    assert _item(plan.host, "resident frozen weights") == 2 * base.resident_params  # untrained: bf16 only
    assert _item(plan.host, "Adam moments") == 8 * base.layers * adapters
    per_param = (plan.host_total - _item(plan.host, "runtime") - 2 * base.resident_params) / layer_params
    assert 2 < per_param < 2.5
    # fp32 compute or several ranks: every parameter keeps its fp32 master, as before.
    for settings in (
        dataclasses.replace(plan.settings, compute_dtype=torch.float32),
        dataclasses.replace(plan.settings, ranks=2),
    ):
        other = make_plan(shape, settings, suggest=False)
        assert not any(k.startswith("layer frozen weights") for k in other.host)
        assert _item(other.host, "fp32 masters") == 4 * shape.params


def _llama8b_shape() -> ModelShape:
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return ModelShape.of(AutoModelForCausalLM.from_config(config))


def test_plan_numbers_of_a_known_shape():
    shape = _llama8b_shape()
    assert (
        shape.layers == 32 and shape.layer_params == 218_112_000 and shape.resident_params == 2 * 128256 * 4096 + 4096
    )
    plan = make_plan(
        shape,
        Settings(window=2, batch=4, seq=1024, kernels=("fused_linear_cross_entropy",), clipping=False),
        Machine(gpu_memory=24 * 2**30, host_memory=256 * 2**30),
    )
    assert plan.gpu["window slots (weights + gradients)"] == 2 * 2 * 2 * shape.layer_params
    assert plan.gpu["layer inputs (one per layer)"] == 32 * 4 * 1024 * 4096 * 2
    assert _item(plan.host, "fp32 masters") == 4 * shape.params
    assert _item(plan.host, "Adam moments") == 8 * shape.params  # everything updated on the host
    # Step terms: compute 8·N·tokens, weights up twice in fp32, gradients down in fp32, AdamW once.
    m = plan.machine
    assert plan.time["H2D weights (forward + recompute)"] == pytest.approx(
        (8 * 32 * shape.layer_params + 4 * shape.resident_params) / m.h2d_bytes_per_s
    )
    assert plan.time["host AdamW"] == pytest.approx(shape.params / m.host_adamw_params_per_s)
    # Host memory: the update's bytes (masters and moments read and written, gradients read: the layers' in bf16, 26
    # per parameter, the resident parts' in fp32, 28) and every copy's, at what fp32 AdamW (28 bytes per parameter)
    # draws alone.
    update = 26 * 32 * shape.layer_params + 28 * shape.resident_params
    copies = (8 + 2) * 32 * shape.layer_params + (4 + 4) * shape.resident_params
    memory = "host memory (update + copies)"
    assert plan.time[memory] == pytest.approx((update + copies) / (28 * m.host_adamw_params_per_s))
    assert plan.binding == memory and plan.step_seconds == plan.time[memory]
    assert not plan.problems()
    # Clipping by norm: the updates wait for the global norm, so the last backward (recompute and backward,
    # 6·N·tokens) and the host's work follow each other.
    clipped = make_plan(shape, dataclasses.replace(plan.settings, clipping=True), m)
    backward = 6 * (32 * shape.layer_params + 128256 * 4096) * 4 * 1024 / m.gpu_flops
    term = "last backward, then host AdamW (clipping by norm)"
    assert clipped.time[term] == pytest.approx(backward + plan.time[memory]) and clipped.binding == term
    # With accumulation the same thread adds each later micro-batch's gradients into the host accumulators: 12
    # bytes per parameter against AdamW's 28, so 28/12 times as fast unless measured.
    four = make_plan(shape, dataclasses.replace(plan.settings, accumulate=4), m)
    sums = four.time["host AdamW + gradient sums"]
    assert sums == pytest.approx(shape.params / m.host_adamw_params_per_s * (1 + 3 * 12 / 28))
    assert "host AdamW" not in four.time
    measured = dataclasses.replace(m, host_add_params_per_s=m.host_adamw_params_per_s)
    assert make_plan(shape, four.settings, measured).time["host AdamW + gradient sums"] == pytest.approx(
        4 * plan.time["host AdamW"]
    )
    # AdamW: the layers' gradients go down in bf16 (its host kernel reads them so, fp32 moments or bf16), unless they
    # add up on the host.
    resident = 4 * shape.resident_params / m.d2h_bytes_per_s
    for moments in (torch.float32, torch.bfloat16):
        down = {
            a: make_plan(shape, dataclasses.replace(plan.settings, moments_dtype=moments, accumulate=a), m)
            for a in (1, 2)
        }
        one = 2 * 32 * shape.layer_params / m.d2h_bytes_per_s + resident
        assert down[1].time["D2H gradients"] == pytest.approx(one)
        assert down[2].time["D2H gradients"] == pytest.approx(
            2 * (4 * 32 * shape.layer_params / m.d2h_bytes_per_s + resident)
        )
    # The disk tier moves the moments to files and adds their traffic.
    disk = make_plan(shape, dataclasses.replace(plan.settings, offload_dir="/x"), Machine(disk_free=2**40))
    assert disk.disk_total == 8 * shape.params and "disk write (Adam moments)" in disk.time
    assert _item(disk.host, "Adam moments in flight") == 8 * (shape.resident_trainable + 4 * shape.layer_trainable)
    # Masters on disk too: the host keeps the layers' bf16 copy and the resident masters; files hold 12 B/param.
    both = make_plan(
        shape, dataclasses.replace(plan.settings, offload_dir="/x", offload="both"), Machine(disk_free=2**40)
    )
    assert both.disk_total == 8 * shape.params + 4 * 32 * shape.layer_params
    assert _item(both.host, "fp32 masters (resident parts)") == 4 * shape.resident_params
    assert _item(both.host, "layer compute copies") == 2 * 32 * shape.layer_params
    assert (
        _item(both.host, "Adam moments + fp32 masters in flight")
        == 12 * 4 * shape.layer_params + 8 * shape.resident_trainable
    )
    assert both.time["disk read (Adam moments + masters)"] == pytest.approx(
        both.disk_total / both.machine.disk_read_bytes_per_s
    )
    # Measured reading and writing at once, the disk's one device serves both: their sum goes through it.
    shared = make_plan(
        shape,
        both.settings,
        Machine(
            disk_free=2**40, disk_read_bytes_per_s=2.7e9, disk_write_bytes_per_s=1.7e9, disk_mixed_bytes_per_s=2.4e9
        ),
    )
    together = "disk read + write at once (Adam moments + masters)"
    assert shared.time[together] == pytest.approx(2 * both.disk_total / 2.4e9) and shared.binding == together
    assert together not in both.time  # not measured: each alone
    # A compute copy on the host halves the layers' upload bytes and costs 2 B/param of host memory.
    copy = make_plan(shape, dataclasses.replace(plan.settings, host_weights="compute"))
    assert _item(copy.host, "layer compute copies") == 2 * 32 * shape.layer_params
    assert copy.time["H2D weights (forward + recompute)"] == pytest.approx(
        (4 * 32 * shape.layer_params + 4 * shape.resident_params) / m.h2d_bytes_per_s
    )
    # ... and the host loop writes it (2 bytes per parameter), uploads reading 4 fewer: 2 fewer through host memory.
    fewer = (2 * 32 * shape.layer_params) / (28 * m.host_adamw_params_per_s)
    assert copy.time[memory] == pytest.approx(plan.time[memory] - fewer)
    table = plan.table()
    assert "<- binds" in table and "largest batch" in table and "GiB" in table
    # The copy is suggested where it shortens the step and fits the host's memory.
    suggested = "tuning.host_weights='compute'"
    assert suggested in table
    tight = dataclasses.replace(m, host_memory=plan.host_total + 2**30)
    assert suggested not in make_plan(shape, plan.settings, tight).table()
    assert plan.to_dict()["binding"] == memory


def test_refusals_say_what_to_change():
    shape = _llama8b_shape()
    settings = Settings(window=2, batch=4, seq=1024)
    with pytest.raises(
        PlanError,
        match=r"(?s)GPU: needs .* more than the 4\.00 GiB available.*lower the batch size "
        r"\(now 4\).*lower the window \(now 2\)",
    ):
        make_plan(shape, settings, Machine(gpu_memory=4 * 2**30)).check()
    with pytest.raises(PlanError, match=r"(?s)host: needs .* more than the 64\.00 GiB available.*set offload_dir"):
        make_plan(shape, settings, Machine(host_memory=64 * 2**30)).check()
    with pytest.raises(PlanError, match=r"(?s)disk: needs .*free disk space"):
        make_plan(shape, dataclasses.replace(settings, offload_dir="/x"), Machine(disk_free=2**30)).check()


_SUGGESTING = Machine(gpu_memory=24 * 2**30, host_memory=512 * 2**30)


def _assert_largest_that_fits(shape, settings, **value):
    """``settings`` with ``value`` fits under the suggestions' GPU margin; one more does not."""
    ((name, size),) = value.items()
    margin = planner.SUGGEST_MARGIN * _SUGGESTING.gpu_memory
    assert sum(device_bytes(shape, dataclasses.replace(settings, **{name: size})).values()) <= margin
    assert sum(device_bytes(shape, dataclasses.replace(settings, **{name: size + 1})).values()) > margin


def test_suggestions_are_the_largest_that_fit():
    shape = _llama8b_shape()
    settings = Settings(window=2, batch=4, seq=2048, kernels=("fused_linear_cross_entropy",))
    machine = _SUGGESTING
    best = largest_batch(shape, settings, machine)
    assert best
    _assert_largest_that_fits(shape, settings, batch=best)
    window = largest_window(shape, settings, machine)
    assert 1 <= window < shape.layers
    _assert_largest_that_fits(shape, settings, window=window)
    # Offloading the layer inputs lets a larger batch fit.
    assert largest_batch(shape, dataclasses.replace(settings, offload_activations=True), machine) > best
    assert largest_batch(shape, settings, Machine(gpu_memory=2**30)) is None


def test_the_most_parked_gradients_that_fit_are_suggested():
    shape = _llama8b_shape()
    settings = Settings(window=2, batch=4, seq=1024, kernels=("fused_linear_cross_entropy",))
    machine = _SUGGESTING
    most = largest_parking(shape, settings, machine)
    assert 0 < most < shape.layers
    _assert_largest_that_fits(shape, settings, parked_grads=most)
    plan = make_plan(shape, settings, machine)
    assert plan.suggested_parked_grads == most and f"(parked_grads) at batch 4, window 2: {most}" in plan.table()
    # With clipping, parked layers leave the host: on a host too small for every layer's gradients, parking fits.
    clipped = dataclasses.replace(settings, clipping=True)
    host = Machine(gpu_memory=24 * 2**30, host_memory=110 * 2**30)
    assert sum(planner.host_bytes(shape, clipped).values()) > host.host_memory
    assert sum(planner.host_bytes(shape, dataclasses.replace(clipped, parked_grads=most)).values()) <= host.host_memory
    assert largest_parking(shape, dataclasses.replace(settings, accumulate=2), machine) is None  # no parking then
    # Layers kept on the device send no gradients down: at most the sliding ones park, however much room is left.
    roomy = Machine(gpu_memory=400 * 2**30)
    assert largest_parking(shape, dataclasses.replace(settings, device_layers=8), roomy) == shape.layers - 8


def test_strategy_refuses_activations_that_cannot_fit_at_the_first_batch():
    module = TinyLM("llama", initial_state("llama"))
    fixed = device_bytes(ModelShape.of(module), Settings(window=2, compute_dtype=torch.float32, device="cpu"))
    strategy = lightning_slide.SlideFormerStrategy(window=2, gpu_memory_limit=sum(fixed.values()) + 1024)
    with pytest.raises(PlanError, match=r"(?s)GPU: needs .*layer inputs.*lower the batch size \(now 2"):
        trainer(strategy, max_steps=1).fit(module, batches(2))
    assert all(p.device.type == "cpu" for p in module.parameters())


def test_strategy_refuses_host_memory_that_cannot_fit(monkeypatch):
    # nothing left besides what the process holds
    monkeypatch.setattr("lightning_slide.engine.machine.host_available", lambda: 1)
    module = TinyLM("llama", initial_state("llama"))
    with pytest.raises(PlanError, match=r"(?s)host: needs .*Adam moments.*set offload_dir"):
        trainer(lightning_slide.SlideFormerStrategy(window=2), max_steps=1).fit(module, batches(2))
    assert all(p.device.type == "cpu" for p in module.parameters())


def test_offloaded_layer_inputs_match_the_plan():
    snap = _Snapshot()
    offloaded = {}

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            offloaded.setdefault("first", trainer.strategy.engine.activations.offloaded_bytes)

    strategy = lightning_slide.SlideFormerStrategy(window=2, offload_activations=True)
    trainer(strategy, max_steps=1, accumulate_grad_batches=1, callbacks=[snap, Count()]).fit(
        TinyLM("llama", initial_state("llama")), batches(2)
    )
    assert offloaded["first"] == _item(snap.plan.host, "offloaded layer inputs") > 0
    assert "layer inputs in flight (offloaded)" in snap.plan.gpu


def test_kernels_the_user_applied_count_in_the_plan():
    from lightning_slide.kernels import apply_kernels

    module = TinyLM("llama", initial_state("llama"))
    apply_kernels(module, ["rmsnorm"])  # by hand, not through SlideFormerStrategy(kernels=...)
    strategy = lightning_slide.SlideFormerStrategy(window=2)
    trainer(strategy, max_steps=1).fit(module, batches(2))
    assert "rmsnorm" in strategy.plan.settings.kernels


def test_grad_buffers_bounds_the_host_gradient_buffers_and_the_plan_says_so():
    snap = _Snapshot()
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=dict(grad_buffers=1))
    trainer(strategy, max_steps=2, gradient_clip_val=None, accumulate_grad_batches=1, callbacks=[snap]).fit(
        TinyLM("llama", initial_state("llama")), batches(4)
    )  # no clipping: updates stream
    assert snap.host["pool"] == _item(snap.plan.host, "layer gradient buffers") == 4 * snap.plan.shape.layer_trainable
    with pytest.raises(ValueError, match="grad_buffers"):
        lightning_slide.SlideFormerStrategy(tuning=dict(grad_buffers=0))


def test_parked_gradient_buffers_are_in_the_plan():
    snap = _Snapshot()
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=dict(grad_buffers=1, parked_grads=3))
    trainer(strategy, max_steps=2, gradient_clip_val=None, accumulate_grad_batches=1, callbacks=[snap]).fit(
        TinyLM("llama", initial_state("llama")), batches(4)
    )
    engine_bytes = snap.parked
    assert engine_bytes == snap.plan.gpu["parked layer gradients"] == 3 * snap.plan.shape.layer_trainable * 4


def test_parked_gradients_of_a_clipped_step_are_off_the_host_in_the_plan():
    """Clipping by norm with one micro-batch: the parked layers hold no host gradient buffer."""
    snap = _Snapshot()
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=dict(grad_buffers=2, parked_grads=6))
    trainer(strategy, max_steps=2, gradient_clip_val=0.5, accumulate_grad_batches=1, callbacks=[snap]).fit(
        TinyLM("llama_deep", initial_state("llama_deep")), batches(4)
    )
    layer = 4 * snap.plan.shape.layer_trainable
    assert snap.host["pool"] == _item(snap.plan.host, "layer gradient buffers") == (24 - 6) * layer


def test_several_ranks_plan_per_rank():
    """Each rank keeps its shard of the moments and gradient buffers and moves its shard over its own link; the
    host's AdamW serves every rank; the ranks of one host share one copy of the masters."""
    shape = _llama8b_shape()
    one, two = (
        planner.make_plan(shape, Settings(batch=4, seq=1024, clipping=False, ranks=r), Machine(), suggest=False)
        for r in (1, 2)
    )
    assert two.host["Adam moments (fp32)"] == one.host["Adam moments (fp32)"] // 2
    masters = next(k for k in one.host if k.startswith("fp32 masters"))
    assert two.host[masters] == one.host[masters]  # on two hosts: a copy each
    shared = planner.make_plan(
        shape, Settings(batch=4, seq=1024, clipping=False, ranks=2, masters_shared_by=2), Machine(), suggest=False
    )
    assert shared.host[masters] == one.host[masters] // 2  # one host: one copy for both ranks, half each
    h2d = "H2D weights (forward + recompute)"
    assert two.time[h2d] == pytest.approx(one.time[h2d] / 2)
    assert two.time["host AdamW"] == one.time["host AdamW"]


def test_the_machine_measures_its_host_rates():
    """``Machine.measure`` (``slide-plan plan.measure=true``) times the host's AdamW, gradient sums and matmuls
    here."""
    measured = Machine().measure(seconds=0.02)
    assert measured.host_adamw_params_per_s > 0 and measured.host_add_params_per_s > 0
    assert measured.add_rate == measured.host_add_params_per_s
    assert measured.cpu_flops > 0 and measured.cpu_flops != Machine().cpu_flops


def test_a_run_on_the_cpu_computes_at_the_cpus_rate():
    """On the CPU the compute term is the host's matmul rate (not a GPU's), named so."""
    shape, settings = _llama8b_shape(), Settings(window=2, batch=1, seq=64, clipping=False)
    m = Machine(cpu_flops=2e11, gpu_flops=4e14)
    on_cpu = make_plan(shape, dataclasses.replace(settings, device="cpu"), m, suggest=False)
    on_gpu = make_plan(shape, settings, m, suggest=False)
    flops = 8 * (32 * shape.layer_params + 128256 * 4096) * 64
    assert on_cpu.time["CPU compute (8·N·tokens)"] == pytest.approx(flops / 2e11)
    assert on_gpu.time["GPU compute (8·N·tokens)"] == pytest.approx(flops / 4e14)
    assert "GPU compute (8·N·tokens)" not in on_cpu.time


def test_the_machine_measures_its_disk_under_offload_dir(tmp_path):
    """The disk's rates: written with fsync, read back past the page cache; the file is removed."""
    measured = Machine().measure(offload_dir=str(tmp_path / "offload"), seconds=0.02)
    assert measured.disk_write_bytes_per_s > 0 and measured.disk_read_bytes_per_s > 0
    assert measured.disk_mixed_bytes_per_s > 0
    assert list((tmp_path / "offload").iterdir()) == []
