"""The planner's predictions against measurements: peak GPU memory, peak host memory and step time (one GPU).

usage: python benchmarks/bench_plan.py [--shapes llama3_2_1b,llama3_2_3b,llama3_1_8b] [--batch 4] [--seq 1024] [--cpu]
                                       [--window 2] [--cap 24GiB] [--steps 3] [--kernels all] [--clip none]

Each shape trains ``--steps`` optimizer steps with slideformer under a real Lightning Trainer, in its own child
process (a run that fails or runs out of memory cannot disturb the next; each child's peak RSS is its own). The child
records ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and the peak RSS, and the prediction is the plan
the strategy itself made at the first batch (``strategy.plan``: the same code that refuses runs), with the machine's
rates measured in the child (host AdamW, H2D, D2H, bf16 matmul) for the step-time bound. The parent prints a markdown
table, predicted vs measured with the relative error, and writes every figure (the plan's items too, for
calibration) to ``$OUT/bench_plan.json`` when ``OUT`` is set.

Model init: the model is built on the meta device, given uninitialized host memory (``to_empty``) and filled by
tiling one small random block (std 0.02; norm weights 1) — a memory copy instead of torch's per-parameter random
init, which for 8B fp32 parameters takes minutes on the host. Every page is written, so the host memory is really
used, as with loaded weights. The rotary embedding's buffers are rebuilt (``to_empty`` leaves them undefined).

Defaults: no gradient clipping (``--clip none``), so updates stream out of the backward and at most window + 2 layers
hold fp32 gradients: 8B needs ~100 GiB of host memory that way (with clipping every layer keeps its gradients:
~123 GiB, more than a 128 GiB machine has; the strategy then refuses the run at setup and the row says so).
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


def fast_model(config):
    """A causal LM with fp32 host weights from ``config``, filled cheaply (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    block = torch.randn(2**24, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.ndim == 1:  # norm weights
                param.fill_(1.0)
                continue
            flat = param.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                piece = flat[start : start + block.numel()]
                piece.copy_(block[: piece.numel()])
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if hasattr(child, "inv_freq"):  # rotary tables: recomputed on the host
                    with torch.device("cpu"):
                        setattr(module, name, type(child)(config=config))
    model.tie_weights()
    return model


def child(shape: str, args) -> dict:
    """Train one shape; returns predicted and measured figures."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig

    import lightning_slide
    from lightning_slide.engine.plan import Machine, PlanError, make_plan

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(args.seq, 2048))
    started = time.perf_counter()
    gpu = not args.cpu
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = fast_model(config)
            self.times: list[float] = []

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

        def on_train_batch_start(self, batch, batch_idx):
            sync()
            self._start = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            sync()
            self.times.append(time.perf_counter() - self._start)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    module = LM()
    init_s = time.perf_counter() - started
    strategy = lightning_slide.SlideFormerStrategy(
        window=args.window, gpu_memory_limit=args.cap, monitor=False, kernels=args.kernels
    )
    ids = torch.randint(0, config.vocab_size, (args.batch * args.steps, args.seq))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-true" if gpu else "32-true",
        max_steps=args.steps,
        gradient_clip_val=None if args.clip == "none" else float(args.clip),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    result: dict = {"params": sum(p.numel() for p in module.parameters()), "init_s": init_s}
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=args.batch))
    except PlanError as e:
        result["error"] = "refused by the plan: " + str(e).splitlines()[0]
    except torch.OutOfMemoryError:
        result["error"] = "out of GPU memory"
    plan = strategy.plan
    if plan is not None:
        machine = Machine.detect(gpu_memory_limit=strategy.options.gpu_memory_limit).measure(seconds=0.2)
        timed = make_plan(plan.shape, plan.settings, machine, suggest=False)
        result["plan"] = {
            **plan.to_dict(),
            "time": timed.time,
            "binding": timed.binding,
            "step_seconds": timed.step_seconds,
            "machine": timed.to_dict()["machine"],
        }
    result.update(
        step_s=sorted(module.times[1:])[len(module.times[1:]) // 2] if len(module.times) > 1 else None,
        peak_gpu_allocated=torch.cuda.max_memory_allocated() if gpu else None,
        peak_gpu_reserved=torch.cuda.max_memory_reserved() if gpu else None,
        peak_host_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        total_s=time.perf_counter() - started,
    )
    return result


def _gib(x: float | None) -> str:
    return "–" if x is None else f"{x / 2**30:.2f}"


def _err(predicted: float | None, measured: float | None) -> str:
    if not predicted or not measured:
        return "–"
    return f"{(predicted - measured) / measured:+.0%}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama3_2_1b,llama3_2_3b,llama3_1_8b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--cap", default=None, help="gpu_memory_limit, e.g. 24GiB (default: the whole GPU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kernels", default="all")
    parser.add_argument("--clip", default="none", help="gradient_clip_val, or 'none'")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per shape")
    parser.add_argument("--cpu", action="store_true", help="smoke-run on the CPU (fp32; use --shapes tiny)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args), default=str), flush=True)
        return

    forwarded = [
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--window",
        str(args.window),
        "--steps",
        str(args.steps),
        "--kernels",
        args.kernels,
        "--clip",
        args.clip,
    ] + (["--cpu"] if args.cpu else [])
    if args.cap:
        forwarded += ["--cap", args.cap]
    print(
        f"batch {args.batch}, seq {args.seq}, window {args.window}, cap {args.cap or 'none'}, kernels "
        f"{args.kernels}, clip {args.clip}, {args.steps} steps"
    )
    print(
        "| shape | GPU alloc pred / meas GiB (err) | GPU reserved GiB | host pred / meas GiB (err) | "
        "step bound / meas s (binds) | init s | total s |"
    )
    print("|---|---|---|---|---|---|---|")
    results = {}
    for shape in args.shapes.split(","):
        command = [sys.executable, __file__, "--child", shape, *forwarded]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"error": "crashed: " + run.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            result = {"error": f"over {args.timeout} s"}
        results[shape] = result
        plan = result.get("plan") or {}
        gpu, host = plan.get("gpu_total"), plan.get("host_total")
        row = (
            f"| {shape} | {_gib(gpu)} / {_gib(result.get('peak_gpu_allocated'))} "
            f"({_err(gpu, result.get('peak_gpu_allocated'))}) | {_gib(result.get('peak_gpu_reserved'))} | "
            f"{_gib(host)} / {_gib(result.get('peak_host_rss'))} ({_err(host, result.get('peak_host_rss'))}) | "
        )
        step = result.get("step_s")
        row += f"{plan.get('step_seconds', 0):.2f} / {step:.2f} ({plan.get('binding')}) | " if step else "– | "
        row += f"{result.get('init_s', 0):.0f} | {result.get('total_s', 0):.0f} |"
        if "error" in result:
            row += f" {result['error']}"
        print(row, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_plan.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
