"""The disk tier: optimizer state in real files, training unchanged."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide.engine.disk import check_disk_space
from tests.core.test_parity import assert_same_training
from tests.core.tiny import TinyLM, batches, initial_state, relative_error, trainer


@pytest.mark.parametrize("clip, accumulate", [(0.5, 2), (None, 1)])
def test_optimizer_state_on_disk_trains_the_same(tmp_path, clip, accumulate):
    modules = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path))):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
        trainer(strategy, gradient_clip_val=clip, accumulate_grad_batches=accumulate, max_steps=6).fit(
            module, batches(6 * accumulate)
        )
        modules.append(module)
    plain, ours = modules
    assert_same_training(ours, plain)
    layer = sum(p.numel() for p in ours.model.model.layers[0].parameters())
    # The resident parts' moments are files only when the host updates them: resident_optimizer="auto" updates
    # them on the GPU (their state lives there) when they fit, as the tiny model's do.
    resident_on_host = not ours.trainer.strategy.plan.settings.resident_on_device
    assert resident_on_host == (ours.trainer.strategy.root_device.type == "cpu")
    for name in ("exp_avg", "exp_avg_sq"):
        assert (tmp_path / f"layer00000.{name}.bin").stat().st_size == 4 * layer
        assert (tmp_path / f"resident.{name}.bin").exists() == resident_on_host


def test_optimizer_state_dict_reads_the_disk_tier(tmp_path):
    captured = {}

    class Capture(L.Callback):
        def on_train_end(self, trainer, pl_module):
            captured["state"] = trainer.optimizers[0].state_dict()

    module = TinyLM("llama", initial_state("llama"))
    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path))
    trainer(strategy, max_steps=2, callbacks=[Capture()]).fit(module, batches(4))
    state = captured["state"]["state"]
    assert len(state) == sum(len(g["params"]) for g in captured["state"]["param_groups"])
    assert all(s["exp_avg"].abs().sum() > 0 and float(s["step"]) == 2 for s in state.values())


def test_not_enough_disk_space_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"needs 8\.00 GiB under .* only 1\.00 GiB is free.*offload_dir"):
        check_disk_space(tmp_path, needed=8 * 2**30, free=2**30)
    check_disk_space(tmp_path, needed=1)  # the real free space of this disk
    with pytest.raises(ValueError, match="needs"):
        check_disk_space(tmp_path, needed=2**62)


def test_checkpoint_and_exact_resume_with_the_disk_tier(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, name, state, ckpt_path=None):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
        saver = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_train_steps=1)
        strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path / state))
        trainer(strategy, max_steps=steps, max_epochs=-1, enable_checkpointing=True, callbacks=[saver]).fit(
            module, batches(2), ckpt_path=ckpt_path
        )
        return module

    straight = run(5, "straight", "state-straight")
    run(3, "first", "state-first")
    resumed = run(5, "first", "state-resumed", ckpt_path="last")  # the optimizer state must come from the checkpoint
    assert resumed.losses == straight.losses[6:]
    theirs = dict(straight.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, theirs[name]), name


# ---------------------------------------------------------------------------------------------- masters on disk
def _fit(strategy, family="llama", clip=0.5, accumulate=2, steps=5, precision="32-true", callbacks=()):
    torch.manual_seed(123)
    module = TinyLM(family, initial_state(family))
    trainer(
        strategy,
        precision=precision,
        gradient_clip_val=clip,
        accumulate_grad_batches=accumulate,
        max_steps=steps,
        callbacks=list(callbacks),
    ).fit(module, batches(steps * accumulate))
    return module


@pytest.mark.parametrize(
    "offload, clip, accumulate", [("masters", 0.5, 2), ("both", 0.5, 2), ("both", None, 1)]
)  # updates after backward (clipping, accumulation) / streamed out of the backward
def test_masters_on_disk_train_the_same(tmp_path, offload, clip, accumulate):
    plain = _fit("auto", clip=clip, accumulate=accumulate, steps=6)
    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path), offload=offload)
    ours = _fit(strategy, clip=clip, accumulate=accumulate, steps=6)
    assert_same_training(ours, plain)
    layer = sum(p.numel() for p in ours.model.model.layers[0].parameters())
    assert (tmp_path / "layer00000.master.bin").stat().st_size == 4 * layer
    assert not (tmp_path / "resident.master.bin").exists()  # embeddings, norm and head keep theirs in memory
    assert (tmp_path / "layer00000.exp_avg.bin").exists() == (offload == "both")
    # After fit a layer's parameters are fp32 views of its master file, mapped into memory.
    weight = ours.model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and weight.untyped_storage().filename.endswith("layer00000.master.bin")


def test_masters_on_disk_equal_masters_in_memory_bit_for_bit(tmp_path):
    runs = {}
    for name, strategy in {
        "memory": lightning_slide.SlideFormerStrategy(window=2, tuning=dict(host_weights="compute")),
        "disk": lightning_slide.SlideFormerStrategy(window=2, offload_dir=str(tmp_path), offload="both"),
    }.items():
        runs[name] = _fit(strategy, precision="bf16-true", steps=4)
    assert runs["disk"].losses == runs["memory"].losses
    theirs = dict(runs["memory"].named_parameters())
    for name, param in runs["disk"].named_parameters():
        assert torch.equal(param, theirs[name]), name


@pytest.mark.parametrize("offload", ["masters", "both"])
def test_checkpoint_and_exact_resume_with_masters_on_disk(tmp_path, offload):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, name, state, ckpt_path=None):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
        saver = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_train_steps=1)
        strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path / state), offload=offload)
        trainer(strategy, max_steps=steps, max_epochs=-1, enable_checkpointing=True, callbacks=[saver]).fit(
            module, batches(2), ckpt_path=ckpt_path
        )
        return module

    straight = run(4, "straight", "state-straight")
    run(2, "first", "state-first")
    resumed = run(4, "first", "state-resumed", ckpt_path="last")  # masters must come from the checkpoint
    assert resumed.losses == straight.losses[4:]
    theirs = dict(straight.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, theirs[name]), name
    # The checkpoint holds the fp32 masters read from the files, one layer file each.
    from lightning_slide.checkpoint import CheckpointReader, unit_file

    saved = CheckpointReader(tmp_path / "first" / "last.ckpt").read(unit_file("model", "1"))
    assert torch.equal(
        saved["model.model.layers.1.self_attn.q_proj.weight"], resumed.model.model.layers[1].self_attn.q_proj.weight
    )


def test_host_memory_with_masters_and_optimizer_on_disk(tmp_path):
    """Host bytes the engine holds: the bf16 copy (2 B/param) + a bounded number of layers in flight."""
    seen = []

    class Measure(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            engine = trainer.strategy.engine
            seen.append((engine.host_bytes(), engine.state_store.peak_bytes, engine.loans.pool.allocated))

    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path), offload="both")
    module = _fit(
        strategy, family="llama_deep", clip=None, accumulate=1, steps=3, precision="bf16-true", callbacks=[Measure()]
    )
    layers = module.model.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    resident = sum(p.numel() for n, p in module.named_parameters() if ".layers." not in n)
    in_flight = 1 + 3  # window + 3 units read from disk at most
    for held, peak, grads in seen:
        assert held["compute copies"] == 2 * len(layers) * per_layer  # bf16, every layer
        assert held["fp32 masters"] == 4 * resident  # only the resident parts' masters are in memory
        assert held["optimizer state"] == 0
        assert peak <= in_flight * 12 * per_layer  # masters + 2 moments of at most window + 2 layers
        assert grads <= 1 + 2  # window + 2 gradient buffers
        # The arrays in flight are bounded above (the whole of them: 4.6 B/param of this tiny model at times);
        # beside them the engine holds the bf16 copy and the resident masters, no layer's fp32 state.
        assert held["disk tier in flight"] <= in_flight * 12 * per_layer
        rest = sum(held.values()) - held["disk tier in flight"] - held["gradients"]
        assert rest / (len(layers) * per_layer + resident) <= 2.2, held
    # Without the disk tier the same engine holds fp32 masters and moments: 12 B/param and more.
    assert len(seen) == 3


def test_masters_on_disk_refused_up_front_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil

    from lightning_slide.engine import disk

    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 1000, 1000))
    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path), offload="both")
    with pytest.raises(ValueError, match=r"(?s)disk: needs .* more than the 1000 B available.*layer fp32 masters"):
        _fit(strategy, steps=1)  # the strategy's plan refuses it at setup
    # The engine checks too (used without the strategy), before it writes anything.
    from lightning_slide.engine.engine import SlidingEngine
    from lightning_slide.engine.options import SlideOptions

    with pytest.raises(ValueError, match=r"needs .* \(fp32 masters .* \+ optimizer state .*\) but only 1000 B is free"):
        SlidingEngine(
            TinyLM("llama", initial_state("llama")),
            SlideOptions(window=1, offload_dir=str(tmp_path), offload="both"),
            device=torch.device("cpu"),
            compute_dtype=torch.float32,
        )
    assert not list(tmp_path.glob("*.bin"))


def test_the_plan_counts_the_tiers_own_files_as_its_space(tmp_path, monkeypatch):
    """A disk just large enough for the run's files: the plan made after the tier wrote them (the first batch's)
    counts them as the run's, not as space taken; a later run's check, which rewrites them in place, too."""
    import gc
    import shutil

    from lightning_slide.engine import disk
    from lightning_slide.engine.machine import Machine

    def fit(directory):
        strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(directory), offload="both")
        _fit(strategy, clip=None, accumulate=1, steps=2)

    fit(tmp_path / "probe")
    files = sum(p.stat().st_size for p in (tmp_path / "probe").glob("*.bin"))
    real, run = disk.shutil.disk_usage, tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_bytes(b"x" * 1000)  # not the tier's: taken space
    room = files + 1000 + 4096  # the lock file and a little more

    def small_disk(path):  # free space that shrinks as files are written under ``run``
        held = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        return shutil._ntuple_diskusage(room, held, room - held) if str(path).startswith(str(run)) else real(path)

    monkeypatch.setattr(disk.shutil, "disk_usage", small_disk)
    fit(run)
    assert sum(p.stat().st_size for p in run.glob("*.bin")) == files
    free = small_disk(run).free
    masters = sum(p.stat().st_size for p in run.glob("*.master.bin"))
    both = Machine.detect(offload_dir=str(run), tier=(4, {"optimizer", "masters"})).disk_free
    assert both == free + files
    # a run with its masters in memory leaves an earlier run's master files as they are: space taken
    assert Machine.detect(offload_dir=str(run), tier=(4, {"optimizer"})).disk_free == free + files - masters
    gc.collect()  # the first run's module, which maps the master files, is dropped
    fit(run)  # a later run in the same directory


def test_offload_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="offload.*'optimizer', 'masters', 'both'"):
        lightning_slide.SlideFormerStrategy(offload_dir=str(tmp_path), offload="weights")
    with pytest.raises(ValueError, match="set offload_dir"):
        lightning_slide.SlideFormerStrategy(offload="masters")
    with pytest.raises(ValueError, match="host_weights='fp32'.*masters on disk"):
        lightning_slide.SlideFormerStrategy(
            offload_dir=str(tmp_path), offload="masters", tuning=dict(host_weights="fp32")
        )
    both = lightning_slide.SlideFormerStrategy(offload_dir=str(tmp_path), offload="both")
    assert both.options.tuning.host_weights == "compute"  # "auto", decided when the options are built
    assert lightning_slide.SlideFormerStrategy(offload_dir=str(tmp_path)).options.tuning.host_weights == "fp32"


@pytest.mark.timeout(120)  # a deadlock between reordered updates and their reads would hang here
@pytest.mark.parametrize("grad_buffers, parked, clip", [(None, 0, None), (1, 0, None), (1, 2, None), (1, 2, 0.5)])
def test_slow_host_with_everything_on_disk_streams_reordered_updates(tmp_path, grad_buffers, parked, clip):
    """Also with parked gradients: streamed (no clipping), or held until the norm (clipping by norm)."""
    import time

    class SlowHost(L.Callback):
        def on_train_start(self, trainer, pl_module):
            engine = trainer.strategy.engine
            update = engine.updates.run

            def slow_update(*args):  # updates pile up behind the backward and are reordered when it ends
                time.sleep(0.02)
                update(*args)

            engine.updates.run = slow_update

        def on_train_end(self, trainer, pl_module):
            self.parked = trainer.strategy.engine.stats()["parked_layers"]

    plain = _fit("auto", clip=clip, accumulate=1, steps=4)
    tuning = dict(grad_buffers=grad_buffers, parked_grads=parked)
    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path), offload="both", tuning=tuning)
    slow = SlowHost()
    ours = _fit(strategy, clip=clip, accumulate=1, steps=4, callbacks=[slow])
    assert (slow.parked > 0) == (parked > 0)
    assert ours.losses == pytest.approx(plain.losses, rel=1e-5)
    theirs = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        assert relative_error(param.detach(), theirs[name].detach()) <= 1e-5, name
