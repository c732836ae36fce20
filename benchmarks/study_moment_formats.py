"""Study: what AdamW's moments lose when stored in bf16 or in 8 bits, against fp32, on real text (runs on a CPU).

usage: python benchmarks/study_moment_formats.py [--formats fp32,bf16,int8,int8-sr,fp8] [--beta2 0.95]
                                                 [--steps 200] [--batch 8] [--seq 256] [--lr 1e-3]
                                                 [--hidden 256] [--layers 4] [--out moment-formats.json]

The question before building an 8-bit host kernel (fewer bytes per parameter in the host's pass: issue 18, item 3)
is whether a format keeps training as fp32 moments do. Each format here is applied to the moments after every
update, as a store of that format would keep them (the update itself in fp32); nothing is faster here. The data and
the tokenizer are ``benchmarks/convergence.py``'s (the standard library's sources); the model a small Llama (4.7M
parameters by default), one seeded initialisation for every format; AdamW (betas 0.9 / ``--beta2``, weight decay
0.1 but norms and embeddings), warm-up then cosine decay, clipping by norm at 1.0, one plain PyTorch loop.

Formats, each in blocks of 128 consecutive elements with one fp32 scale per block (0.03 bytes per element):
- ``bf16``: both moments rounded to bf16 (``lightning_slide.optim.AdamW``'s ``state_dtype=torch.bfloat16``).
- ``int8``: the first moment as signed integers times the block's absolute maximum / 127; the second as the square
  root of it, unsigned, times the block's maximum / 255 (the root halves its range in octaves), rounded to nearest but
  never to zero where the moment is not (a zero would make the update's denominator ``eps``).
- ``int8-sr``: as ``int8``, rounded stochastically (unbiased: moments that move less than a step still move).
- ``fp8``: both as ``float8_e4m3fn`` scaled to the block's maximum (the second moment's square root, as ``int8``).

Prints the final train loss (mean of the last 20 steps) and the held-out loss of each, and their ratio to fp32's;
writes every step's loss to ``--out`` (a JSON, runs of earlier calls kept).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import convergence  # noqa: E402 - the data and the tokenizer of the convergence test

BLOCK = 128
VAL_BLOCKS = 32


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    numel = x.numel()
    return torch.nn.functional.pad(x.reshape(-1), (0, (-numel) % BLOCK)).view(-1, BLOCK), numel


def int8_signed(x: torch.Tensor, stochastic: bool) -> torch.Tensor:
    blocks, numel = _blocks(x)
    scale = blocks.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    y = blocks / scale
    y = torch.floor(y + torch.rand_like(y)) if stochastic else torch.round(y)
    return (y.clamp(-127, 127) * scale).reshape(-1)[:numel].view_as(x)


def int8_root(v: torch.Tensor, stochastic: bool) -> torch.Tensor:
    blocks, numel = _blocks(v.sqrt())
    scale = blocks.amax(1, keepdim=True).clamp_min(1e-30) / 255
    y = blocks / scale
    y = torch.floor(y + torch.rand_like(y)) if stochastic else torch.round(y)
    y = torch.where(blocks > 0, y.clamp_min(1), y).clamp(0, 255)
    return ((y * scale) ** 2).reshape(-1)[:numel].view_as(v)


def fp8(x: torch.Tensor, root: bool) -> torch.Tensor:
    blocks, numel = _blocks(x.sqrt() if root else x)
    scale = blocks.abs().amax(1, keepdim=True).clamp_min(1e-30) / 448
    y = ((blocks / scale).to(torch.float8_e4m3fn).float() * scale).reshape(-1)[:numel].view_as(x)
    return y * y if root else y


FORMATS = {  # name: (first moment as stored, second moment as stored); None: fp32
    "fp32": None,
    "bf16": (lambda m: m.bfloat16().float(), lambda v: v.bfloat16().float()),
    "int8": (lambda m: int8_signed(m, False), lambda v: int8_root(v, False)),
    "int8-sr": (lambda m: int8_signed(m, True), lambda v: int8_root(v, True)),
    "fp8": (lambda m: fp8(m, False), lambda v: fp8(v, True)),
}


@torch.no_grad()
def adamw_step(params, state: dict, lr: float, betas: tuple[float, float], eps: float, step: int, stored) -> None:
    """One AdamW step of ``params`` (``(parameter, weight decay)`` pairs), the moments kept as ``stored`` keeps them."""
    beta1, beta2 = betas
    for param, decay in params:
        if param.grad is None:
            continue
        moments = state.setdefault(param, {"m": torch.zeros_like(param), "v": torch.zeros_like(param)})
        grad = param.grad
        param.mul_(1 - lr * decay)
        m = moments["m"].lerp(grad, 1 - beta1)
        v = moments["v"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        if stored is not None:
            m, v = stored[0](m), stored[1](v)
        moments["m"], moments["v"] = m, v
        denominator = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        param.addcdiv_(m, denominator, value=-lr / (1 - beta1**step))


def run(name: str, args, config, initial: dict, train: torch.Tensor, val: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(initial)
    params = [(p, 0.0 if p.ndim < 2 or "norm" in n or "embed" in n else 0.1) for n, p in model.named_parameters()]
    schedule = convergence.lr_lambda(args.steps, args.steps // 10)
    state: dict = {}
    losses: list[float] = []
    start = time.time()
    for step in range(args.steps):
        ids = train[step * args.batch : (step + 1) * args.batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adamw_step(params, state, args.lr * schedule(step), (0.9, args.beta2), 1e-8, step + 1, FORMATS[name])
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        held_out = [model(input_ids=val[i : i + 8], labels=val[i : i + 8]).loss.item() for i in range(0, len(val), 8)]
    return {
        "final": sum(losses[-20:]) / len(losses[-20:]),
        "val": sum(held_out) / len(held_out),
        "losses": losses,
        "seconds": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--beta2", type=float, default=0.95)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="moment-formats.json")
    args = parser.parse_args()
    unknown = set(args.formats.split(",")) - set(FORMATS)
    if unknown:
        parser.error(f"unknown format(s) {sorted(unknown)}; known: {', '.join(FORMATS)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(convergence.tokenizer_dir())
    ids, _ = convergence.text_blocks(tokenizer, args.seq, args.steps * args.batch + VAL_BLOCKS, 0)
    train, val = ids[:-VAL_BLOCKS], ids[-VAL_BLOCKS:]
    shape = argparse.Namespace(
        hidden=args.hidden, intermediate=4 * args.hidden, layers=args.layers, heads=4, seq=args.seq
    )
    config = convergence.model_config(shape, tokenizer)
    torch.manual_seed(0)
    initial = AutoModelForCausalLM.from_config(config).state_dict()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    print(f"beta2 {args.beta2}, {args.steps} steps of {args.batch} x {args.seq} tokens, block {BLOCK}")
    print("| moments | final train loss | × fp32 | held-out loss | × fp32 | s |\n|---|---|---|---|---|---|")
    for name in args.formats.split(","):
        result = results[f"{name} beta2={args.beta2}"] = run(name, args, config, initial, train, val)
        reference = results.get(f"fp32 beta2={args.beta2}", result)
        print(
            f"| {name} | {result['final']:.4f} | {result['final'] / reference['final']:.4f} | {result['val']:.4f} "
            f"| {result['val'] / reference['val']:.4f} | {result['seconds']:.0f} |",
            flush=True,
        )
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
