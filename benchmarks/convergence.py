"""Convergence: does slideformer train as plain Lightning does? Real text, the same initial weights, data and seed.

usage: python benchmarks/convergence.py [--runs plain,slideformer,slideformer+bf16moments] [--out convergence-out]
                                        [--steps 200] [--accumulate 4] [--batch 8] [--seq 512] [--lr 3e-4]
                                        [--final-steps 20] [--smoke]

The real thing, on one GPU (a 115M-parameter Llama, 200 optimizer steps of 4 x 8 x 512 tokens each; estimated, not
yet measured: well under a minute for plain, one to three for each slideformer run on an H200, under 10 minutes in
all; the tokenizer, data and model need no download; matplotlib for the plot):

    python benchmarks/convergence.py --out convergence-out

Smoke (a 2-layer model, 6 steps of 2 x 2 x 64 tokens, seconds on a CPU): ``--smoke --out /tmp/conv-smoke``.

Data: the Python standard library's own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``; no ``site-packages``,
tests or codec tables), files shuffled with the seed, tokenized with the tokenizer the package ships
(``lightning_slide/app/assets/tokenizer``, BOS/EOS around each file), concatenated and cut into ``--seq``-token
blocks. The last ``--val-blocks`` blocks (the last files read) are held out; the training blocks are shuffled once
with the seed and fed in that order, one epoch, to every run. Model: a Llama built from a config (hidden 768, 12
layers, 12 heads, intermediate 3072, vocab = the tokenizer's 1024: 114.8M parameters), initialised once with the
seed, saved under ``--out`` and loaded by every run. Optimizer: AdamW (betas 0.9/0.95, weight decay 0.1 except norms and
embeddings), linear warm-up then cosine decay to 10% of ``--lr``, ``accumulate_grad_batches`` and
``gradient_clip_val=1.0``.

Runs (``--runs``, comma list; each a real ``Trainer.fit`` in this process, seeded alike):

- ``plain``: plain Lightning (``strategy="auto"``), ``precision="bf16-mixed"`` (fp32 weights, bf16 autocast).
- ``slideformer``: ``SlideFormerStrategy(tuning=dict(device_layers=0))`` (every layer slides and is updated on the
  host, the path under test), ``precision="bf16-true"`` (it keeps fp32 masters itself).
  Compared with ``plain``: final train loss and validation loss within 1%.
- ``slideformer+bf16moments``: as ``slideformer`` with ``lightning_slide.optim.AdamW(..., state_dtype=bfloat16)``
  (bf16 Adam moments, an opt-in low-precision mode). Compared with ``slideformer``: within 2%.
- ``plain32`` / ``slideformer32``: both ``precision="32-true"``; ``slideformer32`` compared with ``plain32`` (1%).

Reported per run: the training loss of every optimizer step (the mean of its micro-batches' losses), the final train
loss (mean of the last ``--final-steps`` steps; BENCHMARKING.md asks for 20), the validation loss (every run's final
weights evaluated in fp32 on the same device, so the yardstick is the same for all), the largest step-wise gap to its
reference. Written to ``OUT/convergence.json`` (runs of an earlier invocation with the same settings are kept, so a
run can be added later) and ``OUT/convergence.png`` (needs matplotlib; skipped with a note without it); a markdown
table is printed. "pass" means both the final train loss and the validation loss are within the threshold.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

RUNS = {  # name: strategy, precision, optimizer, reference run, relative threshold
    "plain": ("auto", "bf16-mixed", "adamw", None, None),
    "slideformer": ("slideformer", "bf16-true", "adamw", "plain", 0.01),
    "slideformer+bf16moments": ("slideformer", "bf16-true", "adamw-bf16moments", "slideformer", 0.02),
    "plain32": ("auto", "32-true", "adamw", None, None),
    "slideformer32": ("slideformer", "32-true", "adamw", "plain32", 0.01),
}
DEFAULT_RUNS = "plain,slideformer,slideformer+bf16moments"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--out", default="convergence-out", help="directory for the JSON, the plot and the initial weights")
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps (seconds on a CPU)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "gpu", "cpu"], help="auto: the GPU if any")
    p.add_argument("--steps", type=int, help="optimizer steps (default 200; smoke 6)")
    p.add_argument("--accumulate", type=int, help="accumulate_grad_batches (default 4; smoke 2)")
    p.add_argument("--batch", type=int, help="micro-batch size in blocks (default 8; smoke 2)")
    p.add_argument("--seq", type=int, help="tokens per block (default 512; smoke 64)")
    p.add_argument("--val-blocks", type=int, help="held-out blocks (default 64; smoke 4)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4; smoke 1e-3)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val (by norm)")
    p.add_argument("--final-steps", type=int, help="steps averaged for the final train loss (default 20; smoke 2)")
    p.add_argument("--window", type=int, default=2, help="slideformer's window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, help="hidden size (default 768; smoke 64)")
    p.add_argument("--layers", type=int, help="decoder layers (default 12; smoke 2)")
    p.add_argument("--heads", type=int, help="attention heads (default 12; smoke 4)")
    p.add_argument("--intermediate", type=int, help="MLP size (default 3072; smoke 128)")
    args = p.parse_args(argv)
    full = dict(steps=200, accumulate=4, batch=8, seq=512, val_blocks=64, lr=3e-4, final_steps=20)
    full.update(hidden=768, layers=12, heads=12, intermediate=3072)
    smoke = dict(steps=6, accumulate=2, batch=2, seq=64, val_blocks=4, lr=1e-3, final_steps=2)
    smoke.update(hidden=64, layers=2, heads=4, intermediate=128)
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not args.runs:
        p.error(f"unknown or no run(s) {unknown}; known: {', '.join(RUNS)}")
    return args


# ------------------------------------------------------------------------------------------------ data and model
def tokenizer_dir() -> Path:
    import lightning_slide

    return Path(lightning_slide.__file__).parent / "app" / "assets" / "tokenizer"


def stdlib_files(seed: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    random.Random(seed).shuffle(files)
    return files


def text_blocks(tokenizer, seq: int, count: int, seed: int):
    """``count`` blocks of ``seq`` tokens of the standard library's sources, and where they came from."""
    import torch

    need = count * seq
    ids: list[int] = []
    files = stdlib_files(seed)
    used = chars = passes = 0
    while len(ids) < need:
        if passes and used == 0:
            raise RuntimeError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}")
        passes, used = passes + 1, 0
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            ids += tokenizer(text, add_special_tokens=True).input_ids + [tokenizer.eos_token_id]
            used, chars = used + 1, chars + len(text)
            if len(ids) >= need:
                break
    source = {
        "stdlib": sysconfig.get_paths()["stdlib"],
        "python": sys.version.split()[0],
        "files_read": used if passes == 1 else len(files),
        "passes_over_files": passes,
        "chars": chars,
        "chars_per_token": round(chars / len(ids), 3),
    }
    return torch.tensor(ids[:need], dtype=torch.long).view(count, seq), source


def model_config(args, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def initial_weights(config, seed: int, path: Path) -> dict:
    """The seeded initial state dict, saved once under ``path`` and loaded by every run (and every later call)."""
    import torch
    from transformers import AutoModelForCausalLM

    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    torch.manual_seed(seed)
    state = AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def lr_lambda(steps: int, warmup: int, floor: float = 0.1):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_class(kind: str):
    import torch

    if kind == "adamw":
        return torch.optim.AdamW, {}
    from lightning_slide.optim import AdamW  # bf16 moments (an opt-in mode): only this run needs it

    return AdamW, {"state_dtype": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ one run
def train(name: str, args, config, state, train_ids, val_ids, accelerator: str) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM

    strategy_name, precision, kind, _, _ = RUNS[name]
    try:
        opt_cls, opt_kwargs = optimizer_class(kind)
    except (ImportError, AttributeError) as error:
        return {"skipped": f"lightning_slide.optim.AdamW is not available ({type(error).__name__}: {error})"}

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            self.model.load_state_dict(state)
            self.micro_losses: list[float] = []

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            self.micro_losses.append(loss.detach().float().item())
            return loss

        def configure_optimizers(self):
            decay, no_decay = [], []
            for n, p in self.named_parameters():
                (no_decay if p.ndim < 2 or "norm" in n or "embed" in n else decay).append(p)
            groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            optimizer = opt_cls(groups, lr=args.lr, betas=(0.9, 0.95), **opt_kwargs)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps, args.warmup))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    if strategy_name == "slideformer":
        import lightning_slide

        # every layer slides and is updated on the host (uncapped, "auto" would keep all but one of them on the GPU)
        strategy = lightning_slide.SlideFormerStrategy(window=args.window, tuning=dict(device_layers=0))
    else:
        strategy = "auto"
    L.seed_everything(args.seed, verbose=False)
    module = LM()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(TensorDataset(train_ids), batch_size=args.batch, shuffle=False)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    micro = module.micro_losses
    k = args.accumulate
    losses = [sum(micro[i : i + k]) / len(micro[i : i + k]) for i in range(0, len(micro), k)]
    device = torch.device("cuda") if accelerator == "gpu" else torch.device("cpu")
    val = evaluate(module.model, val_ids, args.batch, device)
    del trainer, module
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tail = losses[-args.final_steps :]
    return {
        "strategy": strategy_name,
        "precision": precision,
        "optimizer": f"{opt_cls.__module__}.{opt_cls.__name__}" + (" (bf16 moments)" if opt_kwargs else ""),
        "steps": len(losses),
        "micro_batches": len(micro),
        "losses": losses,
        "final_loss": sum(tail) / len(tail),
        "val_loss": val,
        "seconds": round(seconds, 2),
    }


def evaluate(model, ids, batch: int, device) -> float:
    """Mean validation loss of the trained fp32 weights, in fp32 on ``device`` (the same yardstick for every run)."""
    import torch

    model = model.to(device=device, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for chunk in ids.split(batch):
            chunk = chunk.to(device)
            total += model(input_ids=chunk, labels=chunk, use_cache=False).loss.float().item() * len(chunk)
    model.to("cpu")
    return total / len(ids)


# ------------------------------------------------------------------------------------------------ report
def compare(results: dict) -> list[dict]:
    rows = []
    for name, res in results.items():
        row = {"run": name, **{k: res.get(k) for k in ("precision", "final_loss", "val_loss", "seconds")}}
        row["status"] = "skipped: " + res["skipped"] if "skipped" in res else res.get("error")
        _, _, _, ref, threshold = RUNS[name]
        base = results.get(ref) if ref else None
        if base and "losses" in base and "losses" in res:
            d_train = res["final_loss"] / base["final_loss"] - 1
            d_val = res["val_loss"] / base["val_loss"] - 1
            gaps = [abs(a - b) for a, b in zip(res["losses"], base["losses"])]
            worst = max(range(len(gaps)), key=gaps.__getitem__)
            passed = abs(d_train) <= threshold and abs(d_val) <= threshold
            row.update(reference=ref, threshold=threshold, rel_final=d_train, rel_val=d_val)
            row.update(max_gap=gaps[worst], max_gap_step=worst + 1, passed=passed)
        elif ref:
            row.update(reference=ref, threshold=threshold)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = [
        "| run | precision | final train loss | val loss | vs | Δ final | Δ val | max step gap (step) | "
        "threshold | result | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"]:
            result = r["status"]
        elif "passed" in r:
            result = "pass" if r["passed"] else "FAIL"
        elif r.get("reference"):
            result = f"no {r['reference']} run to compare with"
        else:
            result = "reference"
        gap = f"{r['max_gap']:.4f} ({r['max_gap_step']})" if "max_gap" in r else "—"
        lines.append(
            f"| {r['run']} | {r['precision'] or '—'} | {num(r['final_loss'], '.4f')} | {num(r['val_loss'], '.4f')} | "
            f"{r.get('reference') or '—'} | {num(r.get('rel_final'), '+.2%')} | {num(r.get('rel_val'), '+.2%')} | "
            f"{gap} | {num(r.get('threshold'), '.0%')} | {result} | {num(r['seconds'], '.0f')} |"
        )
    return "\n".join(lines)


def plot(results: dict, rows: list[dict], path: Path, title: str) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    curves = {n: r["losses"] for n, r in results.items() if "losses" in r}
    if not curves:
        return "no run produced losses: no plot"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for name, losses in curves.items():  # references wide and pale: a run that matches its reference shows on it
        reference = RUNS[name][3] is None
        style = dict(linewidth=3.5, alpha=0.45) if reference else dict(linewidth=1.1)
        top.plot(range(1, len(losses) + 1), losses, label=name, **style)
    top.set_ylabel("training loss (mean of the step's micro-batches)")
    top.set_yscale("log")
    top.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    top.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    top.legend()
    top.grid(True, which="both", alpha=0.3)
    top.set_title(title, fontsize=10)
    compared = 0
    for row in rows:
        if "rel_final" in row:
            compared += 1
            run, ref = curves[row["run"]], curves[row["reference"]]
            rel = [a / b - 1 for a, b in zip(run, ref)]
            bottom.plot(range(1, len(rel) + 1), [100 * x for x in rel], label=f"{row['run']} vs {row['reference']}")
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_ylabel("step-wise difference (%)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(True, alpha=0.3)
    if compared:
        bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    if args.accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    else:
        accelerator = args.accelerator
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    tokenizer.model_max_length = 1 << 30  # whole files are tokenized, then cut into blocks
    n_train = args.steps * args.accumulate * args.batch
    blocks, source = text_blocks(tokenizer, args.seq, n_train + args.val_blocks, args.seed)
    train_ids, val_ids = blocks[:n_train], blocks[n_train:]
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed))
    train_ids = train_ids[order].contiguous()

    config = model_config(args, tokenizer)
    settings = {
        k: getattr(args, k)
        for k in ("steps", "accumulate", "batch", "seq", "val_blocks", "lr", "warmup", "weight_decay", "clip")
    }
    settings.update(
        {k: getattr(args, k) for k in ("final_steps", "window", "seed", "hidden", "layers", "heads", "intermediate")}
    )
    settings.update(accelerator=accelerator, python=source["python"])
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    state = initial_weights(config, args.seed, out / f"init-{key}.pt")
    params = sum(v.numel() for v in state.values())
    tokens_per_step = args.accumulate * args.batch * args.seq
    print(
        f"model: Llama, {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads, intermediate {args.intermediate}, vocab {config.vocab_size})",
        flush=True,
    )
    print(
        f"data: {source['files_read']} stdlib files of Python {source['python']} ({source['chars_per_token']} "
        f"chars/token), {n_train} train + {args.val_blocks} held-out blocks of {args.seq} tokens; "
        f"{args.steps} steps x {args.accumulate} x {args.batch} x {args.seq} = {tokens_per_step} tokens/step; "
        f"accelerator {accelerator}",
        flush=True,
    )

    path = out / "convergence.json"
    results: dict = {}
    if path.exists():  # keep runs of an earlier call with the same settings (e.g. a run added later)
        earlier = json.loads(path.read_text())
        if earlier.get("key") == key:
            results = earlier["runs"]
    failed = False
    device_name = torch.cuda.get_device_name() if accelerator == "gpu" else "CPU"
    for name in args.runs:
        print(f"--- {name}: {RUNS[name][0]}, precision {RUNS[name][1]}, optimizer {RUNS[name][2]}", flush=True)
        try:
            results[name] = train(name, args, config, state, train_ids, val_ids, accelerator)
        except Exception as error:  # noqa: BLE001 - a run that fails is a row of the table, not the end
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            failed = True
        res = results[name]
        if "losses" in res:
            print(f"{name}: final {res['final_loss']:.4f}, val {res['val_loss']:.4f}, {res['seconds']:.0f} s")
        else:
            print(f"{name}: {res.get('skipped') or res.get('error')}", flush=True)
        results = {n: results[n] for n in RUNS if n in results}  # a stable order: references first
        rows = compare(results)
        report = {
            "key": key,
            "settings": settings,
            "params": params,
            "data": source,
            "device": device_name,
            "versions": {"torch": torch.__version__, **versions()},
            "runs": results,
            "comparisons": rows,
        }
        path.write_text(json.dumps(report, indent=1))  # after each run: a call cut short keeps the runs done
    print(f"\n{table(rows)}\n")
    print(f"final train loss: mean of the last {args.final_steps} steps; val loss: fp32, {args.val_blocks} blocks")
    print(f"results: {path}")
    title = (
        f"{params / 1e6:.3g}M-param Llama on Python {source['python']} stdlib sources, {device_name}\n"
        f"{args.steps} steps x {tokens_per_step} tokens, accumulate {args.accumulate}, clip {args.clip}"
    )
    print(plot(results, rows, out / "convergence.png", title))
    return 1 if failed else 0


def versions() -> dict:
    import lightning
    import transformers

    return {"lightning": lightning.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(main())
