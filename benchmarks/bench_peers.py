"""slideformer against the offloading peers a user would pick, each tuned as its user would, in one invocation.

usage: python benchmarks/bench_peers.py [--shapes llama3_2_3b:8,llama3_2_3b:32,llama3_1_8b:4] [--seq 1024]
                                        [--systems all_on_gpu,fsdp_offload,fsdp2_offload,deepspeed_offload,zenflow,
                                                   slideformer]
                                        (slideformer options: slideformer+bf16 = host_weights="compute",
                                         slideformer+acts = offload_activations=True,
                                         slideformer+buffers8 = grad_buffers=8,
                                         slideformer+park24 = parked_grads=24 (+park0: none),
                                         slideformer+dev4 = device_layers=4 (+dev0: none; default "auto"),
                                         slideformer+bf16moments = lightning_slide.optim.AdamW with
                                         state_dtype=torch.bfloat16 (bf16 Adam moments); combine with +;
                                         any system+lora16 = LoRA of rank 16 on every linear layer but the head,
                                         through peft: the base weights frozen; any system+gradnorm = the
                                         gradient norm logged by lightning_slide.GradNormMonitor at every step,
                                         +normhook = by a hook, as Lightning's docs show: grad_norm(self) in
                                         on_before_optimizer_step)
                                        [--cap 24GiB] [--steps 3] [--accumulate 1] [--window 2] [--devices 1]
                                        [--clip 1.0] [--clip-by value] [--dry-run]

The systems, as a user tuning each would run it (AdamW, lr 1e-5, weight decay 0.01 everywhere; fp32 masters):
- ``all_on_gpu``: everything on the GPU, uncapped (the ceiling): ``"bf16-mixed"``, ``torch.optim.AdamW(fused=True)``.
- ``gpu_compute``: the bound's GPU-compute term where all-on-GPU cannot fit (8B at batch 16 on one H200): bf16 weights
  on the GPU, uncapped, forward and backward only (no optimizer: Lightning's mock one; gradients dropped each step).
- ``fsdp_offload``: ``FSDPStrategy(cpu_offload=True)`` wrapping each decoder layer, ``"bf16-mixed"`` (fp32 flat
  parameters on the host), ``torch.optim.AdamW(fused=True)`` stepping them there (torch's fused host kernel).
- ``fsdp2_offload``: FSDP2 (``fully_shard`` on each decoder layer and the root, through Lightning's
  ``ModelParallelStrategy``) with ``CPUOffloadPolicy``: fp32 shards on the host (pinned), bf16 compute and fp32
  gradient reduction (``MixedPrecisionPolicy``), ``torch.optim.AdamW(fused=True)`` stepping them there: what a user
  tuning FSDP for one GPU tries where ``fsdp_offload`` runs out of GPU memory (8B under the 24 GiB cap). Lightning's
  strategy would move the whole module to the GPU, which FSDP2's offload refuses: the row's moves only the buffers.
- ``deepspeed_offload``: ZeRO-3 with optimizer and parameter offload to pinned host memory, ``"bf16-mixed"`` (DeepSpeed
  bf16, fp32 masters on the host), ``DeepSpeedCPUAdam``; where its C++ op cannot build, torch's fused AdamW on the
  host, and the row names the optimizer that ran.
- ``zenflow``: DeepSpeed's ZenFlow (DeepSpeed >= 0.17.5; ZeRO-2 with the optimizer offloaded to pinned host memory,
  bf16 parameters stay on the GPU): ``zero_optimization.zenflow`` = ``ZENFLOW`` below, the DeepSpeed tutorial's
  settings; the top 5% gradient columns are updated on the GPU every step, the rest accumulate and are updated on the
  host (``ZenFlowCPUAdam``, built by DeepSpeed from the config's ``optimizer`` block) every 4 steps, overlapped with
  the next steps (``overlap_step``: a process of its own holding two copies of the Adam state; ``+sequential``: in
  the training process, between steps, where the overlapped one does not fit the host). Its s/step is the mean over
  whole update intervals after one interval of warm-up (the median of the others would hide the update steps), and
  it has no "of bound": it does not take an AdamW step every step. Its peak host memory is the machine's rise in use
  (its optimizer process included), not the training process's RSS.
- ``slideformer``: ``"bf16-true"`` (the strategy keeps fp32 masters and runs the host AdamW itself).
Without DeepSpeed installed (or a DeepSpeed without ZenFlow) those rows say so. ``--dry-run`` builds every system's
strategy, precision and optimizer on the CPU and prints them (and the ZenFlow config), training nothing.

slideformer's rows also say, per timed step, how long the host thread was busy (of which waiting for the device) and
the training thread blocked on it, and how long a thread waited to get the GIL back (``GilProbe``).

Each (system, shape, batch) runs in its own child process (a peer that runs out of memory cannot disturb the next
one) and prints one JSON line; the parent prints a markdown table with tokens/s, TFLOP/s (6·N·tokens), peak GPU
memory, peak host RSS, the ratio to all-on-GPU and the fraction of the per-step lower bound
max(GPU compute, 4N bytes / H2D, 2N bytes / D2H, N / host AdamW) reached (bandwidths from BENCHMARKING.md;
GPU compute is the ``gpu_compute`` step time of the same run when it ran, else the all-on-GPU one). With LoRA
(``+loraK``) N counts every parameter and the bound's terms count what moves: the frozen weights go up in bf16 (2
bytes), only the adapters' T parameters come down and are updated: max(GPU compute, (2(N - T) + 4T) / H2D, 2T / D2H,
T / host AdamW); the GPU-compute term and the ratio come from the last such row before (list ``all_on_gpu+lora16``
first for them). Below each shape's rows, when FSDP offload ran: each system's tokens/s over FSDP offload's.
Same model, batch, sequence length, kernels ("all") and per-layer activation checkpointing for every system; the
offloading systems run under the GPU memory cap, all-on-GPU uncapped.

``--devices N``: every system trains data-parallel on N GPUs of the machine (Lightning's launcher, one process per
GPU, ``batch`` per GPU: a global batch of N x batch), each GPU under the cap; tokens/s counts every GPU's tokens,
peak host memory is rank 0's (per-rank memory is what sharding lowers), and the bound divides the transfers by N
(each GPU moves its share) but not the host AdamW (the ranks share the host's cores).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_shapes import SHAPES

H2D_BYTES_PER_S = 55e9
D2H_BYTES_PER_S = 55e9
HOST_ADAMW_PARAMS_PER_S = 3.6e9

LR, WEIGHT_DECAY = 1e-5, 0.01  # every system's AdamW
WARMUP_STEPS = 2
ZENFLOW_MIN_DEEPSPEED = "0.17.5"  # the release with deepspeed/runtime/zenflow (ZeRO stage 1 and 2)
# The ZenFlow tutorial's block (docs/_tutorials/zenflow.md in deepspeedai/DeepSpeed, deepspeed.ai/tutorials/zenflow);
# keys as ZenFlowConfig (deepspeed/runtime/zenflow/zenflow_config.py) reads them. "auto" selection re-selects the
# important columns once per epoch, and Lightning gives DeepSpeed no data loader to count an epoch: in this run the
# columns are selected at the first step only. update_interval is a number (not "auto") so that the timed steps can
# cover whole update intervals.
ZENFLOW = {
    "topk_ratio": 0.05,
    "select_strategy": "auto",
    "select_interval": "auto",
    "update_interval": 4,
    "full_warm_up_rounds": 0,
    "overlap_step": True,
}


def zenflow_config(overlap: bool = True) -> dict:
    """The DeepSpeed config of the ``zenflow`` row, for ``DeepSpeedStrategy(config=...)`` (Lightning adds bf16, the
    micro-batch size, gradient accumulation and clipping). The ``optimizer`` block makes DeepSpeed build
    ``ZenFlowCPUAdam`` (ZenFlow's host step needs it: a torch optimizer lacks its step signature)."""
    return {
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "contiguous_gradients": True,
            "overlap_comm": True,
            "allgather_bucket_size": 200_000_000,
            "reduce_bucket_size": 200_000_000,
            "zenflow": {**ZENFLOW, "overlap_step": overlap},
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": WEIGHT_DECAY},
        },
    }


def fsdp2_offload_strategy(devices: int):
    """Lightning's FSDP2 strategy for the ``fsdp2_offload`` row (the module shards itself: ``shard_fsdp2``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class HostShards(ModelParallelStrategy):
        def model_to_device(self) -> None:
            # FSDP2's CPU offload keeps the shards on the host and refuses them anywhere else: the buffers alone go
            for module in self.model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    setattr(module, name, buffer.to(self.root_device))

    return HostShards(data_parallel_size=devices, tensor_parallel_size=1)


def shard_fsdp2(model, mesh) -> None:
    """``fully_shard`` on each decoder layer, then the root: fp32 shards offloaded to pinned host memory, bf16
    compute, fp32 gradient reduction (as torchtitan runs FSDP2 with CPU offload)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if isinstance(model, FSDPModule):
        return
    policy = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu"),
    }
    for layer in [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)


def options_of(system: str) -> tuple[str, list[str], int | None]:
    """The base system, its + options and the LoRA rank (None without ``+loraK``)."""
    base, *options = system.split("+")
    lora = [int(o[len("lora") :]) for o in options if o.startswith("lora")]
    return base, options, lora[0] if lora else None


def setup(system: str, args) -> dict:
    """How ``system`` trains, without touching the GPU: {"strategy", "precision", "optimizer" (params -> optimizer,
    or None where DeepSpeed builds it from its config), "optimizer_name", "capped" (under the GPU memory cap),
    "warmup", "timed" (steps), "mean" (s/step as the mean, else the median)}, or {"error": ...}."""
    import torch

    base, options, lora = options_of(system)
    done = {
        "capped": base in ("fsdp_offload", "fsdp2_offload", "deepspeed_offload", "zenflow"),
        "warmup": WARMUP_STEPS,
        "timed": args.steps,
        "mean": False,
    }

    def fused_adamw(params):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    if base == "all_on_gpu":
        strategy = "ddp" if args.devices > 1 else "auto"
        return {
            **done,
            "strategy": strategy,
            "precision": "bf16-mixed",
            "optimizer": fused_adamw,
            "optimizer_name": "AdamW fused",
        }
    if base == "gpu_compute":
        return {**done, "strategy": "auto", "precision": "bf16-true", "optimizer": None, "optimizer_name": "none"}
    if base == "fsdp_offload":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # frozen and trainable parameters in one flat parameter (LoRA) need FSDP's original parameters
        strategy = FSDPStrategy(cpu_offload=True, auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=bool(lora))
        return {
            **done,
            "strategy": strategy,
            "precision": "bf16-mixed",
            "optimizer": fused_adamw,
            "optimizer_name": "AdamW fused, host",
        }
    if base == "fsdp2_offload":
        return {
            **done,
            "strategy": fsdp2_offload_strategy(args.devices),
            "precision": "bf16-mixed",
            "optimizer": fused_adamw,
            "optimizer_name": "AdamW fused, host",
        }
    if base in ("deepspeed_offload", "zenflow"):
        try:
            import deepspeed
        except ImportError:
            return {"error": "deepspeed not installed"}
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if base == "zenflow":
            try:
                from deepspeed.ops.adam import ZenFlowCPUAdam
                from deepspeed.runtime.zenflow.zenflow_config import ZenFlowConfig  # noqa: F401
            except ImportError:
                return {
                    "error": f"ZenFlow needs deepspeed >= {ZENFLOW_MIN_DEEPSPEED} (installed {deepspeed.__version__})"
                }
            try:  # ZenFlowCPUAdam is DeepSpeedCPUAdam's C++ op (compiled on first use): no torch fallback here
                ZenFlowCPUAdam([torch.nn.Parameter(torch.zeros(1))])
            except Exception as error:  # noqa: BLE001 - no compiler/CUDA headers there: the row says so
                return {"error": f"ZenFlowCPUAdam unavailable ({type(error).__name__}: {str(error)[:80]})"}
            update = ZENFLOW["update_interval"]  # whole update intervals, after one of warm-up
            return {
                **done,
                "strategy": DeepSpeedStrategy(config=zenflow_config(overlap="sequential" not in options)),
                "precision": "bf16-mixed",
                "optimizer": None,
                "optimizer_name": "ZenFlowCPUAdam",
                "warmup": max(WARMUP_STEPS, update),
                "timed": update * math.ceil(args.steps / update),
                "mean": True,
            }
        strategy = DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True, pin_memory=True)
        try:  # DeepSpeed's own host Adam (its C++ op is compiled on first use), as its docs recommend for offload
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])
            return {
                **done,
                "strategy": strategy,
                "precision": "bf16-mixed",
                "optimizer_name": "DeepSpeedCPUAdam",
                "optimizer": lambda params: DeepSpeedCPUAdam(params, lr=LR, weight_decay=WEIGHT_DECAY),
            }
        except Exception as error:  # noqa: BLE001 - no compiler/CUDA headers there: torch's AdamW, said in the row
            print(f"DeepSpeedCPUAdam unavailable ({type(error).__name__}: {error}); torch AdamW instead", flush=True)
            strategy.config["zero_force_ds_cpu_optimizer"] = False
            return {
                **done,
                "strategy": strategy,
                "precision": "bf16-mixed",
                "optimizer": fused_adamw,
                "optimizer_name": "AdamW fused, host: DeepSpeedCPUAdam did not build",
            }
    if base != "slideformer":
        return {"error": f"unknown system {base!r}"}
    # slideformer, with options: "+bf16" host_weights="compute", "+acts" offload_activations=True,
    # "+buffersK": grad_buffers=K (layer gradient buffers on the host while updates stream; default window + 2),
    # "+parkK": parked_grads=K (layer gradients the GPU may hold while no host buffer is free),
    # "+devK": device_layers=K (the first K layers kept and updated on the GPU),
    # "+bf16moments": lightning_slide.optim.AdamW(state_dtype=torch.bfloat16) (bf16 Adam moments on the host),
    # "+threadsK": torch.set_num_threads(K) in the run, "+thp": huge pages for host memory (any system; see main)
    import lightning_slide

    buffers = [int(o[len("buffers") :]) for o in options if o.startswith("buffers")]
    parked = [o[len("park") :] for o in options if o.startswith("park")]
    parked = [p if p == "auto" else int(p) for p in parked]
    device = [o[len("dev") :] for o in options if o.startswith("dev")]
    device = [d if d == "auto" else int(d) for d in device]
    if "bf16moments" in options:
        try:
            from lightning_slide.optim import AdamW as SlideAdamW
        except ImportError:
            return {"error": "lightning_slide.optim.AdamW not available"}

        def optimizer(params):
            return SlideAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, state_dtype=torch.bfloat16)

        name = "lightning_slide AdamW, bf16 moments"
    else:

        def optimizer(params):  # the engine runs it as its host loop (torch's fused kernel within a rounding)
            return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

        name = "AdamW"
    tuning = dict(
        host_weights="compute" if "bf16" in options else "fp32",
        host_memory=args.host_memory,
        grad_buffers=buffers[0] if buffers else None,
        # only when asked for: an engine from before these options (gpu_session.sh before_after) runs the rest
        **({"parked_grads": parked[0]} if parked else {}),
        **({"device_layers": device[0]} if device else {}),
    )
    # Before 2026-12 the tuning options were the strategy's own arguments (gpu_session.sh before_after runs that).
    nested = "tuning" in inspect.signature(lightning_slide.SlideFormerStrategy).parameters
    strategy = lightning_slide.SlideFormerStrategy(
        window=args.window,
        gpu_memory_limit=args.cap,
        monitor=False,
        offload_activations="acts" in options,
        **({"tuning": tuning} if nested else tuning),
    )
    return {**done, "strategy": strategy, "precision": "bf16-true", "optimizer": optimizer, "optimizer_name": name}


def lightning_slide_callback(name: str):
    """A callback of lightning_slide, imported only where a row asks (an engine from before it may run the others)."""
    import lightning_slide

    return getattr(lightning_slide, name)()


def child(system: str, shape: str, batch: int, args) -> dict:
    """Train one system for warm-up + timed steps; returns its measurements."""
    base, options, lora = options_of(system)
    if lora:
        try:
            import peft
        except ImportError:  # the GPU machine may lack it: carry its wheel (and accelerate's) along
            return {"error": "peft not installed (../shared/tools/device-wheels.sh peft accelerate)"}
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM, LlamaConfig

    threads = [int(o[len("threads") :]) for o in options if o.startswith("threads")]
    if threads:  # "+threadsK": K host threads for torch's CPU ops (the host AdamW), the rest left to the others
        torch.set_num_threads(threads[0])

    from lightning_slide.engine.plan import parse_bytes
    from lightning_slide.kernels import apply_kernels

    cap = parse_bytes(args.cap)
    devices = args.devices
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=args.seq)

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            # Random init runs on the GPU (seconds instead of minutes for billions of parameters on the host), then
            # the model starts on the host like a user's model would; the same seed gives every system one model.
            with torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))):  # each rank on its own GPU
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            self.model = model.to("cpu")
            apply_kernels(self.model, "all")
            if base != "slideformer":  # slideformer recomputes every layer by construction
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if lora:  # after the kernels: they patch the stock modules, LoRA wraps the linear layers inside them
                adapters = peft.LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear")
                self.model = peft.get_peft_model(self.model, adapters)
            self.times: list[float] = []
            self.engine_stats: list[dict] = []

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

        def on_train_batch_start(self, batch, batch_idx):
            if base == "gpu_compute":  # Lightning's mock optimizer leaves the gradients: drop them
                self.zero_grad(set_to_none=True)
            if batch_idx % args.accumulate:  # timed per optimizer step: from its first micro-batch to its last
                return
            torch.cuda.synchronize()
            self._start = time.perf_counter()
            if batch_idx == run["warmup"] * args.accumulate:
                self.timed_from = self._start

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if (batch_idx + 1) % args.accumulate:
                return
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)
            engine = getattr(self.trainer.strategy, "engine", None)
            if engine is not None:  # slideformer: cumulative host-busy / compute-blocked seconds
                self.engine_stats.append(engine.stats())

        def configure_model(self):
            if base == "fsdp2_offload":
                shard_fsdp2(self.model, self.device_mesh["data_parallel"])

        def configure_optimizers(self):  # not called where DeepSpeed builds the optimizer from its config (zenflow)
            if base == "gpu_compute":  # forward and backward only
                return None
            return run["optimizer"]([p for p in self.parameters() if p.requires_grad])

    run = setup(system, args)
    # Lightning refuses clipping by norm under FSDP; a user tuning it calls FSDP's clip_grad_norm_ instead
    own_clipping = base == "fsdp_offload" and args.clip is not None and args.clip_by == "norm"
    if "error" in run:
        return run
    if own_clipping:  # only here: slideformer serializes a step's updates behind a hook that may read them

        class LM(LM):
            def on_before_optimizer_step(self, optimizer):  # FSDP's own norm over its offloaded gradients
                self.trainer.strategy.model.clip_grad_norm_(args.clip)

    if "normhook" in options:  # what Lightning's docs show for logging the gradient norm (it observes the step)

        class LM(LM):
            def on_before_optimizer_step(self, optimizer):
                from lightning.pytorch.utilities import grad_norm

                self.log_dict(grad_norm(self, norm_type=2))

    torch.manual_seed(0)
    module = LM()
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if run["capped"]:  # the peers; slideformer caps itself (gpu_memory_limit)
        for device in range(devices):  # this process's rank is not known yet: every GPU it may use
            torch.cuda.set_per_process_memory_fraction(
                cap / torch.cuda.get_device_properties(device).total_memory, device
            )
    steps = run["warmup"] + run["timed"]
    ids = torch.randint(0, config.vocab_size, (batch * devices * steps * args.accumulate, args.seq))
    trainer = L.Trainer(
        strategy=run["strategy"],
        accelerator="gpu",
        devices=devices,
        precision=run["precision"],
        max_steps=steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=None if own_clipping else args.clip,
        gradient_clip_algorithm=None if own_clipping else args.clip_by,
        logger=False,
        log_every_n_steps=1,  # (the norm rows: every step's norm is taken, as with logging at every step)
        callbacks=[lightning_slide_callback("GradNormMonitor")] if "gradnorm" in options else None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if base == "slideformer":  # a hook between backward and step would hold every update behind its backward
        from lightning_slide.hooks import step_observers

        observers = step_observers(trainer, module)
        if observers and "normhook" not in options:
            return {"error": f"{', '.join(observers)} would serialize the step: not what this row measures"}
    probe = GilProbe() if base == "slideformer" else None  # the peers run without the extra thread
    try:
        trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=batch))
    except torch.OutOfMemoryError:
        return {"error": "out of GPU memory", "params": params}
    except Exception as error:  # noqa: BLE001 - a peer that fails is a row of the table, not the end of the run
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}", "params": params}
    finally:
        if probe is not None:
            probe.stop()
    if trainer.global_rank != 0:
        return None  # rank 0 reports
    timed = sorted(module.times[run["warmup"] :])
    optimizer = run["optimizer_name"]
    built = getattr(trainer.strategy.model, "basic_optimizer", None)  # DeepSpeed's engine: the optimizer it ran
    if run["optimizer"] is None and built is not None:
        optimizer = type(built).__name__
    return {
        "params": params,
        "trainable": trainable,
        "step_s": sum(timed) / len(timed) if run["mean"] else timed[len(timed) // 2],
        "timed_steps": len(timed),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "optimizer": optimizer,
        **engine_seconds_per_step(module.engine_stats, skip=run["warmup"]),
        **(probe.summary(since=getattr(module, "timed_from", math.inf)) if probe is not None else {}),
    }


class GilProbe:
    """How long a thread that wants the GIL back waits for it during training: a thread sleeps 2 ms again and again
    and records how late it wakes, less the lateness measured before training. The engine's update thread takes the
    GIL back after every torch call it makes; this says what each such return costs while the training thread runs."""

    NAP = 2e-3

    def __init__(self) -> None:
        import threading

        self.baseline = sorted(self._late() for _ in range(50))[25]  # the timer's own slack, the GIL free
        self.samples: list[tuple[float, float]] = []  # (when, seconds late)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _late(self) -> float:
        start = time.perf_counter()
        time.sleep(self.NAP)
        return time.perf_counter() - start - self.NAP

    def _run(self) -> None:
        while not self._stop.is_set():
            late = self._late()
            self.samples.append((time.perf_counter(), max(0.0, late - self.baseline)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, since: float) -> dict:
        late = sorted(value for when, value in self.samples if when >= since)
        if not late:
            return {}
        return {"gil_wait_ms_mean": 1e3 * sum(late) / len(late), "gil_wait_ms_p90": 1e3 * late[len(late) * 9 // 10]}


def dry_run(args) -> None:
    """Build every system's strategy, precision and optimizer on the CPU (no training, no GPU) and print them."""
    import torch

    for system in args.systems.split(","):
        run = setup(system, args)
        if "error" not in run and run["optimizer"] is not None:  # one host step of the optimizer on a CPU tensor
            param = torch.nn.Parameter(torch.ones(8))
            optimizer = run["optimizer"]([param])
            param.grad = torch.full_like(param, 0.5)
            optimizer.step()
        shown = {k: v for k, v in run.items() if k != "optimizer"}
        if "strategy" in shown and not isinstance(shown["strategy"], str):
            shown["strategy"] = type(shown["strategy"]).__name__
        print(f"{system}: {json.dumps(shown) if 'error' not in run else run['error']}", flush=True)
        if options_of(system)[0] == "zenflow":
            config = zenflow_config(overlap="sequential" not in options_of(system)[1])
            print(f"  zenflow DeepSpeed config (deepspeed >= {ZENFLOW_MIN_DEEPSPEED}): {json.dumps(config)}")


def engine_seconds_per_step(stats: list[dict], skip: int) -> dict:
    """Mean host-busy and compute-blocked seconds per timed step, from cumulative engine stats."""
    if len(stats) <= skip:
        return {}
    steps = len(stats) - skip
    return {k: (stats[-1][k] - stats[skip - 1][k]) / steps for k in ("host_busy", "host_waiting", "compute_blocked")}


def run_child(command: list[str], timeout: float, env: dict) -> tuple[int | None, str, str, float]:
    """Run one child: (exit code, None when over ``timeout``; its stdout; stdout and stderr; GiB by which the
    machine's host memory in use rose above its level at the start, at most, sampled twice a second). The rise counts
    every process the child starts (ZenFlow's optimizer process) and still tells when the child is killed."""
    import psutil

    def in_use() -> float:
        memory = psutil.virtual_memory()
        return (memory.total - memory.available) / 2**30

    start, peak = in_use(), 0.0
    # a session of its own: its ranks and helper processes are killed with it, and none keeps its pipes open after
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = child.communicate(timeout=0.5)
            return child.returncode, out, out + err, max(peak, in_use() - start)
        except subprocess.TimeoutExpired:
            peak = max(peak, in_use() - start)
            code = child.poll()
            if code is not None or time.monotonic() > deadline:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                out, err = child.communicate()
                return code, out, out + err, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama3_2_3b:8,llama3_2_3b:32,llama3_1_8b:4")
    parser.add_argument(
        "--systems", default="all_on_gpu,fsdp_offload,fsdp2_offload,deepspeed_offload,zenflow,slideformer"
    )
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (every system)")
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val for every system")
    parser.add_argument("--clip-by", choices=("norm", "value"), default="norm", help="gradient_clip_algorithm")
    parser.add_argument("--cap", default="24GiB")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per child run")
    parser.add_argument("--devices", type=int, default=1, help="GPUs per system (data-parallel)")
    parser.add_argument(
        "--host-memory",
        default=None,
        help="SlideFormerStrategy(tuning=dict(host_memory=...)) for the plan's check (a VM whose memory grows)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build each system's strategy, precision and optimizer on the CPU; no run",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        dry_run(args)
        return
    if args.child:
        system, shape, batch = args.child.split(":")
        result = child(system, shape, int(batch), args)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return

    print(
        f"seq {args.seq}, cap {args.cap} for offloading systems, kernels=all, per-layer checkpointing everywhere, "
        f"{args.devices} GPU(s) per system, batch per GPU"
        + (
            f", gradients clipped by {args.clip_by} at {args.clip}"
            if args.clip is not None
            else ", no gradient clipping"
        )
    )
    if any(system.split("+")[0] == "zenflow" for system in args.systems.split(",")):
        print(
            f"zenflow: ZeRO-2 + ZenFlow {json.dumps(ZENFLOW)}; its s/step is the mean over whole update intervals, "
            "and it has no bound (most columns are updated every update_interval steps, not every step)"
        )
    print(
        "| shape | batch | system | s/step | tokens/s | TFLOP/s | peak GPU GiB | peak host GiB | × all-on-GPU "
        "| of bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for item in args.shapes.split(","):
        shape, batch = item.split(":")
        ceiling = compute = None  # the all-on-GPU and gpu_compute step times of this shape
        steps: dict[str, float] = {}  # each system's step time, for the ratios to FSDP offload below the table
        for system in args.systems.split(","):
            command = [
                sys.executable,
                __file__,
                "--child",
                f"{system}:{shape}:{batch}",
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
                "--accumulate",
                str(args.accumulate),
                "--window",
                str(args.window),
                "--cap",
                args.cap,
                *(["--clip", str(args.clip), "--clip-by", args.clip_by] if args.clip is not None else []),
                "--devices",
                str(args.devices),
            ] + (["--host-memory", args.host_memory] if args.host_memory else [])
            # "+thp" (any system): host allocations of 2 MB and more (slideformer's pinned ones too) on huge pages
            thp = {"THP_MEM_ALLOC_ENABLE": "1"} if "thp" in options_of(system)[1] else {}
            code, out, log, host_rise = run_child(command, args.timeout, {**os.environ, **thp})
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][7:])
                if system.split("+")[0] == "zenflow":  # its host optimizer runs in a process of its own
                    result["peak_host_gib"] = max(result["peak_host_gib"], host_rise)
            elif code is None:
                result = {"error": f"over {args.timeout} s (host memory in use rose {host_rise:.1f} GiB)"}
            else:  # -9 with no traceback: most often the kernel's OOM killer
                result = {"error": f"crashed, exit {code} (host memory in use rose {host_rise:.1f} GiB at most)"}
            if os.environ.get("OUT"):  # each child's full output, for the record
                name = f"peers-{system.replace('+', '_')}-{shape}-{batch}-{args.seq}-{args.devices}gpu.log"
                Path(os.environ["OUT"], name).write_text(log)
            base = system.split("+")[0]
            shown = "optimizer" in result and (base != "slideformer" or "bf16moments" in system)
            label = f"{system} ({result['optimizer']})" if shown else system  # the optimizer that ran
            row = f"| {shape} | {batch} | {label} |"
            if "error" in result:
                print(f"{row} {result['error']} | | | | | | |", flush=True)
                continue
            tokens = int(batch) * args.seq * args.devices * args.accumulate
            step, n = result["step_s"], result["params"]
            t = result.get("trainable", n)  # all of them but with LoRA
            if base == "all_on_gpu":
                ceiling = step
            if base == "gpu_compute":
                compute = step
            up, down = (2 * (n - t) + 4 * t) / args.devices, 2 * t / args.devices  # each GPU moves its share
            gpu = compute or ceiling or 0.0
            bound = max(gpu, up / H2D_BYTES_PER_S, down / D2H_BYTES_PER_S, t / HOST_ADAMW_PARAMS_PER_S)
            ratio = f"{ceiling / step:.2f}" if ceiling else "–"
            # zenflow does not step AdamW every step; gpu_compute is the bound's GPU term itself
            of_bound = "–" if base in ("zenflow", "gpu_compute") else f"{bound / step:.0%}"
            if "host_busy" in result:
                row += (
                    f" (host busy {result['host_busy']:.2f} s of which waiting {result['host_waiting']:.2f} s, "
                    f"blocked {result['compute_blocked']:.2f} s; GIL back after "
                    f"{result.get('gil_wait_ms_mean', math.nan):.2f} ms mean, "
                    f"{result.get('gil_wait_ms_p90', math.nan):.2f} p90)"
                )
            print(
                f"{row} {step:.3f} | {tokens / step:,.0f} | {6 * n * tokens / step / 1e12:.1f} | "
                f"{result['peak_gpu_gib']:.2f} | {result['peak_host_gib']:.1f} | {ratio} | {of_bound} |",
                flush=True,
            )
            if base != "gpu_compute":  # no optimizer step: not a system to compare
                steps[system] = step
        fsdp = steps.get("fsdp_offload")
        if fsdp:
            ratios = ", ".join(f"{system} {fsdp / step:.2f}" for system, step in steps.items())
            print(f"{shape} batch {batch}, × FSDP offload (same run): {ratios}", flush=True)


if __name__ == "__main__":
    main()
