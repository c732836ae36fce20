"""bf16 Adam moments (lightning_slide.optim.AdamW) on the disk tier: bf16 files, half the bytes, training unchanged."""

from __future__ import annotations

import dataclasses
import functools

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import lightning_slide
from lightning_slide import optim
from lightning_slide.engine.disk import MASTER, StateStore
from tests.core.test_parity import assert_same_training, train
from tests.core.tiny import ACCELERATOR, TinyLM, assert_resumes_exactly, initial_state

low_precision = functools.partial(optim.AdamW, lr=3e-3, betas=(0.9, 0.95))
MOMENTS = ("exp_avg", "exp_avg_sq")


def _file_values(path) -> torch.Tensor:
    """A moment file's elements read as bf16."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.bfloat16)


def _named_state(module: TinyLM, state: dict) -> dict[str, dict]:
    """``state_dict()["state"]`` by parameter name (TinyLM's groups: decayed parameters first, then the others)."""
    trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = [n for n, p in trained if not (p.ndim < 2 or "norm" in n or "embed" in n)]
    names = decay + [n for n, _ in trained if n not in decay]
    return {name: state[index] for index, name in enumerate(names) if index in state}


@pytest.mark.parametrize("offload", ["optimizer", "both"])
def test_bf16_moments_on_disk_train_as_under_plain_lightning_in_bf16_files(tmp_path, offload):
    captured = {}

    class Capture(L.Callback):
        def on_train_end(self, trainer, pl_module):
            captured["state"] = trainer.optimizers[0].state_dict()["state"]
            captured["resident"] = not trainer.strategy.plan.settings.resident_on_device

    plain = train("llama", "auto", optimizer=low_precision)
    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path), offload=offload)
    ours = train("llama", strategy, optimizer=low_precision, callbacks=[Capture()])
    # as in memory (test_low_precision_adamw)
    assert_same_training(ours, plain, tolerance=1e-4 if ACCELERATOR == "cpu" else 3e-4)

    layer = [(n, p) for n, p in ours.named_parameters() if n.startswith("model.model.layers.0.")]
    numel = sum(p.numel() for _, p in layer)
    named = _named_state(ours, captured["state"])
    for name in MOMENTS:
        path = tmp_path / f"layer00000.{name}.bin"
        assert path.stat().st_size == 2 * numel  # bf16: half of fp32's 4 bytes per element
        assert (tmp_path / f"resident.{name}.bin").exists() == captured["resident"]
        # The file holds the optimizer's bf16 moments of layer 0 (in the unit's order: compared as sorted values).
        saved = torch.cat([named[n][name].reshape(-1) for n, _ in layer])
        assert saved.dtype == torch.bfloat16
        assert torch.equal(_file_values(path).sort().values, saved.sort().values)
        assert saved.abs().sum() > 0
    if offload == "both":  # the masters stay fp32
        assert (tmp_path / f"layer00000.{MASTER}.bin").stat().st_size == 4 * numel


@pytest.mark.parametrize("offload", ["optimizer", "both"])
def test_bf16_moments_on_disk_checkpoint_and_resume_exactly(tmp_path, offload):
    runs = iter(["first", "resumed", "straight"])  # each run its own offload_dir: the moments come from the checkpoint

    def strategy():
        directory = tmp_path / f"state-{next(runs)}"
        return lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(directory), offload=offload)

    assert_resumes_exactly(tmp_path, strategy, optimizer=low_precision)
    files = sorted((tmp_path / "a" / "last.ckpt" / "optimizer").glob("*.safetensors"))
    moments = [load_file(f) for f in files]
    assert files and {t.dtype for m in moments for n, t in m.items() if "exp_avg" in n} == {torch.bfloat16}
    layer = sum(p.numel() for p in TinyLM("llama", initial_state("llama")).model.model.layers[0].parameters())
    assert (tmp_path / "state-resumed" / "layer00000.exp_avg.bin").stat().st_size == 2 * layer


# ------------------------------------------------------------------------------------------------- the store itself
NUMEL = 1000


def test_the_store_keeps_each_array_in_its_dtype_and_pools_within_in_flight_units(tmp_path):
    """Layers of an fp32 master and two bf16 moments; the resident parts' bf16 moments of as many bytes as a master
    (another kind of buffer: never handed an fp32 one). Pooled and used buffers stay within in_flight units."""
    s = StateStore(tmp_path, in_flight=2)
    try:
        for key in (0, 1):
            s.add(key, MASTER, NUMEL)
            for name in MOMENTS:
                s.add(key, name, NUMEL, torch.bfloat16)
        for name in MOMENTS:
            s.add("resident", name, 2 * NUMEL, torch.bfloat16)
        unit_bytes = 4 * NUMEL + 2 * 2 * NUMEL
        written = {}
        for round_ in range(2):
            layers = [s.read(key).result(timeout=10) for key in (0, 1)]
            for key, state in enumerate(layers):
                assert {n: t.dtype for n, t in state.items()} == {
                    MASTER: torch.float32,
                    "exp_avg": torch.bfloat16,
                    "exp_avg_sq": torch.bfloat16,
                }
                for tensor in state.values():
                    tensor.copy_(torch.randn(NUMEL))
                written[key] = {n: t.clone() for n, t in state.items()}
                s.write(key, state)
            s.flush()  # both layers' buffers are pooled now
            resident = s.read("resident").result(timeout=10)
            assert all(t.dtype == torch.bfloat16 and t.numel() == 2 * NUMEL for t in resident.values())
            for tensor in resident.values():
                tensor.copy_(torch.randn(2 * NUMEL))
            written["resident"] = {n: t.clone() for n, t in resident.items()}
            s.write("resident", resident)
            s.flush()
            assert s.peak_bytes == 2 * unit_bytes, round_  # two layers' worth: no more
        for key, state in written.items():
            loaded = s.load(key)
            for name, tensor in state.items():
                assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), (key, name)
        assert s.path(0, "exp_avg").stat().st_size == 2 * NUMEL
        assert s.path(0, MASTER).stat().st_size == 4 * NUMEL
        assert s.path("resident", "exp_avg_sq").stat().st_size == 2 * 2 * NUMEL
        with pytest.raises(ValueError, match="bfloat16"):  # an array is written in its declared dtype only
            s.put(0, {"exp_avg": torch.zeros(NUMEL)})
    finally:
        s.close()


# ----------------------------------------------------------------------------------------------------- the planner
@pytest.mark.skipif(ACCELERATOR != "cpu", reason="the plan's host items, counted on the CPU")
@pytest.mark.parametrize("offload", ["optimizer", "both"])
def test_the_plan_counts_bf16_moment_files(offload):
    from lightning_slide.engine.machine import Machine, step_times
    from lightning_slide.engine.plan import ModelShape, Settings, disk_bytes, host_bytes

    layers, layer, resident = 8, 2_250, 1_000
    shape = ModelShape(
        layers=layers, layer_params=layer, layer_trainable=layer, resident_params=resident, resident_trainable=resident
    )
    fp32 = Settings(device="cpu", compute_dtype=torch.float32, window=2, offload_dir="/x", offload=offload)
    bf16 = dataclasses.replace(fp32, moments_dtype=torch.bfloat16)
    trainable = layers * layer + resident  # every parameter updated on the host
    masters = 4 * layers * layer if offload == "both" else 0  # fp32 files either way
    assert disk_bytes(shape, fp32)["Adam moments (fp32 files)"] == 8 * trainable
    assert disk_bytes(shape, bf16)["Adam moments (bf16 files)"] == 4 * trainable
    assert sum(disk_bytes(shape, bf16).values()) == 4 * trainable + masters
    # In host memory: grad_buffers + 1 = window + 3 = 5 layers' arrays read from the files, at most.
    what = "Adam moments + fp32 masters" if offload == "both" else "Adam moments"
    item = f"{what} in flight (disk tier)"
    per_layer_masters = 4 * layer if offload == "both" else 0
    assert host_bytes(shape, fp32)[item] == 5 * (8 * layer + per_layer_masters)
    assert host_bytes(shape, bf16)[item] == 5 * (4 * layer + per_layer_masters)
    # The step's disk traffic follows the files.
    machine = Machine(disk_read_bytes_per_s=1e9, disk_write_bytes_per_s=1e9)
    read = f"disk read ({'Adam moments + masters' if offload == 'both' else 'Adam moments'})"
    assert step_times(shape, bf16, machine)[read] == pytest.approx((4 * trainable + masters) / 1e9)
