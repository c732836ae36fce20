"""The command line ``python -m lightning_slide.checkpoint CKPT OUT [--dtype ...] [--lightning]``."""

from __future__ import annotations

from collections.abc import Iterable

from lightning_slide.checkpoint.hf_export import checkpoint_to_hf
from lightning_slide.checkpoint.lightning_io import checkpoint_to_lightning


def _main(argv: Iterable[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lightning_slide.checkpoint",
        description="Convert a slideformer checkpoint directory into a Hugging Face model directory, or (--lightning) "
        "into one single-file Lightning checkpoint.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory, e.g. outputs/.../checkpoints/last.ckpt")
    parser.add_argument("out", help="Hugging Face directory to write (with --lightning: the .ckpt file to write)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or 'compute'")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory to save alongside")
    parser.add_argument(
        "--lightning",
        action="store_true",
        help="write a single-file Lightning checkpoint (fp32 weights and optimizer state) instead",
    )
    parser.add_argument("--weights-only", action="store_true", help="with --lightning: leave the optimizer out")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.lightning:
        print(checkpoint_to_lightning(args.checkpoint, args.out, weights_only=args.weights_only))
        return
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(checkpoint_to_hf(args.checkpoint, args.out, dtype=args.dtype, tokenizer=tokenizer))
