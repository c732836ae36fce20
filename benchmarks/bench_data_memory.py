"""Host memory per token held by the app's data module after ``setup()``: RSS growth over the tokens it holds.

    python benchmarks/bench_data_memory.py --records 200000 [--data-module old_data.py] [--pack]

Writes a JSONL of ``--records`` prompt/completion pairs (once, in ``--dir``), then in this process measures VmRSS and
RssAnon (anonymous memory: what the data really costs, as opposed to file pages the kernel can drop) before and
after ``setup()``. ``--data-module`` loads ``JSONLDataModule`` from another file (e.g. the previous version from
git) to compare. Run twice: the first run of the current module also tokenizes into the ``datasets`` cache; the
second reads it (memory-mapped), as every later run and every other rank on the host does.
"""

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path

from transformers import AutoTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "lightning_slide" / "app" / "assets"
WORDS = "the river flows through a city of glass salt wool copper silk clocks bread paper ships maps bells".split()


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_data(path: Path, records: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(records):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 30))) + "?"
            completion = " " + " ".join(rng.choices(WORDS, k=rng.randint(10, 80))) + "."
            f.write(json.dumps({"prompt": prompt, "response": completion}) + "\n")  # the key both versions read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--dir", default="/tmp/slide_data_memory")
    parser.add_argument("--data-module", default=None, help="a file defining JSONLDataModule (default: the app's)")
    parser.add_argument("--pack", action="store_true")
    args = parser.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"pairs_{args.records}.jsonl"
    if not data.exists():
        write_data(data, args.records)
    if args.data_module:
        spec = importlib.util.spec_from_file_location("data_under_test", args.data_module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from lightning_slide.app import data as module
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    kwargs = {"cache_dir": str(work / "cache")} if not args.data_module else {}
    dm = module.JSONLDataModule(str(data), tokenizer, val_size=0, max_length=256, pack=args.pack, **kwargs)
    rss, anon, start = status_kib("VmRSS"), status_kib("RssAnon"), time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    rss, anon = status_kib("VmRSS") - rss, status_kib("RssAnon") - anon
    examples = getattr(dm, "train_examples", None) or dm.train_set
    tokens = sum(len(e["input_ids"]) for e in examples) if args.data_module else sum(examples["length"])
    print(
        json.dumps(
            {
                "module": args.data_module or "current",
                "pack": args.pack,
                "records": args.records,
                "tokens": tokens,
                "setup_s": round(seconds, 1),
                "rss_delta_mib": round(rss / 1024, 1),
                "anon_delta_mib": round(anon / 1024, 1),
                "rss_bytes_per_token": round(rss * 1024 / tokens, 2),
                "anon_bytes_per_token": round(anon * 1024 / tokens, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
