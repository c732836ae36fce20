"""How long a thread waits to get the GIL back while another thread runs Python: slideformer's update thread takes
the GIL back after every torch call it makes (a unit's update makes a few dozen), while the training thread runs the
model's Python between short calls that launch the device's work.

usage: python benchmarks/bench_gil.py [--holds 0,10,80,250,1000] [--switch 5,0.5] [--meta-seconds 3]
Prints, for each stretch of Python the busy thread runs between two short torch calls (µs, measured) and each
``sys.setswitchinterval`` (ms), the mean time of one tiny torch call on the other thread (µs): the call itself costs
a few µs; the rest is the wait for the GIL. The busy thread hands the GIL over at its calls only when the waiting one
wins the race for it; CPython forces a hand-over after the switch interval only if no other thread took the GIL in
between, which the busy thread itself does at each of its calls.

Then the same wait while the busy thread runs what a training thread runs: forward and backward of four Llama-3.2-3B
decoder layers (Hugging Face's code) on the meta device, where every op is dispatched but computes nothing, so the
thread is all Python and dispatch, as when it launches a GPU's kernels (``bench_peers.GilProbe`` measures the wait);
and the engine's update of one small Llama layer (``UnitOptimizer.step``, torch's fused AdamW) on its own and beside
such a training thread: the difference is what the GIL costs each unit's update.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

CALLS = 100  # tiny torch calls timed on the waiting thread per cell


def python_for(iterations: int) -> None:
    for _ in range(iterations):
        pass


def iterations_for(microseconds: float) -> int:
    """Loop iterations of :func:`python_for` that take about ``microseconds``."""
    start = time.perf_counter()
    python_for(200_000)
    per_iteration = (time.perf_counter() - start) / 200_000
    return max(0, round(microseconds * 1e-6 / per_iteration))


def wait_per_call(iterations: int, switch: float) -> float:
    """Mean µs of one tiny torch call on a thread while another runs ``iterations`` of Python between its own calls."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(switch)
    stop = threading.Event()

    def busy() -> None:  # the training thread: Python, then a short call that releases the GIL
        x = torch.zeros(64)
        while not stop.is_set():
            x.add_(1.0)
            python_for(iterations)

    result = []

    def waiting() -> None:  # the update thread: torch calls, each taking the GIL back when it returns
        y = torch.zeros(64)
        start = time.perf_counter()
        for _ in range(CALLS):
            y.add_(1.0)
        result.append((time.perf_counter() - start) / CALLS * 1e6)

    other = threading.Thread(target=busy)
    other.start()
    time.sleep(0.05)
    worker = threading.Thread(target=waiting)
    worker.start()
    worker.join()
    stop.set()
    other.join()
    sys.setswitchinterval(previous)
    return result[0]


def meta_training_step():
    """A training thread's Python and dispatch: forward and backward of four Llama-3.2-3B decoder layers (Hugging
    Face's code) on the meta device."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layers = [LlamaDecoderLayer(config, i).to(torch.bfloat16) for i in range(4)]
        hidden = torch.randn(8, 1024, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(1024)[None]
        rotary = LlamaRotaryEmbedding(config)(hidden, positions)

    def step() -> None:
        h = hidden
        for layer in layers:
            out = layer(h, position_embeddings=rotary, attention_mask=None, position_ids=positions)
            h = out[0] if isinstance(out, tuple) else out
        h.sum().backward()

    step()
    return step


def meta_layers_wait(seconds: float) -> dict:
    """``GilProbe``'s GIL wait while this thread runs :func:`meta_training_step` again and again."""
    from bench_peers import GilProbe

    step = meta_training_step()
    probe = GilProbe()
    since = end = time.perf_counter()
    steps = 0
    while end - since < seconds:
        step()
        steps += 1
        end = time.perf_counter()
    probe.stop()
    return {"ms_per_step": 1e3 * (end - since) / steps, **probe.summary(since)}


def unit_update_beside_training(updates: int = 200) -> tuple[float, float]:
    """ms of one ``UnitOptimizer.step`` of a small Llama layer (hidden 256, weight decay on the matrices only),
    alone and on a thread beside one running :func:`meta_training_step`."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_slide.engine.host import HostUnit
    from lightning_slide.engine.optimizer import UnitOptimizer, hyperparameters

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2)
    named = list(LlamaDecoderLayer(config, 0).named_parameters())
    groups = [
        {"params": [p for _, p in named if p.ndim == 2], "weight_decay": 0.1},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    user = torch.optim.AdamW(groups, lr=1e-3)
    unit = HostUnit("layer 0", named)
    optimizer = UnitOptimizer(unit, user, {id(p): g for g, group in enumerate(groups) for p in group["params"]})
    unit.grad.normal_()
    hyper = hyperparameters(user.param_groups)

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(updates):
            optimizer.step(hyper, None, None)
        return 1e3 * (time.perf_counter() - start) / updates

    timed()
    alone = timed()
    step, stop, beside = meta_training_step(), threading.Event(), []

    def training() -> None:
        while not stop.is_set():
            step()

    busy = threading.Thread(target=training)
    busy.start()
    time.sleep(0.2)
    worker = threading.Thread(target=lambda: beside.append(timed()))
    worker.start()
    worker.join()
    stop.set()
    busy.join()
    return alone, beside[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--holds", default="0,10,80,250,1000", help="µs of Python between the busy thread's calls")
    parser.add_argument("--switch", default="5,0.5", help="sys.setswitchinterval values, ms")
    parser.add_argument("--meta-seconds", type=float, default=3.0, help="0: skip the meta-device layers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    switches = [float(s) for s in args.switch.split(",")]
    print(f"Python {sys.version.split()[0]}, torch {torch.__version__}; µs per tiny torch call on the waiting thread")
    print("| Python between the busy thread's calls | " + " | ".join(f"switch {s:g} ms" for s in switches) + " |")
    print("|---|" + "---|" * len(switches))
    for hold in (float(h) for h in args.holds.split(",")):
        iterations = iterations_for(hold)
        cells = [f"{wait_per_call(iterations, s * 1e-3):,.1f}" for s in switches]
        print(f"| {hold:g} µs | " + " | ".join(cells) + " |", flush=True)
    if args.meta_seconds > 0:
        found = meta_layers_wait(args.meta_seconds)
        print(
            f"4 Llama-3.2-3B layers, forward + backward on the meta device ({found['ms_per_step']:.1f} ms a pass, all "
            f"Python and dispatch): a thread waits {found['gil_wait_ms_mean']:.3f} ms mean, "
            f"{found['gil_wait_ms_p90']:.3f} ms p90 to get the GIL back"
        )
        alone, beside = unit_update_beside_training()
        print(
            f"UnitOptimizer.step of a small Llama layer (0.73M parameters): {alone:.2f} ms alone, {beside:.2f} ms "
            "beside that training thread"
        )


if __name__ == "__main__":
    main()
