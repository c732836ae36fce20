"""Faults: Ctrl+C and failures of the update thread or the disk tier stop the run cleanly.

Each must surface in the training thread (the original exception, with the traceback of where it happened) and
leave no thread behind. Stopped between two optimizer steps, the weights hold whole steps and only the scratch
buffers go; stopped in the middle of one (or by a failed update), the engine goes entirely and checkpoints are
refused. An interrupted checkpoint save never replaces the last good one. Lightning turns a KeyboardInterrupt into a
graceful shutdown: ``on_exception`` hooks, teardown, then ``sys.exit(1)`` (``SystemExit``) with
``trainer.state.status == "interrupted"``.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import threading
import traceback
import weakref

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus

import lightning_slide
from lightning_slide import checkpoint as slide_checkpoint
from lightning_slide.engine import disk
from lightning_slide.engine.optimizer import UnitOptimizer
from tests.core.tiny import TinyLM, batches, initial_state, relative_error, trainer


@pytest.fixture(autouse=True)
def _restore_sigint():
    # After a KeyboardInterrupt Lightning ignores SIGINT for the rest of the process (so that a second Ctrl+C cannot
    # break its shutdown): give the next tests their Ctrl+C back.
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


class Watch(L.Callback):
    """Keeps a weak reference to the engine; raises ``KeyboardInterrupt`` after micro-batch ``interrupt_at`` (once
    ``ready`` is set, when given)."""

    def __init__(self, interrupt_at: int | None = None, ready: threading.Event | None = None) -> None:
        self.interrupt_at, self.ready, self.engine = interrupt_at, ready, None

    def on_train_start(self, trainer, pl_module):
        self.engine = weakref.ref(trainer.strategy.engine)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.interrupt_at:
            if self.ready is not None:
                assert self.ready.wait(10)
            raise KeyboardInterrupt


def fit_until_it_fails(expected, *, torn, module=None, callbacks=(), steps=4, **options):
    """Fit a tiny model with slideformer (window 1, updates streaming out of the backward unless ``options`` say
    otherwise) until it raises ``expected``; check that nothing is left running and what is left held (``torn``:
    stopped in the middle of an optimizer step); return the exception and the names of its traceback's frames."""
    module = module or TinyLM("llama", initial_state("llama"))
    watch = Watch()
    strategy_options = {k: options.pop(k) for k in ("offload_dir", "offload", "offload_activations") if k in options}
    strategy = lightning_slide.SlideFormerStrategy(window=1, **strategy_options)
    options = {"gradient_clip_val": None, "accumulate_grad_batches": 1, **options}
    run = trainer(strategy, max_steps=steps, callbacks=[watch, *callbacks], **options)
    with pytest.raises(expected) as caught:
        run.fit(module, batches(steps * options["accumulate_grad_batches"]))
    exception = caught.value
    assert run.state.status == TrainerStatus.INTERRUPTED
    assert not [t.name for t in threading.enumerate() if t.name.startswith("slide-")]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.grad is None for p in module.parameters())
    assert "forward" not in module.model.model.layers[0].__dict__  # the window's wrapper is gone
    frames = [frame.name for frame in traceback.extract_tb(exception.__traceback__)]
    del caught
    chained = exception
    while chained is not None:  # tracebacks hold the frames that held the engine
        chained.__traceback__, chained = None, chained.__context__
    gc.collect()
    engine = watch.engine()
    if torn:
        assert engine is None, "the engine (and its buffers) outlived the run"
    else:  # kept for a checkpoint after the run (masters and optimizer state), its scratch memory gone
        assert not engine.window.slots and engine.resident_parts.weights is None and engine.activations is None
        assert not engine.loans.pool.allocated and all(unit.grad is None for unit in engine.layers)
    return exception, frames


def assert_trained_like_plain_lightning(module, steps, data, clip=None):
    """``module`` holds exactly ``steps`` whole optimizer steps on ``batches(data)`` (no accumulation)."""
    plain = TinyLM("llama", initial_state("llama"))
    trainer("auto", max_steps=steps, gradient_clip_val=clip, accumulate_grad_batches=1).fit(plain, batches(data))
    theirs = dict(plain.named_parameters())
    for name, param in module.named_parameters():
        assert relative_error(param.detach(), theirs[name].detach()) <= 1e-5, name


# ---------------------------------------------------------------------------------------------------- Ctrl+C
def test_ctrl_c_in_a_callback_stops_every_thread(tmp_path):
    watch = Watch(interrupt_at=2)
    fit_until_it_fails(
        SystemExit, torn=False, callbacks=[watch], offload_dir=str(tmp_path / "state"), offload_activations=True
    )


def test_ctrl_c_while_the_update_thread_is_busy(tmp_path, monkeypatch):
    busy = threading.Event()
    step = UnitOptimizer.step

    def slow_step(self, *args, **kwargs):
        busy.set()
        threading.Event().wait(0.2)  # a slow host update
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UnitOptimizer, "step", slow_step)
    watch = Watch(interrupt_at=1, ready=busy)
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_exception=True)
    module = TinyLM("llama", initial_state("llama"))
    fit_until_it_fails(SystemExit, torn=False, module=module, callbacks=[watch, saver], enable_checkpointing=True)
    monkeypatch.undo()
    assert_trained_like_plain_lightning(module, steps=2, data=4)  # the second step's queued updates were finished
    module.trainer.save_checkpoint(tmp_path / "after.ckpt")
    for name in ("epoch=0-step=2.ckpt", "after.ckpt"):  # saved by on_exception, and after the run: both whole steps
        saved = slide_checkpoint.load(tmp_path / name)
        assert saved["global_step"] == 2 and saved[slide_checkpoint.READER_KEY].has_optimizer
        for key, value in module.state_dict().items():
            assert torch.equal(saved["state_dict"][key], value), (name, key)


def test_ctrl_c_in_the_middle_of_a_step_refuses_checkpoints(tmp_path):
    module = TinyLM("llama", initial_state("llama"))

    class Interrupt(torch.autograd.Function):  # Ctrl+C in backward, between layers 2 and 1
        @staticmethod
        def forward(ctx, hidden):
            return hidden.view_as(hidden)

        @staticmethod
        def backward(ctx, grad):
            raise KeyboardInterrupt

    def hook(layer, args, output):
        if module.trainer.global_step == 3 and torch.is_grad_enabled():
            return (Interrupt.apply(output[0]), *output[1:]) if isinstance(output, tuple) else Interrupt.apply(output)

    module.model.model.layers[1].register_forward_hook(hook)
    saves = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=saves, save_last=True, every_n_train_steps=2, save_on_exception=True)
    with pytest.warns(UserWarning, match="not saved: training stopped in the middle of an optimizer step"):
        fit_until_it_fails(SystemExit, torn=True, module=module, callbacks=[saver], enable_checkpointing=True)
    assert sorted(p.name for p in saves.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert slide_checkpoint.load(saves / "last.ckpt")["global_step"] == 2


def test_ctrl_c_during_a_checkpoint_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    saves = tmp_path / "ckpt"
    write = slide_checkpoint.writing._write_tensors

    def interrupted_write(file, *args, **kwargs):
        if "step=2" in str(file) and "layer-00002" in str(file):  # halfway through the second save
            raise KeyboardInterrupt
        return write(file, *args, **kwargs)

    monkeypatch.setattr(slide_checkpoint.writing, "_write_tensors", interrupted_write)
    saver = ModelCheckpoint(dirpath=saves, save_last=True, every_n_train_steps=1)
    fit_until_it_fails(SystemExit, torn=False, callbacks=[saver], enable_checkpointing=True)
    assert sorted(p.name for p in saves.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]  # no temporary directory
    assert slide_checkpoint.load(saves / "last.ckpt")["global_step"] == 1
    monkeypatch.undo()
    module = TinyLM("llama", initial_state("llama"))  # the last good checkpoint resumes
    trainer(lightning_slide.SlideFormerStrategy(window=1), max_steps=2).fit(
        module, batches(4), ckpt_path=saves / "last.ckpt"
    )
    assert module.trainer.global_step == 2


# ---------------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("clip", [None, 0.5])  # updates streaming out of the backward, or queued after it
def test_a_failing_update_surfaces_with_its_traceback(monkeypatch, clip):
    step = UnitOptimizer.step

    def failing_step(self, *args, **kwargs):
        first = self.inner.param_groups[0]["params"][0]  # torch's optimizer of the unit: its first tensor
        if self.unit.name == "layer 2" and self.inner.state[first]["step"] >= 1:
            raise RuntimeError("injected update failure")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UnitOptimizer, "step", failing_step)
    exception, frames = fit_until_it_fails(RuntimeError, torn=True, gradient_clip_val=clip)
    assert str(exception) == "injected update failure" and "failing_step" in frames


def test_a_failing_clipping_norm_fails_the_updates_that_need_it(monkeypatch):
    from lightning_slide.engine import checks

    clip_task, calls = checks.clip_task, []

    def failing_norm(engine, *args):
        calls.append(args)
        if len(calls) == 2:  # the second step's global norm
            raise MemoryError("injected norm failure")
        return clip_task(engine, *args)

    monkeypatch.setattr(checks, "clip_task", failing_norm)
    module = TinyLM("llama", initial_state("llama"))
    exception, frames = fit_until_it_fails(MemoryError, torn=True, module=module, gradient_clip_val=0.5)
    assert "failing_norm" in frames
    monkeypatch.undo()
    assert_trained_like_plain_lightning(module, steps=1, data=4, clip=0.5)  # no update ran unclipped


def test_a_failing_disk_write_surfaces_with_its_traceback(tmp_path, monkeypatch):
    write_array = disk.write_array

    def write_to_full_disk(path, tensor, nocache=None):  # layer 2's files find the disk full
        if "layer00002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_array(path, tensor, nocache)

    monkeypatch.setattr(disk, "write_array", write_to_full_disk)
    exception, frames = fit_until_it_fails(OSError, torn=True, offload_dir=str(tmp_path))
    assert exception.errno == errno.ENOSPC
    assert "write_to_full_disk" in frames  # where it happened: on the disk tier's writer thread


@pytest.mark.parametrize("offload,failing_file", [("optimizer", "layer00001"), ("both", "layer00002.master")])
def test_a_failing_disk_read_surfaces_with_its_traceback(tmp_path, monkeypatch, offload, failing_file):
    read_array = disk.read_array

    def failing_read(path, out, nocache=None):
        if failing_file in str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return read_array(path, out, nocache)

    monkeypatch.setattr(disk, "read_array", failing_read)
    exception, frames = fit_until_it_fails(
        OSError, torn=True, offload_dir=str(tmp_path), offload=offload, gradient_clip_val=0.5
    )
    assert exception.errno == errno.EIO and "failing_read" in frames


def test_ctrl_c_while_waiting_for_an_update_leaves_it_to_be_finished():
    from lightning_slide.engine.update_worker import UpdateWorker

    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker, gate, ran = UpdateWorker(), threading.Event(), []
    worker.submit("busy", gate.wait)
    worker.submit("queued", lambda: ran.append("queued"))
    main = threading.main_thread().ident
    threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        worker.wait("queued")  # Ctrl+C while the training thread waits
    assert not worker.done("queued")
    gate.set()
    worker.close(drain=True)  # a stop between two steps finishes what was queued
    assert ran == ["queued"]
