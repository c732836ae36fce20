"""Exact resume after a crash: a training process killed after a checkpoint, or in the middle of a save, resumes
from ``ckpt_path="last"`` in a new process and continues exactly as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_slide import checkpoint as slide_checkpoint
from lightning_slide.checkpoint import INDEX, temp_path

SCRIPT = Path(__file__).with_name("run_training.py")
STEPS = 6


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out.decode(errors="replace")[-3000:]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace")
            raise AssertionError(f"the child exited ({process.returncode}) before {what}:\n{out[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.stdout.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Losses and final parameters of the same training run without interruption."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    finish(start("--dir", str(tmp / "ckpt"), "--steps", str(STEPS), "--out", str(tmp / "out")))
    return json.loads((tmp / "out").read_text()), load_file(str(tmp / "out") + ".safetensors")


def resume_and_compare(tmp: Path, uninterrupted, from_step: int) -> None:
    finish(start("--dir", str(tmp / "ckpt"), "--steps", str(STEPS), "--resume", "--out", str(tmp / "out")))
    losses, params = uninterrupted
    resumed = json.loads((tmp / "out").read_text())
    # two micro-batches per optimizer step; the resumed run computes only the steps after `from_step`
    assert resumed == losses[2 * from_step :], "losses after resuming differ from the uninterrupted run"
    for name, value in load_file(str(tmp / "out") + ".safetensors").items():
        assert torch.equal(value, params[name]), f"{name} differs from the uninterrupted run"


def global_step(path: Path) -> int:
    return slide_checkpoint.CheckpointReader(path).meta()["global_step"]


def test_killed_mid_training_resumes_exactly(tmp_path, uninterrupted):
    k = 3  # inside the scheduler's warm-up (4 steps): the LR schedule must come back too
    child = start("--dir", str(tmp_path / "ckpt"), "--steps", str(STEPS), "--hang-at", str(k))
    wait_for((tmp_path / "ready").exists, child, f"the checkpoint of step {k}")
    kill(child)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert global_step(last) == k
    resume_and_compare(tmp_path, uninterrupted, from_step=k)


def test_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    k = 2
    child = start("--dir", str(tmp_path / "ckpt"), "--steps", str(STEPS), "--slow-after", str(k))
    last = tmp_path / "ckpt" / "last.ckpt"
    partial = temp_path(last)
    wait_for((tmp_path / "ready").exists, child, f"the checkpoint of step {k}")  # saves are slow from here on
    # the save of step k + 1 has written its first file and sleeps before the next one: kill it there
    wait_for(lambda: (partial / "model" / "resident.safetensors").exists(), child, "the save of step 3 to start")
    kill(child)
    assert partial.is_dir() and not (partial / INDEX).exists(), "the interrupted save should have left a partial dir"
    assert global_step(last) == k, "the last good checkpoint was replaced or damaged"
    with pytest.raises(ValueError, match="interrupted save"):
        slide_checkpoint.load(partial)
    resume_and_compare(tmp_path, uninterrupted, from_step=k)
    assert not partial.exists(), "the next save to last.ckpt should have cleaned the interrupted one"
    assert global_step(last) == STEPS


@pytest.mark.parametrize(
    "family, options, save_last",
    # tied embedding, updated on the device
    [
        ("gemma_tied", {"window": 2, "tuning": {"resident_optimizer": "device"}}, True),
        ("qwen3", {"window": 1}, "link"),
    ],  # last.ckpt as a link to the newest top-k directory
)
def test_resume_in_process_is_exact(tmp_path, family, options, save_last):
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_slide
    from tests.core.tiny import TinyLM, batches, initial_state, trainer

    def run(steps, module, ckpt_path=None):
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=save_last, save_top_k=1, every_n_train_steps=1)
        trainer(
            lightning_slide.SlideFormerStrategy(**options),
            max_steps=steps,
            max_epochs=-1,
            enable_checkpointing=True,
            callbacks=[saver],
        ).fit(module, batches(2), ckpt_path=ckpt_path)
        return module

    first = run(3, TinyLM(family, initial_state(family)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=2-step=3.ckpt", "last.ckpt"]
    resumed = run(STEPS, TinyLM(family, initial_state(family)), ckpt_path="last")
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    uninterrupted = run(STEPS, TinyLM(family, initial_state(family)))
    assert first.losses == uninterrupted.losses[:6] and resumed.losses == uninterrupted.losses[6:]
    theirs = dict(uninterrupted.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, theirs[name]), name
