"""SlideOptions: every option validated once, with a message naming it; "auto" resolved in one place; the strategy,
the engine and the planner see the same values."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import timedelta

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide.engine.options import KERNEL_NAMES, SlideOptions, Tuning, parse_kernels
from lightning_slide.engine.plan import Settings
from lightning_slide.kernels import apply_kernels
from tests.core.tiny import TinyLM, batches, initial_state, trainer


def test_defaults_are_built_once_and_rebuilding_changes_nothing(tmp_path):
    options = SlideOptions()
    assert options.kernels == () and options.offload == () and options.tuning == Tuning(host_weights="fp32")
    defaults = {field.name: field.default for field in dataclasses.fields(Tuning)}
    assert defaults["device_layers"] == defaults["parked_grads"] == defaults["resident_optimizer"] == "auto"
    built = SlideOptions(
        window=3,
        kernels=["swiglu", "rmsnorm"],
        offload_dir=tmp_path,
        offload="both",
        gpu_memory_limit="1.5KiB",
        tuning=dict(host_memory="2GiB", parked_grads="auto"),
    )
    assert built.kernels == ("rmsnorm", "swiglu")  # KERNEL_NAMES order
    assert built.offload_dir == str(tmp_path) and built.offload == ("masters", "optimizer")
    assert built.on_disk == {"masters", "optimizer"}
    assert built.gpu_memory_limit == 1536 and built.tuning.host_memory == 2 * 2**30
    assert built.tuning.host_weights == "compute"  # "auto" with the masters on disk
    for same in (options, built):
        assert dataclasses.replace(same) == same
        assert same.resolve(device="cpu", resident_params=10, gpu_memory=None).resolve(
            device="cpu", resident_params=10, gpu_memory=None
        ) == same.resolve(device="cpu", resident_params=10, gpu_memory=None)


@pytest.mark.parametrize(
    "options, message",
    [
        # the four that used to escape as raw TypeError / OverflowError / ValueError / FileExistsError
        (dict(offload=5), r"offload must be 'optimizer', 'masters', 'both' or a list .*got 5"),
        (dict(kernels=None), r"kernels must be 'all', 'none' or a list of \['rmsnorm'.*got None"),
        (dict(gpu_memory_limit="1e400GB"), r"gpu_memory_limit: not a memory size: '1e400GB'; write e\.g\. '24GiB'"),
        (dict(gpu_memory_limit=float("nan")), r"gpu_memory_limit: not a memory size: nan"),
        (dict(gpu_memory_limit=float("inf")), r"gpu_memory_limit: not a memory size: inf"),
        (dict(offload_dir="FILE"), r"offload_dir '.*a_file' is a file, not a directory"),
        # every other option
        (dict(window=0), r"window must be a positive integer, got 0"),
        (dict(window=True), r"window must be a positive integer, got True"),
        (dict(window="2"), r"window must be a positive integer, got '2'"),
        (dict(blocks=["model.layers"]), r"blocks must be a dotted module path or None"),
        (dict(kernels=["rmsnorm", "flash"]), r"kernels got unknown \['flash'\]; valid: 'all', 'none' or a list of"),
        (dict(kernels={"rope": True}), r"kernels must be"),
        (dict(offload_activations="yes"), r"offload_activations must be True or False, got 'yes'"),
        (dict(offload_dir=3), r"offload_dir must be a directory path or None, got 3"),
        (dict(offload_dir="DIR", offload="weights"), r"offload must be .*got 'weights'"),
        (dict(offload="masters"), r"offload='masters' puts state on disk: set offload_dir"),
        (dict(offload_dir="DIR", offload=[]), r"offload=\[\] puts nothing under offload_dir"),
        (dict(gpu_memory_limit="24 gigs"), r"gpu_memory_limit: not a memory size"),
        (dict(gpu_memory_limit=-1), r"gpu_memory_limit: a memory size must be positive"),
        (dict(gpu_memory_limit=True), r"gpu_memory_limit: not a memory size"),
        (dict(nonfinite="ignore"), r"nonfinite must be 'error' or 'skip', got 'ignore'"),
        (dict(monitor=1), r"monitor must be True or False, got 1"),
        (dict(start_method="thread"), r"start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got 'thread'"),
        (dict(timeout=60), r"timeout must be a positive datetime.timedelta, got 60"),
        (dict(timeout=timedelta(0)), r"timeout must be a positive"),
        (dict(tuning=5), r"tuning must be a dict of \['resident_optimizer', .*'device_layers'\] or None, got 5"),
        (dict(tuning=dict(resident_optimizer="gpu")), r"tuning.resident_optimizer must be 'auto', 'device' or 'host'"),
        (dict(tuning=dict(host_weights="bf16")), r"tuning.host_weights must be 'auto', 'fp32' or 'compute'"),
        (dict(tuning=dict(grad_buffers=0)), r"tuning.grad_buffers must be a positive integer or None, got 0"),
        (dict(tuning=dict(grad_buffers=2.0)), r"tuning.grad_buffers must be a positive integer"),
        (dict(tuning=dict(parked_grads=-1)), r"tuning.parked_grads must be a non-negative integer or 'auto', got -1"),
        (dict(tuning=dict(parked_grads="most")), r"tuning.parked_grads must be .* or 'auto', got 'most'"),
        (dict(tuning=dict(host_memory="lots")), r"tuning.host_memory: not a memory size: 'lots'"),
        (
            dict(offload_dir="DIR", offload="masters", tuning=dict(host_weights="fp32")),
            r"host_weights='fp32' uploads from fp32 masters .* masters on disk; use host_weights='compute' or 'auto'",
        ),
    ],
)
def test_every_option_is_validated_with_a_message_naming_it(options, message, tmp_path):
    (tmp_path / "a_file").write_text("")
    paths = {"FILE": str(tmp_path / "a_file"), "DIR": str(tmp_path / "dir")}
    options = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        SlideOptions(**options)
    with pytest.raises(ValueError, match=message):  # the strategy takes the same options and says the same
        lightning_slide.SlideFormerStrategy(**options)


def test_the_strategy_takes_at_most_twelve_options_and_groups_the_tuning():
    names = list(inspect.signature(lightning_slide.SlideFormerStrategy).parameters)
    assert len(names) <= 12 and "tuning" in names
    assert not set(Tuning.names()) & set(names)  # the planner's choices are only in the group
    assert set(names) - {"tuning"} == {f.name for f in dataclasses.fields(SlideOptions)} - {"tuning"}
    with pytest.raises(ValueError, match=r"tuning got unknown option\(s\) \['buffers'\]; it takes \['resident_opt"):
        lightning_slide.SlideFormerStrategy(tuning=dict(buffers=4))
    as_dict = lightning_slide.SlideFormerStrategy(tuning=dict(grad_buffers=2, parked_grads=24))
    as_tuning = lightning_slide.SlideFormerStrategy(tuning=Tuning(grad_buffers=2, parked_grads=24))
    assert as_dict.options == as_tuning.options and as_dict.options.tuning.grad_buffers == 2


def test_auto_is_resolved_in_one_place(tmp_path):
    # At construction, from the options alone: host_weights.
    assert SlideOptions().tuning.host_weights == "fp32"
    assert SlideOptions(offload_dir=tmp_path).tuning.host_weights == "fp32"  # only the moments on disk
    assert SlideOptions(offload_dir=tmp_path, offload="masters").tuning.host_weights == "compute"
    # With the run: resident_optimizer from the device and the GPU's memory (16 B/param within a quarter of it).
    options = SlideOptions()
    gib = 2**30

    def decide(device, params, memory):
        return options.resolve(device=device, resident_params=params, gpu_memory=memory).tuning.resident_optimizer

    assert decide("cpu", 10, 24 * gib) == "host"
    assert decide("cuda", gib // 4, 16 * gib) == "device"  # 4 GiB of 16
    assert decide("cuda", gib // 4 + 1, 16 * gib) == "host"
    assert decide(torch.device("cuda", 0), 10, None) == "host"
    assert SlideOptions(tuning=dict(resident_optimizer="device")).resolve(device="cpu").resident_on_device
    assert options.resolve().tuning.resident_optimizer == "auto"  # nothing given, nothing decided
    # At the first batch: parked_grads, from that batch's plan; until then none park.
    parked = SlideOptions(tuning=dict(parked_grads="auto"))
    assert parked.tuning.parked_now == 0 and parked.resolve(device="cpu").tuning.parked_grads == "auto"
    assert parked.resolve(parked_grads=7).tuning.parked_grads == 7
    assert SlideOptions(tuning=dict(parked_grads=3)).resolve(parked_grads=7).tuning.parked_grads == 3
    with pytest.raises(ValueError, match="resolve"):
        Settings.of(options)  # the planner takes decided options only


def test_kernel_names_are_parsed_in_one_place():
    assert parse_kernels("all") == KERNEL_NAMES and parse_kernels(["all"]) == KERNEL_NAMES
    assert parse_kernels("none") == parse_kernels([]) == parse_kernels(["none"]) == ()
    assert parse_kernels("rope") == ("rope",)
    assert parse_kernels(("fused_linear_cross_entropy", "rmsnorm")) == ("rmsnorm", "fused_linear_cross_entropy")
    with pytest.raises(ValueError, match=r"kernels got unknown \['flash'\]; valid: 'all', 'none' or a list"):
        apply_kernels(torch.nn.Linear(2, 2), ["flash"])  # apply_kernels parses with the same function
    assert apply_kernels(torch.nn.Linear(2, 2), "none") == []


class _Seen(L.Callback):
    """What the strategy, its engine and its planner hold at the start of training and after the first batch."""

    def on_train_start(self, trainer, module):
        strategy = trainer.strategy
        self.given, self.engine, self.run = strategy.options, strategy.engine.options, strategy._run_plan.options
        self.settings = strategy.plan.settings

    def on_train_batch_end(self, trainer, module, *args):
        if not hasattr(self, "first"):
            self.first = (trainer.strategy._run_plan.options, trainer.strategy.plan.settings)


@pytest.mark.parametrize(
    "tuning", [dict(grad_buffers=3, resident_optimizer="device"), dict(parked_grads="auto", host_weights="compute")]
)
def test_the_strategy_the_engine_and_the_planner_see_the_same_values(tuning):
    seen = _Seen()
    strategy = lightning_slide.SlideFormerStrategy(
        window=2, kernels="rmsnorm", offload_activations=True, gpu_memory_limit="1GiB", tuning=tuning
    )
    trainer(strategy, max_steps=2, precision="bf16-true", callbacks=[seen]).fit(
        TinyLM("llama", initial_state("llama")), batches(4)
    )
    assert seen.engine == seen.run  # one resolved object
    assert seen.engine.tuning.resident_optimizer != "auto"
    assert dataclasses.replace(seen.engine, tuning=seen.given.tuning) == seen.given  # only "auto" was decided
    facts = {
        f: getattr(seen.settings, f)
        for f in ("compute_dtype", "device", "clipping", "accumulate", "ranks", "masters_shared_by", "kernels")
    }
    assert seen.settings == Settings.of(seen.engine, **facts)
    assert seen.settings.window == 2 and seen.settings.offload_activations and seen.settings.kernels == ("rmsnorm",)
    run, settings = seen.first  # the first batch's plan decides parked_grads="auto"
    assert run.tuning.parked_grads != "auto" and settings.parked_grads == run.tuning.parked_now
