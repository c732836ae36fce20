"""slideformer against the offloading peers a user would pick, side by side in one invocation (one GPU or several).

usage: python benchmarks/bench_peers.py [--shapes llama3_2_3b:8,llama3_2_3b:32,llama3_1_8b:4] [--seq 1024]
                                        [--systems all_on_gpu,fsdp_offload,deepspeed_offload,slideformer]
                                        (slideformer options: slideformer+bf16 = host_weights="compute",
                                         slideformer+acts = offload_activations=True,
                                         slideformer+buffers8 = grad_buffers=8,
                                         slideformer+park24 = parked_grads=24; combine with +;
                                         any system+lora16 = LoRA of rank 16 on every linear layer but the head,
                                         through peft: the base weights frozen)
                                        [--cap 24GiB] [--steps 3] [--window 2] [--devices 1]
                                        [--clip 1.0] [--clip-by value]

Each (system, shape, batch) runs in its own child process (a peer that runs out of memory cannot disturb the next
one) and prints one JSON line; the parent prints a markdown table with tokens/s, TFLOP/s (6·N·tokens), peak GPU
memory, peak host RSS, the ratio to all-on-GPU and the fraction of the per-step lower bound
max(GPU compute, 4N bytes / H2D, 2N bytes / D2H, N / host AdamW) reached (bandwidths from BENCHMARKING.md;
GPU compute is taken as the all-on-GPU step time of the same run when it ran). With LoRA (``+loraK``) N counts every
parameter and the bound's terms count what moves: the frozen weights go up in bf16 (2 bytes), only the adapters' T
parameters come down and are updated: max(GPU compute, (2(N - T) + 4T) / H2D, 2T / D2H, T / host AdamW); the
GPU-compute term and the ratio come from the last all-on-GPU row before (list ``all_on_gpu+lora16`` first for them).
Same model, batch, sequence length, kernels ("all") and per-layer activation checkpointing for every system; the
offloading systems run under the GPU memory cap, all-on-GPU uncapped (the ceiling). DeepSpeed is optional: without
it installed that row says so.

``--devices N``: every system trains data-parallel on N GPUs of the machine (Lightning's launcher, one process per
GPU, ``batch`` per GPU: a global batch of N x batch), each GPU under the cap; tokens/s counts every GPU's tokens,
peak host memory is rank 0's (per-rank memory is what sharding lowers), and the bound divides the transfers by N
(each GPU moves its share) but not the host AdamW (the ranks share the host's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_shapes import SHAPES

H2D_BYTES_PER_S = 55e9
D2H_BYTES_PER_S = 55e9
HOST_ADAMW_PARAMS_PER_S = 3.6e9


def child(system: str, shape: str, batch: int, args) -> dict:
    """Train one system for warm-up + timed steps; returns its measurements."""
    base, *options = system.split("+")
    lora = [int(o[len("lora") :]) for o in options if o.startswith("lora")]
    if lora:
        try:
            import peft
        except ImportError:  # the GPU machine may lack it: carry its wheel (and accelerate's) along
            return {"error": "peft not installed (../shared/tools/device-wheels.sh peft accelerate)"}
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import lightning_slide
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
                adapters = peft.LoraConfig(r=lora[0], lora_alpha=2 * lora[0], target_modules="all-linear")
                self.model = peft.get_peft_model(self.model, adapters)
            self.times: list[float] = []
            self.engine_stats: list[dict] = []

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

        def on_train_batch_start(self, batch, batch_idx):
            torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)
            engine = getattr(self.trainer.strategy, "engine", None)
            if engine is not None:  # slideformer: cumulative host-busy / compute-blocked seconds
                self.engine_stats.append(engine.stats())

        def configure_optimizers(self):
            return optimizer_class([p for p in self.parameters() if p.requires_grad], lr=1e-5)

    optimizer_class = torch.optim.AdamW
    torch.manual_seed(0)
    module = LM()
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if base in ("fsdp_offload", "deepspeed_offload"):
        for device in range(devices):  # this process's rank is not known yet: every GPU it may use
            torch.cuda.set_per_process_memory_fraction(
                cap / torch.cuda.get_device_properties(device).total_memory, device
            )
    if base == "all_on_gpu":
        strategy, precision = "auto", "bf16-true"
    elif base == "fsdp_offload":
        from lightning.pytorch.strategies import FSDPStrategy

        # frozen and trainable parameters in one flat parameter (LoRA) need FSDP's original parameters
        strategy = FSDPStrategy(cpu_offload=True, auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=bool(lora))
        precision = "bf16-true"
    elif base == "deepspeed_offload":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return {"error": "deepspeed not installed"}
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy, precision = DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True), "bf16-true"
        try:  # DeepSpeed's own host Adam (its C++ op is compiled on first use), as its docs recommend for offload
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])
            optimizer_class = DeepSpeedCPUAdam
        except Exception as error:  # noqa: BLE001 - no compiler/CUDA headers there: torch's AdamW, said in the row
            print(f"DeepSpeedCPUAdam unavailable ({type(error).__name__}: {error}); torch AdamW instead", flush=True)
            strategy.config["zero_force_ds_cpu_optimizer"] = False
    else:  # "slideformer", with options: "+bf16" host_weights="compute", "+acts" offload_activations=True,
        # "+buffersK": grad_buffers=K (layer gradient buffers on the host while updates stream; default window + 2),
        # "+parkK": parked_grads=K (layer gradients the GPU may hold while no host buffer is free)
        buffers = [int(o[len("buffers") :]) for o in options if o.startswith("buffers")]
        parked = [int(o[len("park") :]) for o in options if o.startswith("park")]
        strategy = lightning_slide.SlideFormerStrategy(
            window=args.window,
            gpu_memory_limit=args.cap,
            monitor=False,
            offload_activations="acts" in options,
            tuning=dict(
                host_weights="compute" if "bf16" in options else "fp32",
                host_memory=args.host_memory,
                grad_buffers=buffers[0] if buffers else None,
                parked_grads=parked[0] if parked else 0,
            ),
        )
        precision = "bf16-true"

    ids = torch.randint(0, config.vocab_size, (batch * devices * (args.steps + 2), args.seq))
    if base == "all_on_gpu" and devices > 1:
        strategy = "ddp"
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="gpu",
        devices=devices,
        precision=precision,
        max_steps=args.steps + 2,
        gradient_clip_val=args.clip,
        gradient_clip_algorithm=args.clip_by,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=batch))
    except torch.OutOfMemoryError:
        return {"error": "out of GPU memory", "params": params}
    except Exception as error:  # noqa: BLE001 - a peer that fails is a row of the table, not the end of the run
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}", "params": params}
    if trainer.global_rank != 0:
        return None  # rank 0 reports
    timed = sorted(module.times[2:])
    return {
        "params": params,
        "trainable": trainable,
        "step_s": timed[len(timed) // 2],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "optimizer": optimizer_class.__name__,
        **engine_seconds_per_step(module.engine_stats, skip=2),
    }


def engine_seconds_per_step(stats: list[dict], skip: int) -> dict:
    """Mean host-busy and compute-blocked seconds per timed step, from cumulative engine stats."""
    if len(stats) <= skip:
        return {}
    steps = len(stats) - skip
    return {k: (stats[-1][k] - stats[skip - 1][k]) / steps for k in ("host_busy", "host_waiting", "compute_blocked")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama3_2_3b:8,llama3_2_3b:32,llama3_1_8b:4")
    parser.add_argument("--systems", default="all_on_gpu,fsdp_offload,deepspeed_offload,slideformer")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
    print(
        "| shape | batch | system | s/step | tokens/s | TFLOP/s | peak GPU GiB | peak host GiB | × all-on-GPU "
        "| of bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for item in args.shapes.split(","):
        shape, batch = item.split(":")
        ceiling = None
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
                "--window",
                str(args.window),
                "--cap",
                args.cap,
                *(["--clip", str(args.clip), "--clip-by", args.clip_by] if args.clip is not None else []),
                "--devices",
                str(args.devices),
            ] + (["--host-memory", args.host_memory] if args.host_memory else [])
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                out, log = done.stdout, done.stdout + done.stderr
                lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
                result = json.loads(lines[-1][7:]) if lines else {"error": f"crashed, exit {done.returncode}"}
            except subprocess.TimeoutExpired as timeout:
                result, log = {"error": f"over {args.timeout} s"}, str(timeout.stdout or "") + str(timeout.stderr or "")
            if os.environ.get("OUT"):  # each child's full output, for the record
                name = f"peers-{system.replace('+', '_')}-{shape}-{batch}-{args.seq}-{args.devices}gpu.log"
                Path(os.environ["OUT"], name).write_text(log)
            base = system.split("+")[0]
            label = (
                f"{system} ({result['optimizer']})" if base == "deepspeed_offload" and "optimizer" in result else system
            )
            row = f"| {shape} | {batch} | {label} |"
            if "error" in result:
                print(f"{row} {result['error']} | | | | | | |", flush=True)
                continue
            tokens = int(batch) * args.seq * args.devices
            step, n = result["step_s"], result["params"]
            t = result.get("trainable", n)  # all of them but with LoRA
            if base == "all_on_gpu":
                ceiling = step
            up, down = (2 * (n - t) + 4 * t) / args.devices, 2 * t / args.devices  # each GPU moves its share
            bound = max(ceiling or 0.0, up / H2D_BYTES_PER_S, down / D2H_BYTES_PER_S, t / HOST_ADAMW_PARAMS_PER_S)
            ratio = f"{ceiling / step:.2f}" if ceiling else "–"
            if "host_busy" in result:
                row += (
                    f" (host busy {result['host_busy']:.2f} s of which waiting {result['host_waiting']:.2f} s, "
                    f"blocked {result['compute_blocked']:.2f} s)"
                )
            print(
                f"{row} {step:.3f} | {tokens / step:,.0f} | {6 * n * tokens / step / 1e12:.1f} | "
                f"{result['peak_gpu_gib']:.2f} | {result['peak_host_gib']:.1f} | {ratio} | {bound / step:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
