"""Where a slideformer step's time goes: torch.profiler over a few steps, summarised per step.

usage: python benchmarks/profile_step.py [--shape llama3_1_8b] [--batch 4] [--seq 1024] [--window 2] [--cap 24GiB]
                                         [--option parked_grads=24] [--option grad_buffers=2] ...
                                         [--warmup 2] [--steps 2] [--cpu]

One process trains ``--warmup`` steps, then profiles ``--steps`` more (CPU ranges and, on a GPU, kernels and
copies). The engine names its work for the profiler: ``slide.update <unit>`` on the host update thread,
``slide.forward layer <i>`` / ``slide.backward layer <i>`` and ``slide.wait update <unit>`` on the training threads.
Per profiled step it prints:

- the step's wall time;
- the update thread's time in updates, and its idle time: the gaps between updates, when no queued update had its
  gradients on the host;
- the longest gaps, each with what the training thread was doing at that moment (its innermost ``slide.*`` range);
- the training thread's waits for updates;
- the GPU's busy time in kernels, and in copies each way.

It also writes the Chrome trace to ``$OUT`` (or the working directory), to open in Perfetto. ``--option name=value``
passes a ``SlideFormerStrategy`` option (integers as integers). ``--cpu`` runs on the CPU, e.g. with ``--shape
tiny``, to try the script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from bench_plan import fast_model
from bench_shapes import SHAPES

GAP_MS = 2.0  # shorter idle stretches of the update thread are not listed
SHOWN_GAPS = 6


def _option(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    return name, int(value) if re.fullmatch(r"-?\d+", value) else value


def run(args) -> Path:
    """Train and profile; returns the Chrome trace's path."""
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig

    import lightning_slide
    from lightning_slide.engine.options import Tuning
    from lightning_slide.kernels import apply_kernels

    gpu = not args.cpu
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=args.seq)
    trace = Path(os.environ.get("OUT", "."), f"profile-{args.shape}-{args.batch}.json")

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = fast_model(config)
            if gpu:
                apply_kernels(self.model, "all")

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    class Profiled(L.Callback):
        """Profiles the steps after the warm-up, each inside a ``slide.step`` range that ends once the device is
        done with it."""

        profiler = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
                try:  # the update thread is not the profiler's: ask for every thread (newer torch)
                    threads = dict(experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True))
                except TypeError:
                    print("this torch profiles only the training threads: no slide.update ranges", flush=True)
                    threads = {}
                self.profiler = profile(activities=activities, **threads)
                self.profiler.start()
            self.step = record_function("slide.step")
            self.step.__enter__()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if gpu:
                torch.cuda.synchronize()
            self.step.__exit__(None, None, None)

        def on_train_end(self, trainer, module):
            self.profiler.stop()
            self.profiler.export_chrome_trace(str(trace))

    torch.manual_seed(0)
    given = dict(_option(o) for o in args.option)  # tuning's options (parked_grads=24) go into the group
    tuning = {k: given.pop(k) for k in Tuning.names() if k in given}
    options = dict(window=args.window, monitor=False, tuning=tuning, **given)
    if gpu:
        options["gpu_memory_limit"] = args.cap
    strategy = lightning_slide.SlideFormerStrategy(**options)
    ids = torch.randint(0, config.vocab_size, (args.batch * (args.warmup + args.steps), args.seq))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-true" if gpu else "32-true",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Profiled()],
    )
    trainer.fit(LM(), DataLoader(TensorDataset(ids), batch_size=args.batch))
    return trace


def _union_ms(spans: list[tuple[float, float]], low: float, high: float) -> float:
    """Milliseconds of ``[low, high)`` covered by ``spans`` (microsecond pairs)."""
    covered, end = 0.0, low
    for start, stop in sorted(spans):
        start, stop = max(start, end), min(stop, high)
        if stop > start:
            covered += stop - start
            end = stop
    return covered / 1000


def summarize(trace: Path) -> str:
    """The per-step table and the longest idle stretches of the update thread, from a Chrome trace."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    span = lambda e: (float(e["ts"]), float(e["ts"]) + float(e["dur"]))  # noqa: E731
    named = lambda prefix: [e for e in events if str(e.get("name", "")).startswith(prefix)]  # noqa: E731
    steps = sorted(span(e) for e in named("slide.step"))
    updates = sorted(span(e) + (e["name"][len("slide.update ") :],) for e in named("slide.update "))
    waits = [span(e) for e in named("slide.wait update")]
    doing = [
        span(e) + (e["name"][len("slide.") :],)
        for e in named("slide.forward") + named("slide.backward") + named("slide.wait")
    ]
    kernels = [span(e) for e in events if e.get("cat") == "kernel"]
    copies = {
        way: [span(e) for e in events if e.get("cat") == "gpu_memcpy" and way in e.get("name", "")]
        for way in ("HtoD", "DtoH")
    }

    lines = [
        "| step | wall ms | host updating ms (updates) | host idle ms | training thread waiting for updates ms "
        "| GPU kernels ms | H2D copies ms | D2H copies ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gaps = []
    for number, (low, high) in enumerate(steps):
        inside = [(max(a, low), min(b, high), key) for a, b, key in updates if b > low and a < high]
        busy = _union_ms([(a, b) for a, b, _ in inside], low, high)
        lines.append(
            f"| {number} | {(high - low) / 1000:.1f} | {busy:.1f} ({len(inside)}) | "
            f"{(high - low) / 1000 - busy:.1f} | {_union_ms(waits, low, high):.1f} | "
            f"{_union_ms(kernels, low, high):.1f} | {_union_ms(copies['HtoD'], low, high):.1f} | "
            f"{_union_ms(copies['DtoH'], low, high):.1f} |"
        )
        edges = [(low, low, "step start")] + inside + [(high, high, "step end")]
        for (_, gap_start, before), (gap_end, _, after) in zip(edges, edges[1:]):
            if (gap_end - gap_start) / 1000 >= GAP_MS:
                middle = (gap_start + gap_end) / 2
                around = sorted((b - a, name) for a, b, name in doing if a <= middle < b)
                gaps.append(
                    (
                        gap_end - gap_start,
                        number,
                        gap_start - low,
                        before,
                        after,
                        around[0][1] if around else "no slide.* range",
                    )
                )
    lines.append("")
    lines.append(f"Longest idle stretches of the update thread (>= {GAP_MS:g} ms):")
    for length, number, offset, before, after, doing in sorted(gaps, reverse=True)[:SHOWN_GAPS]:
        lines.append(
            f"- step {number}, at {offset / 1000:.1f} ms: {length / 1000:.1f} ms between {before!r} and "
            f"{after!r}; the training thread: {doing}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3_1_8b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--cap", default="24GiB")
    parser.add_argument("--option", action="append", default=[], help="a SlideFormerStrategy option, name=value")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    trace = run(args)
    print(f"{args.shape}, batch {args.batch} x {args.seq}, window {args.window}, options {args.option}; trace: {trace}")
    print(summarize(trace))


if __name__ == "__main__":
    main()
