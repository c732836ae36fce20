"""One run per offload_dir: a second run on a directory in use is refused with a clear error; the directory is free
again after a fit ends, fails or is killed (the OS drops a dead process's lock: no stale lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide.engine.disk_lock import LOCK_FILE
from tests.core.tiny import TinyLM, batches, initial_state, trainer

ROOT = Path(__file__).resolve().parents[2]


def slide(directory: Path) -> lightning_slide.SlideFormerStrategy:
    return lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(directory))


def fit(directory: Path, steps: int = 2, callbacks=(), module: TinyLM | None = None) -> TinyLM:
    module = module or TinyLM("llama", initial_state("llama"))
    trainer(slide(directory), max_steps=steps, callbacks=list(callbacks)).fit(module, batches(2 * steps))
    return module


class SecondRunInside(L.Callback):
    """At the first batch of the running fit, tries a second fit on the same offload_dir."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.error = directory, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            with pytest.raises(RuntimeError) as caught:
                fit(self.directory, steps=1)
            self.error = str(caught.value)


def test_a_second_run_on_an_offload_dir_in_use_is_refused_and_the_first_trains_undisturbed(tmp_path):
    second = SecondRunInside(tmp_path / "state")
    ours = fit(tmp_path / "state", steps=3, callbacks=[second])
    assert str(tmp_path / "state") in second.error and f"process {os.getpid()}" in second.error
    assert "own offload_dir" in second.error
    alone = fit(tmp_path / "alone", steps=3)
    assert ours.losses == alone.losses
    for (name, a), (_, b) in zip(ours.named_parameters(), alone.named_parameters()):
        assert torch.equal(a, b), name


class Boom(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            raise RuntimeError("boom")


def test_the_directory_is_free_again_after_a_fit_a_failed_fit_and_a_failed_setup(tmp_path, monkeypatch):
    directory = tmp_path / "state"
    fit(directory)
    with pytest.raises(RuntimeError, match="boom"):
        fit(directory, steps=3, callbacks=[Boom()])
    import shutil

    from lightning_slide.engine import disk

    real = disk.shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 1000, 1000))
    # The engine's own disk check fails after it locked the directory (the masters' files are new there; the
    # moments' would be rewritten in place)
    with pytest.raises(ValueError, match="free"):
        from lightning_slide.engine.engine import SlidingEngine
        from lightning_slide.engine.options import SlideOptions

        SlidingEngine(
            TinyLM("llama", initial_state("llama")),
            SlideOptions(window=1, offload_dir=str(directory), offload="both"),
            device=torch.device("cpu"),
            compute_dtype=torch.float32,
        )
    monkeypatch.setattr(disk.shutil, "disk_usage", real)
    fit(directory)  # nothing above left the directory locked
    assert (directory / LOCK_FILE).exists()  # the file stays; only the lock on it goes


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import lightning as L
    from tests.core.test_disk_lock import fit

    class Hang(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Path({ready!r}).touch()
            time.sleep(600)

    fit(Path({directory!r}), callbacks=[Hang()])
""")


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    directory, ready = tmp_path / "state", tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), ready=str(ready), directory=str(directory))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert child.poll() is None, child.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the child never started training"
            time.sleep(0.05)
        with pytest.raises(
            RuntimeError, match=rf"offload_dir .*state.* in use by another run \(.*process {child.pid}\)"
        ):
            fit(directory)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    fit(directory)  # the OS dropped the killed run's lock


def test_master_files_stay_reserved_while_the_trained_module_maps_them(tmp_path):
    import gc

    directory = tmp_path / "state"

    def run(module, steps=2, fn="fit"):
        strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(directory), offload="both")
        run = trainer(strategy, max_steps=steps)
        (run.fit if fn == "fit" else run.validate)(module, batches(2 * steps))

    first = TinyLM("llama", initial_state("llama"))
    run(first)
    trained = {name: param.detach().clone() for name, param in first.named_parameters()}
    with pytest.raises(RuntimeError, match="still map: another run would overwrite"):
        run(TinyLM("llama", initial_state("llama", seed=1)))  # would rewrite the files the first module maps
    for name, param in first.named_parameters():
        assert torch.equal(param, trained[name]), name
    run(first, fn="validate")  # the same module's next runs take the directory over
    run(first, steps=3)
    del first
    gc.collect()
    run(TinyLM("llama", initial_state("llama", seed=1)))  # free once nothing maps the files
