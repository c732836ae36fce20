"""The disk tier on one GPU: step time and peak host memory per parameter with the optimizer state, the fp32
masters or both on disk, against the disk-bandwidth bound.

usage: python benchmarks/bench_disk.py --offload-dir /path/on/nvme [--shape llama3_1_8b] [--layers 4] [--window 1]
           [--grad-buffers N]
           [--batch 1] [--seq 1024] [--steps 3] [--systems none,optimizer,masters,both] [--probe-gib 4] [--cache]

Each system trains in its own child process (random-init model from a config, random tokens, bf16 compute, AdamW,
no clipping, no accumulation: updates stream out of the backward). The script first measures the disk under
``--offload-dir`` (write ``--probe-gib`` GiB with fsync, then read it back, the page cache dropped with
posix_fadvise(DONTNEED)) and checks the free space each system's files need. The disk-bandwidth bound of a system
is the bytes its files take, read once and written once per step, over those speeds (24 B/param with both on disk:
masters 4 + Adam moments 8, read and written); "of bound" is bound / measured step time. Disk systems run with
LIGHTNING_SLIDE_DISK_NOCACHE=1 (every write synced and dropped from the page cache, reads dropped after use: the disk,
not the page cache, is measured) unless ``--cache``. Peak host RSS is the process's high-water mark during training
(reset once the engine is built, so building the fp32 model does not count); "engine B/param" is what the engine
holds in host tensors (``SlidingEngine.host_bytes``), with its split into per-layer bytes and bytes in flight, and
"B/param at full depth" extrapolates that to the shape's real layer count (the rest - in flight, gradient buffers,
resident parts - does not grow with depth).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_shapes import SHAPES

OFFLOAD = {"none": None, "optimizer": "optimizer", "masters": "masters", "both": "both"}
MiB = 2**20


# ------------------------------------------------------------------------------------------------ the disk
def measure_disk(directory: Path, gib: float) -> tuple[float, float]:
    """Sequential write and read speed (bytes/s) of ``directory``'s disk, bypassing the page cache."""
    path = directory / "bench_disk_probe.bin"
    chunk = os.urandom(64 * MiB)  # incompressible
    count = max(1, int(gib * 1024 / 64))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, chunk)
        os.fsync(fd)
        write = count * len(chunk) / (time.perf_counter() - start)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buffer = bytearray(64 * MiB)
        start = time.perf_counter()
        while os.readv(fd, [buffer]) > 0:
            pass
        read = count * len(chunk) / (time.perf_counter() - start)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        path.unlink()
    return write, read


def file_bytes(offload: str | None, layer_params: int, layers: int, host_updated: int) -> dict[str, int]:
    """Bytes of the disk tier's files: the layers' fp32 masters and/or the Adam moments of host-updated params."""
    files = {}
    if offload in ("masters", "both"):
        files["masters"] = 4 * layers * layer_params
    if offload in ("optimizer", "both"):
        files["moments"] = 8 * host_updated
    return files


# ------------------------------------------------------------------------------------------------ one run (child)
def child(spec: dict) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM, LlamaConfig

    import lightning_slide

    config = LlamaConfig(
        **{**SHAPES[spec["shape"]], "num_hidden_layers": spec["layers"]}, max_position_embeddings=spec["seq"]
    )
    starts: list[float] = []
    info: dict = {}
    cuda = not spec.get("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

        def on_train_start(self):
            engine = self.trainer.strategy.engine
            info["setup_rss"] = _rss("VmRSS")
            info["resident_on_device"] = engine.resident_parts.updates_on_device
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: building the model does not count
                f.write("5")

        def on_train_batch_start(self, batch, batch_idx):
            sync()
            starts.append(time.perf_counter())

        def on_train_batch_end(self, outputs, batch, batch_idx):
            engine = self.trainer.strategy.engine
            info["host_bytes"] = engine.host_bytes()
            store = engine.state_store
            info["store_peak"] = store.peak_bytes if store is not None else 0

        def on_train_end(self):
            sync()
            self.trainer.strategy.engine._sync_masters()  # the last step's updates and writes count
            starts.append(time.perf_counter())

    torch.manual_seed(0)
    module = LM()
    params = sum(p.numel() for p in module.parameters())
    layer_params = sum(p.numel() for p in module.model.model.layers[0].parameters())
    total_steps = spec["steps"] + spec["warmup"]
    ids = torch.randint(0, config.vocab_size, (spec["batch"] * total_steps, spec["seq"]))
    strategy = lightning_slide.SlideFormerStrategy(
        window=spec["window"],
        offload_dir=spec["dir"] if spec["offload"] else None,
        offload=spec["offload"],
        # every layer's state through the disk tier (none kept on the GPU), as the measured figures were taken
        tuning=dict(host_weights=spec["host_weights"], grad_buffers=spec.get("grad_buffers"), device_layers=0),
        monitor=False,
    )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-true",
        max_steps=total_steps,
        gradient_clip_val=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=spec["batch"]))
    timed = starts[spec["warmup"] :]
    return {
        "step_s": (timed[-1] - timed[0]) / (len(timed) - 1),
        "peak_rss": _rss("VmHWM"),
        "params": params,
        "layer_params": layer_params,
        "peak_gpu": torch.cuda.max_memory_allocated() if cuda else 0,
        **info,
    }


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------------ the table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offload-dir", required=True, help="a directory on the disk to measure (files are removed)")
    parser.add_argument("--shape", default="llama3_1_8b", choices=SHAPES)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4; the shape's own count: 0)")
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument(
        "--grad-buffers", type=int, default=None, help="SlideFormerStrategy(tuning=dict(grad_buffers=...))"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after --warmup steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--systems",
        default="none,optimizer,masters,both",
        help="comma-separated offload choices: none, optimizer, masters, both",
    )
    parser.add_argument("--host-weights", default="auto", help="host_weights for every system (auto, fp32, compute)")
    parser.add_argument("--probe-gib", type=float, default=4.0, help="GiB written and read to measure the disk")
    parser.add_argument("--cache", action="store_true", help="let the page cache hold the files (no NOCACHE)")
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU (e.g. --shape tiny --probe-gib 0.1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    root = Path(args.offload_dir)
    root.mkdir(parents=True, exist_ok=True)
    layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    free = shutil.disk_usage(root).free
    if free < args.probe_gib * 2**30 * 1.1:
        sys.exit(f"{root}: {free / 2**30:.1f} GiB free, not enough for the {args.probe_gib} GiB disk probe")
    write_bw, read_bw = measure_disk(root, args.probe_gib)
    print(
        f"{args.shape} with {layers} layers, window {args.window}, batch {args.batch} x {args.seq}, bf16, AdamW, "
        f"no clipping; disk under {root}: write {write_bw / 1e9:.2f} GB/s, read {read_bw / 1e9:.2f} GB/s "
        f"(fsync + fadvise DONTNEED, {args.probe_gib} GiB); {free / 2**30:.1f} GiB free; "
        f"page cache {'allowed' if args.cache else 'dropped (LIGHTNING_SLIDE_DISK_NOCACHE=1)'}",
        flush=True,
    )
    print(
        "| offload | s/step | disk bytes/step (read + write) | disk bound s/step | of bound | peak host RSS GiB | "
        "RSS B/param | engine B/param (per layer + rest) | B/param at full depth | peak GPU GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    full_layers = SHAPES[args.shape]["num_hidden_layers"]
    for system in args.systems.split(","):
        offload = OFFLOAD[system]
        directory = root / f"bench-{system}"
        spec = dict(
            shape=args.shape,
            layers=layers,
            window=args.window,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
            offload=offload,
            dir=str(directory),
            host_weights=args.host_weights,
            grad_buffers=args.grad_buffers,
            cpu=args.cpu,
        )
        if offload is not None:  # the files must fit (the strategy would refuse too, after building the model)
            estimate = _estimate_files(args.shape, layers, offload)
            free = shutil.disk_usage(root).free
            if estimate > free:
                print(
                    f"| {system} | skipped: files need {estimate / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                    "(lower --layers) | | | | | | | | |",
                    flush=True,
                )
                continue
        env = dict(os.environ)
        if offload is not None and not args.cache:
            env["LIGHTNING_SLIDE_DISK_NOCACHE"] = "1"
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--offload-dir", str(root), "--child", json.dumps(spec)],
                env=env,
                capture_output=True,
                text=True,
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(
                f"| {system} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} "
                "| | | | | | | | |",
                flush=True,
            )
            continue
        r = json.loads(lines[-1][len("RESULT ") :])
        print(_row(system, offload, r, layers, full_layers, write_bw, read_bw), flush=True)


def _estimate_files(shape: str, layers: int, offload: str) -> int:
    s = SHAPES[shape]
    h, i, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = h // heads
    layer = h * (h + 2 * kv * head_dim) + h * h + 3 * h * i + 2 * h
    resident = s["vocab_size"] * h * (1 if s["tie_word_embeddings"] else 2) + h
    return sum(file_bytes(offload, layer, layers, layers * layer + resident).values())


def _row(system, offload, r, layers, full_layers, write_bw, read_bw) -> str:
    params, layer_params = r["params"], r["layer_params"]
    resident = params - layers * layer_params
    host_updated = layers * layer_params + (0 if r.get("resident_on_device") else resident)
    files = sum(file_bytes(offload, layer_params, layers, host_updated).values())
    bound = files / read_bw + files / write_bw
    step = r["step_s"]
    held = r.get("host_bytes", {})
    per_layer = (
        held.get("compute copies", 0)
        + (held.get("fp32 masters", 0) if offload not in ("masters", "both") else 0)
        + held.get("optimizer state", 0)
    )
    in_flight = sum(held.values()) - per_layer  # in flight, gradients, the resident parts: not per layer
    # per-layer bytes scale with depth (the resident parts' share is small); the rest does not
    full_params = params + (full_layers - layers) * layer_params
    full = (per_layer * full_params / params + in_flight) / full_params if held else float("nan")
    engine = sum(held.values()) / params if held else float("nan")
    bound_cell = f"{bound:.2f}" if files else "-"
    fraction = f"{bound / step:.0%}" if files else "-"
    return (
        f"| {system} | {step:.2f} | {files / 1e9:.1f} GB + {files / 1e9:.1f} GB | {bound_cell} | {fraction} | "
        f"{r['peak_rss'] / 2**30:.1f} | {r['peak_rss'] / params:.2f} | {engine:.2f} "
        f"({per_layer / params:.2f} + {in_flight / params:.2f}) | {full:.2f} | {r['peak_gpu'] / 2**30:.1f} |"
    )


if __name__ == "__main__":
    main()
