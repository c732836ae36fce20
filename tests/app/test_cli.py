"""The command line itself: ``python -m lightning_slide`` (what ``slide-train`` runs) in a subprocess."""

import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import FAST


def _run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lightning_slide", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_end_to_end(tmp_path):
    run = _run(*FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    for line in ("slide-train summary", "val/loss:", "tokens/s", "peak memory: GPU", "host", "sample:"):
        assert line in out, out[-3000:]
    hf = tmp_path / "run" / "hf_model"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    prompt = tokenizer("Where is", return_tensors="pt")
    ids = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]
    assert len(ids) == prompt["input_ids"].shape[1] + 8
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("Where is")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt" / "index.json").is_file()  # a directory checkpoint
    assert (tmp_path / "run" / "train.log").is_file()


def test_cli_errors_are_clear(tmp_path):
    run = _run("strategy.windw=3", cwd=tmp_path)
    assert run.returncode != 0
    assert "Could not override 'strategy.windw'" in run.stderr and "not in struct" in run.stderr
    run = _run("model=llama3_8b", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 1
    assert "slide-train: error: missing required options: the model directory: model.path=" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_on_two_devices(tmp_path):
    """``trainer.devices=2``: Lightning starts the second rank by running the command again; rank 0 reports,
    exports and writes the checkpoint, once."""
    run = _run(*FAST, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert out.count("slide-train summary") == 1 and "tokens/s on 2 devices" in out, out[-3000:]
    assert (tmp_path / "run" / "hf_model" / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt" / "index.json").is_file()
