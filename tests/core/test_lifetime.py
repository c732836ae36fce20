"""Nothing outlives a run: worker threads, wrappers and hooks go away; repeated runs do not grow memory."""

from __future__ import annotations

import gc
import resource
import threading

import pytest
import torch

import lightning_slide
from tests.core.tiny import ACCELERATOR, TinyLM, batches, initial_state, trainer


def _slide_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("slide-")]


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def test_fit_validate_fit_test_soak(tmp_path):
    module = TinyLM("llama", initial_state("llama"))
    module.test_step = module.validation_step
    rss = []
    for round_ in range(4):
        for stage in ("fit", "validate", "fit", "test"):
            strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path / "state"))
            run = trainer(strategy, max_steps=2)
            if stage == "fit":
                run.fit(module, batches(4, seed=round_))
            else:
                getattr(run, stage)(module, batches(2, seed=9), verbose=False)
            assert not _slide_threads(), f"threads left after {stage}: {_slide_threads()}"
            assert strategy.engine is None
        gc.collect()
        rss.append(_rss_mib())
    assert "forward" not in module.model.model.layers[0].__dict__
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.grad is None for p in module.parameters())
    # The first rounds warm caches up; afterwards a round must not keep memory.
    assert rss[-1] - rss[1] < 64, f"resident memory grew across rounds: {rss}"


def test_a_finished_fit_keeps_only_what_a_checkpoint_needs(tmp_path):
    module = TinyLM("llama", initial_state("llama"))
    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_activations=True)
    run = trainer(strategy, max_steps=2)
    run.fit(module, batches(4))
    engine = run.optimizers[0].engine  # kept for a checkpoint after the run
    assert not engine.window.slots and engine.resident_parts.weights is None and engine.activations is None
    assert not engine.loans.pool.allocated and all(unit.grad is None for unit in engine.layers)
    run.save_checkpoint(tmp_path / "after_fit.ckpt")


@pytest.mark.skipif(not torch.cuda.is_available() or ACCELERATOR != "gpu", reason="the GPU cap needs CUDA")
def test_gpu_memory_limit_ends_with_the_fit():
    """torch's memory fraction is process-wide: a capped fit must not leave the cap on for what runs next."""
    strategy = lightning_slide.SlideFormerStrategy(window=2, gpu_memory_limit="4GiB")
    trainer(strategy, max_steps=1).fit(TinyLM("llama", initial_state("llama")), batches(2))
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is not None:
        assert getter(0) == 1.0
    torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda")  # more than the cap was
