"""Peak GPU memory and step time of slideformer windows against all-on-GPU Lightning training (one GPU).

usage: python benchmarks/bench_window.py [--shape llama3_2_1b] [--batch 4] [--seq 1024] [--steps 5] [--kernels all]
                                        [--windows 1,2,4] [--host-weights fp32,compute]
Prints a markdown table. Random-init model from a config, random tokens; bf16 compute for every system.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from bench_shapes import SHAPES
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig

import lightning_slide
from lightning_slide.kernels import apply_kernels


class LM(L.LightningModule):
    def __init__(self, config, kernels):
        super().__init__()
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        apply_kernels(self.model, kernels)  # the same kernels for every system
        self.step_times: list[float] = []
        self.engine_stats: list[dict] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def on_train_batch_start(self, batch, batch_idx):
        torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        self._s0 = self._engine_stats()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._t0)
        self.engine_stats.append({k: v - self._s0.get(k, 0.0) for k, v in self._engine_stats().items()})

    def _engine_stats(self):
        engine = getattr(self.trainer.strategy, "engine", None)
        return engine.stats() if engine is not None else {}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


def run(name, strategy, config, args):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    module = LM(config, args.kernels)
    params = sum(p.numel() for p in module.parameters())
    ids = torch.randint(0, config.vocab_size, (args.batch * (args.steps + 2), args.seq))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="gpu",
        devices=1,
        precision="bf16-true",
        max_steps=args.steps + 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=args.batch))
    except torch.OutOfMemoryError:
        return f"| {name} | out of GPU memory | | | | |"
    step = sorted(module.step_times[2:])[len(module.step_times[2:]) // 2]
    tokens = args.batch * args.seq
    peak = torch.cuda.max_memory_allocated() / 2**30
    timed = module.engine_stats[2:]
    host = (
        " / ".join(f"{sum(s[k] for s in timed) / len(timed):.3f}" for k in ("host_busy", "compute_blocked"))
        if timed and timed[0]
        else "-"
    )
    tflops = 6 * params * tokens / step / 1e12
    return f"| {name} | {step:.3f} | {tokens / step:,.0f} | {tflops:.1f} | {peak:.2f} | {host} |"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3_2_1b", choices=SHAPES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--windows", default="1,2,4")
    parser.add_argument("--kernels", default="all")
    parser.add_argument(
        "--host-weights",
        default="fp32",
        help="comma-separated SlideFormerStrategy(tuning=dict(host_weights=...)) values to run for each window: "
        "fp32 (upload fp32 masters, cast on the GPU), compute (upload a bf16 host copy)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip all-on-GPU training")
    args = parser.parse_args()
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=args.seq)
    print(
        f"{args.shape}, batch {args.batch} x {args.seq}, bf16, kernels={args.kernels}, {torch.cuda.get_device_name()}"
    )
    print(
        "| system | s/step (median) | tokens/s | TFLOP/s (6·N·tokens) | peak GPU GiB "
        "| host busy / compute blocked, s/step |"
    )
    print("|---|---|---|---|---|---|")
    if not args.no_reference:
        print(run("all-on-GPU Lightning (bf16-true params, GPU AdamW)", "auto", config, args), flush=True)
    for window in map(int, args.windows.split(",")):
        for host_weights in args.host_weights.split(","):
            tuning = dict(host_weights=host_weights, device_layers=0)  # every layer through the window measured
            strategy = lightning_slide.SlideFormerStrategy(window=window, tuning=tuning)
            print(run(f"slideformer window={window} host_weights={host_weights}", strategy, config, args), flush=True)


if __name__ == "__main__":
    main()
