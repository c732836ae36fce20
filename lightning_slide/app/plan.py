"""``slide-plan``: what a ``slide-train`` run will need (GPU memory, host memory, disk, step time), before running it.

It takes the same Hydra config and overrides as ``slide-train`` (plus the ``plan.*`` options of ``conf/train.yaml``),
reads only the model's ``config.json`` (no weights: the model is built on the meta device to count parameters), and
prints the planner's table (:mod:`lightning_slide.engine.plan`). Exit status: 0 when the run fits, 1 when it does not
(the message says what to change), 2 for a bad option.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_slide.app.data import DEFAULT_MAX_LENGTH
from lightning_slide.app.errors import ModelDirError, SlideAppError
from lightning_slide.app.loading import stored_bytes, weight_files
from lightning_slide.app.module import CausalLMModule
from lightning_slide.app.train import CONF, build_piece, target_of
from lightning_slide.engine.options import KERNEL_NAMES, SlideOptions, parse_kernels
from lightning_slide.engine.plan import (
    RUNTIME_HOST_BYTES,
    Machine,
    ModelShape,
    Plan,
    Settings,
    make_plan,
    parse_bytes,
    with_most_that_fit,
)

USAGE = """usage: slide-plan [group=option ...] [key=value ...]

The same overrides as slide-train (model=..., model.path=..., data.batch_size=..., data.max_length=...,
strategy.window=..., strategy.gpu_memory_limit=..., kernels=all, trainer.accumulate_grad_batches=...), plus:
  plan.batch, plan.seq          batch size and sequence length (default: data.batch_size, data.max_length)
  plan.gpu_memory               GPU memory to plan for, e.g. 24GiB (default: strategy.gpu_memory_limit, else this GPU)
  plan.host_memory              host memory to plan for (default: MemAvailable of this machine)
  plan.disk_free                disk space to plan for under offload_dir (default: free space there, if set)
  plan.measure=true             measure host AdamW, H2D/D2H, GPU (or CPU) FLOP/s and the disk here, not the defaults
  plan.h2d, plan.d2h, plan.disk_read, plan.disk_write, plan.disk_mixed (read + written at once) (bytes/s),
  plan.adamw (params/s), plan.tflops (TFLOP/s of the GPU, or of the CPU for a CPU run)
  plan.json=FILE                also write the plan as JSON
Only the model's config.json is read (model.path may hold nothing else); a shape config plans without any
directory (slide-plan model=llama3_8b). Without a GPU here (and no plan.gpu_memory) it plans the CPU run, as
slide-train would train here. Exit status 1: the run does not fit."""

_RATES = {
    "h2d": "h2d_bytes_per_s",
    "d2h": "d2h_bytes_per_s",
    "disk_read": "disk_read_bytes_per_s",
    "disk_write": "disk_write_bytes_per_s",
    "disk_mixed": "disk_mixed_bytes_per_s",
    "adamw": "host_adamw_params_per_s",
}


def compose_config(overrides: list[str]) -> DictConfig:
    """The app's config for these command-line overrides (as ``slide-train`` composes it)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def model_config(node: DictConfig) -> Any:
    """The Hugging Face config of ``cfg.model``: ``config.json`` of ``model.path`` or ``model.config``'s fields."""
    trust = bool(node.get("trust_remote_code", False))
    if node.get("path") is not None:
        path = Path(node.path)
        if not (path / "config.json").is_file():
            raise ModelDirError(f"model.path {str(path)!r} has no config.json (slide-plan needs only that file)")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    elif node.get("config") is not None:
        fields = OmegaConf.to_container(node.config, resolve=True)
        if "vocab_size" not in fields and node.get("tokenizer"):
            fields["vocab_size"] = len(AutoTokenizer.from_pretrained(node.tokenizer, trust_remote_code=trust))
        config = AutoConfig.for_model(**fields)
    elif "model_type" in (node.get("expect") or {}):
        # A shape config (model=llama3_8b) records the model's shape: enough to plan, no directory needed.
        return AutoConfig.for_model(**OmegaConf.to_container(node.expect, resolve=True))
    else:
        raise SlideAppError(
            "missing required options: the model directory: model.path=/path/to/model "
            "(only its config.json is read), or a shape config such as model=llama3_8b"
        )
    wrong = {k: v for k, v in (node.get("expect") or {}).items() if getattr(config, k, None) != v}
    if wrong:
        raise ModelDirError(
            f"model.path {str(node.path)!r} is not the model this config describes (expected "
            f"{dict(wrong)}); pick the matching model=..., or model=causal_lm"
        )
    return config


def meta_root(config: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model on the meta device, inside a module at ``.model`` as in ``CausalLMModule`` (so that
    ``strategy.blocks`` paths mean the same); no memory is allocated."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    root = torch.nn.Module()
    root.model = model
    return root


def own_module_on_meta(cfg: DictConfig) -> torch.nn.Module:
    """A module of yours (``model._target_=...``), built as ``slide-train`` builds it but on the meta device, with its
    ``configure_model``: only the shapes of its parameters are needed."""
    try:
        with torch.device("meta"):
            module = build_piece("model", cfg.model)
            module.configure_model()
    except SlideAppError:
        raise
    except Exception as e:  # its own code: say what failed, and the way around it
        raise SlideAppError(
            f"model._target_={cfg.model._target_} cannot be built on the meta device to count its "
            f"parameters ({type(e).__name__}: {e}); plan it in Python: "
            "lightning_slide.engine.plan.ModelShape.of(module) and make_plan"
        ) from None
    return module


def strategy_options(node: DictConfig) -> SlideOptions:
    """The options of ``cfg.strategy``, validated as ``SlideFormerStrategy`` validates them."""
    if node.get("_target_") != "lightning_slide.SlideFormerStrategy":
        raise SlideAppError("slide-plan plans the slideformer strategy; drop strategy=... or use strategy=slideformer")
    fields = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    try:
        return SlideOptions(**fields)
    except (TypeError, ValueError) as e:
        raise SlideAppError(f"strategy: {e}") from None


def plan_from_config(cfg: DictConfig) -> Plan:
    """The plan of the run ``cfg`` describes (the app's composed config)."""
    strategy = strategy_options(cfg.strategy)
    if issubclass(target_of("model", cfg.model), CausalLMModule):
        config = model_config(cfg.model)
        root = meta_root(config, bool(cfg.model.get("trust_remote_code", False)))
    else:
        root = own_module_on_meta(cfg)
        config = getattr(getattr(root, "model", None), "config", None)
    shape = ModelShape.of(root, strategy.blocks)
    options = cfg.get("plan") or {}
    limit = options.get("gpu_memory") or strategy.gpu_memory_limit
    device = planned_device(cfg.trainer, gpu_memory_given=limit is not None)
    machine = Machine.detect(
        gpu_memory_limit=None if limit is None else parse_bytes(limit),
        offload_dir=strategy.offload_dir,
        tier=(shape.layers, strategy.on_disk),
    )
    host_memory = options.get("host_memory") or strategy.tuning.host_memory
    if host_memory is not None:
        machine.host_memory = parse_bytes(host_memory)
    if options.get("disk_free") is not None:
        machine.disk_free = parse_bytes(options.disk_free)
    if options.get("measure"):
        bf16 = cfg.model.get("moments") == "bf16"
        machine = machine.measure(strategy.offload_dir, moments=torch.bfloat16 if bf16 else torch.float32)
    for key, field in _RATES.items():
        if options.get(key) is not None:
            setattr(machine, field, float(options[key]))
    if options.get("tflops") is not None:  # the compute device's
        setattr(machine, "gpu_flops" if device == "cuda" else "cpu_flops", float(options.tflops) * 1e12)

    names = cfg.kernels.names  # the app's kernels (applied by the module) and the strategy's
    try:
        module_kernels = parse_kernels(OmegaConf.to_object(names) if OmegaConf.is_list(names) else names)
    except ValueError as e:
        raise SlideAppError(str(e)) from None
    kernels = tuple(n for n in KERNEL_NAMES if n in module_kernels or n in strategy.kernels)
    context = getattr(config, "max_position_embeddings", None)
    seq = options.get("seq") or cfg.data.get("max_length") or min(DEFAULT_MAX_LENGTH, context or DEFAULT_MAX_LENGTH)
    # "auto", as the strategy decides it for this device
    strategy = strategy.resolve(device=device, resident_params=shape.resident_params, gpu_memory=machine.gpu_memory)
    if device == "cuda" and OmegaConf.is_interpolation(cfg.trainer, "precision"):
        precision = "bf16-true"  # the default, ${slide.precision:}, resolved for a GPU rather than this machine
    else:
        precision = str(cfg.trainer.get("precision"))
    settings = Settings.of(
        strategy,
        batch=int(options.get("batch") or cfg.data.batch_size),
        seq=int(seq),
        compute_dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float32,
        device=device,
        kernels=kernels,
        clipping=_clipping(cfg.trainer) == "clipping by norm",  # by value, updates stream as without clipping
        accumulate=int(cfg.trainer.get("accumulate_grad_batches") or 1),
        ranks=_ranks(cfg.trainer),
        masters_shared_by=_ranks(cfg.trainer) if int(cfg.trainer.get("num_nodes") or 1) == 1 else 1,
        moments_dtype=torch.bfloat16 if cfg.model.get("moments") == "bf16" else torch.float32,
    )
    if machine.host_memory is not None and settings.ranks > 1:
        machine.host_memory //= settings.ranks  # the items are one rank's; the ranks share this host
    plan = make_plan(shape, settings, machine)
    for option in ("device_layers", "parked_grads"):  # "auto" as the first batch decides it (layers kept first)
        if getattr(strategy.tuning, option) == "auto":
            plan = with_most_that_fit(plan, option)
            why = " (several micro-batches per step)" if option == "parked_grads" and settings.accumulate > 1 else ""
            plan.notes.append(f"tuning.{option}='auto' -> {getattr(plan.settings, option)} at this batch{why}")
    if issubclass(target_of("model", cfg.model), CausalLMModule):  # it loads or builds the model whole first
        model_bytes, how = loading_bytes(cfg.model, config, shape.params)
        plan.host_at_setup = RUNTIME_HOST_BYTES[device] + model_bytes
        plan.notes.append(f"at setup the model is loaded whole ({how}) before the strategy splits it")
    if cfg.model.get("path") is None and cfg.model.get("config") is None:
        plan.notes.append("the model's shape comes from its config (model.expect): no model directory was read")
    if device == "cpu" and cfg.trainer.get("accelerator") != "cpu":
        plan.notes.append(
            "no GPU here: this is the CPU run slide-train would make (the compute buffers are host "
            "memory); plan.gpu_memory=... plans a GPU run"
        )
    elif machine.gpu_memory is None:
        plan.notes.append("no GPU here and no plan.gpu_memory / strategy.gpu_memory_limit: the GPU is not checked")
    return plan


def loading_bytes(node: DictConfig, config: Any, params: int) -> tuple[int, str]:
    """Host bytes of the app's model as it loads, whole, and how they were counted: a checkpoint's weights as stored
    (slideformer keeps them so), a config's dtype where only ``config.json`` is there, fp32 for a model built from a
    config, and a bf16 checkpoint (as hub models of these shapes are) for a shape config alone."""
    if node.get("path") is not None:
        try:
            return stored_bytes(weight_files(node.path)), "its weights as stored"
        except ModelDirError:  # slide-plan needs only config.json: its dtype then
            dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
            element = 2 if dtype.endswith(("bfloat16", "float16")) else 4
            return element * params, f"no weights here: {dtype.removeprefix('torch.')}, as config.json says"
    if node.get("config") is not None:
        return 4 * params, "built from its config in fp32"
    return 2 * params, "no model directory: a bf16 checkpoint assumed"


def planned_device(trainer: DictConfig, gpu_memory_given: bool) -> str:
    """``"cuda"`` or ``"cpu"``: where the run computes. As Lightning's ``accelerator=auto`` does for ``slide-train``,
    a machine without a GPU runs on the CPU, unless a GPU size is given (a plan for a GPU machine elsewhere)."""
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator == "cpu":
        return "cpu"
    if accelerator == "auto" and not torch.cuda.is_available() and not gpu_memory_given:
        return "cpu"
    return "cuda"


def _clipping(trainer) -> str:
    """How the run clips gradients, in the words the summary line prints."""
    if not trainer.get("gradient_clip_val"):
        return "no clipping"
    return "clipping by value" if trainer.get("gradient_clip_algorithm") == "value" else "clipping by norm"


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``slide-plan [overrides]``; prints the plan, returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        cfg = compose_config(argv)
        plan = plan_from_config(cfg)
    except ConfigCompositionException as e:
        print(f"slide-plan: error: {e}", file=sys.stderr)
        return 2
    except SlideAppError as e:
        print(f"slide-plan: error: {e}", file=sys.stderr)
        return 2
    s = plan.settings
    print(
        f"slide-plan: {_count(plan.shape.params)} parameters, {plan.shape.layers} layers; batch {s.batch} x "
        f"seq {s.seq}, window {s.window}, {str(s.compute_dtype).removeprefix('torch.')}, "
        f"accumulate {s.accumulate}, {_clipping(cfg.trainer)}, {'on the CPU, ' if s.device == 'cpu' else ''}kernels "
        f"{', '.join(s.kernels) or 'none'}, resident optimizer on the {'GPU' if s.resident_on_device else 'host'}"
        f"{', offload_activations' if s.offload_activations else ''}"
        f"{f', offload_dir {s.offload_dir}' if s.offload_dir else ''}"
        f"{f'; {s.ranks} ranks (memory per rank, the host shared by them)' if s.ranks > 1 else ''}"
    )
    print(plan.table())
    target = (cfg.get("plan") or {}).get("json")
    if target:
        Path(target).write_text(json.dumps(plan.to_dict(), indent=2, default=str))
    problems = plan.problems()
    if problems:
        print("slide-plan: does not fit: " + "; ".join(problems) + ".\nTo fit: " + "; ".join(plan.advice()) + ".")
        return 1
    return 0


def console() -> None:
    sys.exit(main())


def _count(n: int) -> str:
    """A parameter count in the largest unit that keeps it at least 1: ``"8.03B"``, ``"3.2M"``, ``"96K"``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _ranks(trainer) -> int:
    """Data-parallel ranks of the run: ``trainer.devices`` (a count, or a list of devices) x ``trainer.num_nodes``;
    ``"auto"`` and the like count as one."""
    devices = trainer.get("devices", 1)
    count = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, ListConfig)) else 1
    return max(1, count) * int(trainer.get("num_nodes") or 1)


if __name__ == "__main__":
    console()
