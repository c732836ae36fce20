"""Smoke test of benchmarks/bench_peers.py without a GPU: --dry-run builds each system's strategy, precision and
optimizer (one host step of it) and prints them; DeepSpeed's rows build where it is installed, else say so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_peers.py"


@pytest.mark.timeout(300)
def test_bench_peers_dry_run():
    systems = (
        "all_on_gpu,gpu_compute,fsdp_offload,fsdp_offload+lora16,fsdp2_offload,deepspeed_offload,zenflow,"
        "zenflow+sequential,slideformer,slideformer+bf16moments"
    )
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--systems", systems],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = {}
    for line in run.stdout.splitlines():
        name, _, rest = line.partition(": ")
        if name in systems.split(",") and rest:
            rows[name] = json.loads(rest) if rest.startswith("{") else rest
    assert set(rows) == set(systems.split(","))
    assert rows["all_on_gpu"]["precision"] == "bf16-mixed" and rows["all_on_gpu"]["optimizer_name"] == "AdamW fused"
    assert not rows["all_on_gpu"]["capped"]
    assert rows["gpu_compute"]["precision"] == "bf16-true" and rows["gpu_compute"]["optimizer_name"] == "none"
    assert not rows["gpu_compute"]["capped"]
    for name in ("fsdp_offload", "fsdp_offload+lora16"):
        assert rows[name]["strategy"] == "FSDPStrategy" and rows[name]["precision"] == "bf16-mixed", name
        assert rows[name]["optimizer_name"] == "AdamW fused, host" and rows[name]["capped"], name
    fsdp2 = rows["fsdp2_offload"]
    assert fsdp2["strategy"] == "HostShards" and fsdp2["precision"] == "bf16-mixed" and fsdp2["capped"]
    assert fsdp2["optimizer_name"] == "AdamW fused, host"
    assert rows["slideformer"]["precision"] == "bf16-true" and rows["slideformer"]["strategy"] == "SlideFormerStrategy"
    moments = rows["slideformer+bf16moments"]
    assert moments == "lightning_slide.optim.AdamW not available" or "bf16 moments" in moments["optimizer_name"]
    for name in ("deepspeed_offload", "zenflow", "zenflow+sequential"):
        assert isinstance(rows[name], dict) or rows[name].startswith(("deepspeed not installed", "ZenFlow")), name
    if isinstance(rows["zenflow"], dict):  # whole update intervals, their mean
        assert rows["zenflow"]["mean"] and rows["zenflow"]["timed"] % 4 == 0 and rows["zenflow"]["warmup"] >= 4
    overlapped, sequential = [
        json.loads(line.split(": ", 1)[1]) for line in run.stdout.splitlines() if "zenflow DeepSpeed config" in line
    ]
    for config in (overlapped, sequential):
        zero = config["zero_optimization"]
        assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
        assert {"topk_ratio", "update_interval", "overlap_step"} <= set(zero["zenflow"])
    assert overlapped["zero_optimization"]["zenflow"]["overlap_step"]
    assert not sequential["zero_optimization"]["zenflow"]["overlap_step"]


def test_a_child_is_run_to_its_end_and_killed_with_its_helpers(monkeypatch):
    # Each system runs in a child of its own; one the OS kills, or one whose helper process outlives it, must still
    # give a row (its exit status, how far host memory rose), and one over its time is killed with its helpers.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from bench_peers import run_child

    python = [sys.executable, "-c"]
    code, out, _, rise = run_child([*python, "import numpy; a = numpy.ones(2**25); print('RESULT {}')"], 60, {})
    assert code == 0 and out == "RESULT {}\n" and rise >= 0
    helper = "import os, subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
    code, _, _, _ = run_child([*python, helper + " os.kill(os.getpid(), 9)"], 60, {})
    assert code == -9  # at once, though the helper still held the pipes
    code, out, _, _ = run_child([*python, helper + " print('partial', flush=True); import time; time.sleep(60)"], 2, {})
    assert code is None and out == "partial\n"


@pytest.mark.timeout(300)
def test_the_fsdp2_row_trains_with_its_fp32_shards_on_the_host(monkeypatch):
    # The row's wiring in a real Trainer, on the CPU (gloo; the same strategy and sharding): the fused host AdamW steps
    # fp32 host shards. That only buffers go to the device (FSDP2's offload refuses shards there) shows on a GPU.
    import lightning as L
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM, LlamaConfig

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from bench_peers import fsdp2_offload_strategy, shard_fsdp2

    from lightning_slide.kernels import apply_kernels

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = AutoModelForCausalLM.from_config(config)
            apply_kernels(self.model, "all")  # as the row runs: the fused loss reads the root's head weight
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.losses = []

        def configure_model(self):
            shard_fsdp2(self.model, self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    torch.manual_seed(0)
    module = LM()
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    ids = torch.randint(0, config.vocab_size, (2, 16)).repeat(6, 1)  # one batch, six times: the loss must fall
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=fsdp2_offload_strategy(1),
        precision="bf16-mixed",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    environment = dict(os.environ)
    try:
        trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=2))
    finally:  # the process group and the variables Lightning set for it would outlive the test
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert module.losses[-1] < module.losses[0] - 0.5, module.losses
    for name, param in module.model.named_parameters():
        assert isinstance(param, DTensor) and param.device.type == "cpu" and param.dtype == torch.float32, name
        assert not torch.equal(param.full_tensor(), before[name]), name
