"""The planner's step-time terms against steps measured on the GPU machine: which term predicts them.

usage: python benchmarks/bound_vs_measured.py

The rows are BENCHMARKS.md's 2026-12-05 (session 5) runs (3B batch 8 and 8B batch 4, seq 1024, no clipping, the
embeddings and head updated on the GPU, one H200 machine), planned with that machine's measured rates (host AdamW
3.88 G params/s fp32, 5.26 with bf16 moments; copies 50 GB/s each way, 600 TFLOP/s) and the settings they ran with:
fp32 gradients down and read by the host update (what a step sent before the host loop read bf16 ones, 31822d2).
Prints the measured step, the host AdamW term, the host memory term and the step bound, with their errors.
"""

from __future__ import annotations

import torch
from bench_shapes import SHAPES
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_slide.engine.machine import Machine, step_times
from lightning_slide.engine.sizes import ModelShape, Settings

MACHINE = Machine(
    host_adamw_params_per_s=3.88e9,
    host_adamw_bf16_params_per_s=5.26e9,
    h2d_bytes_per_s=50e9,
    d2h_bytes_per_s=50e9,
    gpu_flops=600e12,
)
BF16 = {"moments_dtype": torch.bfloat16}
ROWS = [  # name, shape, batch, settings, measured seconds per step
    ("3B, defaults", "llama3_2_3b", 8, {}, 0.967),
    ("3B, bf16 moments", "llama3_2_3b", 8, BF16, 0.851),
    ("3B, device_layers=4", "llama3_2_3b", 8, {"device_layers": 4}, 0.867),
    ("3B, device_layers=6 + bf16 moments", "llama3_2_3b", 8, {"device_layers": 6, **BF16}, 0.704),
    ("8B, parked_grads=0", "llama3_1_8b", 4, {}, 2.657),
    ("8B, bf16 moments", "llama3_1_8b", 4, BF16, 1.899),
]


def main() -> None:
    print("| row | measured s | host AdamW s | error | host memory s | error | step bound s | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape_name, batch, extra, measured in ROWS:
        with torch.device("meta"):
            shape = ModelShape.of(AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape_name])))
        settings = Settings(batch=batch, seq=1024, clipping=False, resident_on_device=True, **extra)
        times = step_times(shape, settings, MACHINE)
        # As run then: the layers' gradients went down and were read in fp32, 4 bytes more per parameter in all.
        fp32_grads = 4 * settings.sliding(shape) * shape.layer_trainable / MACHINE.memory_rate
        memory = times["host memory (update + copies)"] + fp32_grads
        times = {**times, "host memory (update + copies)": memory}
        bound = max(times.values())
        cells = [times["host AdamW"], memory, bound]
        print(f"| {name} | {measured:.3f} | " + " | ".join(f"{c:.3f} | {c / measured - 1:+.0%}" for c in cells) + " |")


if __name__ == "__main__":
    main()
