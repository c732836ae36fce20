"""Several ranks (gloo, two CPU processes): N ranks on a global batch train as one process on it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_slide
from tests.core.tiny import ACCELERATOR, TinyLM, inf_grad, batches, initial_state, relative_error, trainer

TOLERANCE = 1e-4  # the mean over ranks sums in another order than one process's mean over the whole batch
STEPS, ACCUMULATE, GLOBAL_BATCH = 6, 2, 4
# A collective that waits this long for a rank that stopped fails: the stop tests take far less, or they hung.
HANG = timedelta(seconds=60)
HOST = dict(resident_optimizer="host")  # the resident parts updated on the host, sharded like the layers


class RecordHostBytes(L.Callback):
    """Writes what each rank's engine holds in host memory, by kind, to ``directory/rank{r}.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, module) -> None:
        engine = trainer.strategy.engine
        mapped = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        figures = {**engine.host_bytes(), "world": trainer.world_size, "shared": "lightning-slide-masters" in mapped,
                   "parked": engine.stats()["parked_layers"]}
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(figures))


def data(devices: int) -> DataLoader:
    """One epoch of the same global batches for any number of ranks."""
    samples = batches(STEPS * ACCUMULATE, batch_size=GLOBAL_BATCH).dataset
    if devices > 1:  # Lightning gives each rank a shuffling DistributedSampler (seed 0): rank r takes order[r::N]
        return DataLoader(samples, batch_size=GLOBAL_BATCH // devices)
    # One process: order[k*B:(k+1)*B], the union of the ranks' k-th batches.
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(samples.tensors[0][order]), batch_size=GLOBAL_BATCH)


def train(strategy, *, devices: int, module=None, callbacks=(), freeze=(), ckpt_path=None, **options):
    torch.manual_seed(123)
    module = module or TinyLM("llama", initial_state("llama"), freeze=freeze)
    options = {"max_steps": STEPS, "accumulate_grad_batches": ACCUMULATE, **options}
    ranks = devices * options.get("num_nodes", 1)
    trainer(strategy, devices=devices, callbacks=list(callbacks), **options).fit(module, data(ranks), ckpt_path=ckpt_path)
    return module


def assert_same_weights(ours, plain):
    theirs = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        error = relative_error(param.detach(), theirs[name].detach())
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"
    start = dict(initial_state("llama"))
    moved = sum(relative_error(p.detach(), start[n.removeprefix("model.")]) for n, p in plain.named_parameters())
    assert moved > 1e-3  # it trained


@pytest.fixture(scope="module")
def plain():
    return train("auto", devices=1)


@pytest.mark.parametrize("clip", [0.5, None], ids=["clip-norm", "streamed"])
def test_two_ranks_train_as_one_process(plain, clip, tmp_path, request):
    reference = plain if clip == 0.5 else train("auto", devices=1, gradient_clip_val=None)
    # The resident parts on the host too (a GPU would update them on the device, replicated): every unit sharded.
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=HOST, start_method="spawn")
    ours = train(strategy, devices=2, gradient_clip_val=clip, callbacks=[RecordHostBytes(str(tmp_path))])
    assert_same_weights(ours, reference)
    # Each rank keeps the Adam moments of half of every unit.
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    for figures in ranks:
        assert figures["world"] == 2
        assert figures["optimizer state"] <= 8 * trainable / 2 + 8 * 64  # + a little padding of the last shards
    assert sum(f["optimizer state"] for f in ranks) == 8 * trainable
    # The two ranks of this host map one copy of the fp32 masters, in shared memory.
    if Path("/proc/self/maps").exists() and Path("/dev/shm").is_dir():
        assert all(f["shared"] for f in ranks)
    assert sum(f["fp32 masters"] for f in ranks) == 4 * sum(p.numel() for p in ours.parameters())


def test_clipping_by_value_with_two_ranks():
    """Clipping by value streams: each rank clamps its shard of the averaged gradients as its updates run, as one
    process clamps the whole gradient of the global batch."""
    options = dict(gradient_clip_val=0.002, gradient_clip_algorithm="value")
    reference = train("auto", devices=1, **options)
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=HOST, start_method="spawn")
    assert_same_weights(train(strategy, devices=2, **options), reference)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_gradient_norm_with_two_ranks(tmp_path, accumulate):
    """GradNormMonitor logs the norm of the global batch's gradients: each rank's shards' squares summed over ranks
    (the resident parts, replicated and updated on the device, counted once)."""
    norms = []
    for devices, strategy in [
        (1, "auto"),
        (2, lightning_slide.SlideFormerStrategy(window=2, tuning=HOST, start_method="spawn")),
        (2, lightning_slide.SlideFormerStrategy(window=2, tuning=dict(resident_optimizer="device"), start_method="spawn")),
    ]:
        logger = CSVLogger(tmp_path, name=f"run{len(norms)}", version=0)
        options = dict(logger=logger, log_every_n_steps=1, accumulate_grad_batches=accumulate, gradient_clip_val=None)
        train(strategy, devices=devices, callbacks=[lightning_slide.GradNormMonitor()], **options)
        rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        values = [dict(zip(header, row.split(","))) for row in rows[1:]]
        norms.append({int(v["step"]): float(v["grad_norm"]) for v in values if v.get("grad_norm")})
    assert len(norms[0]) == STEPS
    for ours in norms[1:]:
        assert ours.keys() == norms[0].keys()
        for step, norm in norms[0].items():
            assert ours[step] == pytest.approx(norm, rel=TOLERANCE), step


@pytest.mark.parametrize("clip", [0.5, None], ids=["clip-norm", "streamed"])
def test_parked_gradients_with_two_ranks(clip, tmp_path):
    """Each rank parks its shard of a layer's gradients (one micro-batch per step: while updates stream, or until
    the clipping norm) and the two train as one process."""
    options = dict(gradient_clip_val=clip, accumulate_grad_batches=1, max_steps=STEPS * ACCUMULATE)
    reference = train("auto", devices=1, **options)
    strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=dict(HOST, grad_buffers=1, parked_grads=1),
                                                   start_method="spawn")
    ours = train(strategy, devices=2, callbacks=[RecordHostBytes(str(tmp_path))], **options)
    assert_same_weights(ours, reference)
    if clip is not None:  # the step waits for the norm: the first layer to finish parks, on each rank
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
        assert all(f["parked"] == STEPS * ACCUMULATE for f in ranks)


def test_without_room_in_shared_memory_each_rank_keeps_its_own_masters(plain, tmp_path, monkeypatch):
    """Where shared memory cannot hold the masters (here: the directory named does not exist), each rank keeps a
    copy and training is the same."""
    monkeypatch.setenv("LIGHTNING_SLIDE_SHM_DIR", str(tmp_path / "no-shm"))  # the spawned ranks inherit it
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=HOST, start_method="spawn")
    ours = train(strategy, devices=2, gradient_clip_val=0.5, callbacks=[RecordHostBytes(str(tmp_path))])
    assert_same_weights(ours, plain)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    masters = 4 * sum(p.numel() for p in ours.parameters())
    assert all(not f["shared"] and f["fp32 masters"] == masters for f in ranks)


def test_frozen_parameters_and_resident_parts_updated_on_the_device():
    """The resident parts updated on the device are replicated (gradients averaged, every rank updates them);
    frozen parameters are in no rank's optimizer."""
    options = dict(window=1, tuning=dict(resident_optimizer="device"))
    frozen = ("layers.1.mlp", "embed_tokens")
    reference = train("auto", devices=1, freeze=frozen)
    ours = train(lightning_slide.SlideFormerStrategy(**options, start_method="spawn"), devices=2, freeze=frozen)
    assert_same_weights(ours, reference)
    start = initial_state("llama")
    assert torch.equal(ours.model.model.layers[1].mlp.up_proj.weight.detach(), start["model.layers.1.mlp.up_proj.weight"])


class PoisonedOnRank(TinyLM):
    """Micro-batch ``batch_idx`` of rank ``rank`` has an all-Inf gradient for layer 1's down projection, given inside
    the layer's forward (where its weights are in the window: see ``tests/core/test_nonfinite.py``)."""

    def __init__(self, rank: int, batch_idx: int) -> None:
        super().__init__("llama", initial_state("llama"))
        self.rank, self.poisoned = rank, batch_idx
        self.poison_now = False
        self.model.model.layers[1].mlp.down_proj.register_forward_hook(self._poison_layer)

    def _poison_layer(self, module, args, output):
        return output + inf_grad(module.weight) if self.poison_now else None

    def training_step(self, batch, batch_idx):
        self.poison_now = batch_idx == self.poisoned and self.trainer.global_rank == self.rank
        return super().training_step(batch, batch_idx)


def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank():
    """Only rank 1 sees the Inf (it would reach rank 0 only through the reduced shard that rank 0 owns, or not at
    all): both ranks skip the same optimizer step, as one process skipping it."""
    reference = train(lightning_slide.SlideFormerStrategy(window=2, nonfinite="skip"), devices=1,
                      module=PoisonedOnRank(0, 2), gradient_clip_val=None)
    strategy = lightning_slide.SlideFormerStrategy(window=2, nonfinite="skip", start_method="spawn")
    ours = train(strategy, devices=2, module=PoisonedOnRank(1, 2), gradient_clip_val=None)
    assert_same_weights(ours, reference)
    assert all(torch.isfinite(p).all() for p in ours.parameters())


def test_checkpoint_and_exact_resume_with_two_ranks(tmp_path):
    """Each rank holds a shard of the optimizer state; a checkpoint holds it whole. Two ranks stopped after an epoch
    and resumed train as two ranks uninterrupted; one process resumes the same checkpoint as it would its own."""
    def strategy():
        return lightning_slide.SlideFormerStrategy(window=2, tuning=HOST, start_method="spawn")

    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    whole = train(strategy(), devices=2, max_epochs=2, max_steps=-1)
    train(strategy(), devices=2, max_epochs=1, max_steps=-1, enable_checkpointing=True, callbacks=[checkpoints])
    assert (tmp_path / "last.ckpt" / "index.json").is_file()
    resumed = train(strategy(), devices=2, max_epochs=2, max_steps=-1, ckpt_path=str(tmp_path / "last.ckpt"))
    theirs = dict(whole.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param.detach(), theirs[name].detach()), name

    # The checkpoint's optimizer state is whole: one process resuming it trains as one process uninterrupted.
    single_whole = train("auto", devices=1, max_epochs=2, max_steps=-1)
    single = train(lightning_slide.SlideFormerStrategy(window=2), devices=1, max_epochs=2, max_steps=-1,
                   ckpt_path=str(tmp_path / "last.ckpt"))
    assert_same_weights(single, single_whole)


def test_bf16_moments_checkpoint_whole_in_bf16_with_two_ranks(tmp_path):
    """Each rank holds bf16 pieces of the moments; the checkpoint holds them whole, still in bf16 (not twice the
    size), and one process resumes it as it would its own checkpoint."""
    from safetensors.torch import load_file

    from tests.core.test_low_precision_adamw import low_precision

    def module():
        return TinyLM("llama", initial_state("llama"), optimizer=low_precision)

    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=HOST, start_method="spawn")
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    train(strategy, devices=2, module=module(), max_epochs=1, max_steps=-1, enable_checkpointing=True,
          callbacks=[checkpoints])
    files = sorted((tmp_path / "last.ckpt" / "optimizer").glob("*.safetensors"))
    moments = [t for f in files for n, t in load_file(f).items() if "exp_avg" in n]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    resumed = train(lightning_slide.SlideFormerStrategy(window=2), devices=1, module=module(), max_epochs=2,
                    max_steps=-1, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.trainer.global_step == 2 * STEPS


_NODE = """
import sys, torch, lightning_slide
from tests.dist.test_data_parallel import train
module = train(lightning_slide.SlideFormerStrategy(window=2, tuning=dict(resident_optimizer="host")), devices=1,
               num_nodes=2)
if module.trainer.global_rank == 0:
    torch.save({n: p.detach() for n, p in module.named_parameters()}, sys.argv[1])
"""


def test_two_nodes_train_as_one_process(plain, tmp_path):
    """num_nodes=2, one device each: two launches of the same script, told apart by NODE_RANK (two "nodes" on this
    machine), reach the same weights as one process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "weights.pt"
    nodes = [subprocess.Popen([sys.executable, "-c", _NODE, str(out)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "NODE_RANK": str(rank), "PYTHONPATH": str(root),
                                   # one machine: each "node" on a GPU of its own (NCCL refuses two ranks on one)
                                   **({"CUDA_VISIBLE_DEVICES": str(rank)} if ACCELERATOR == "gpu" else {})})
             for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    theirs = dict(plain.named_parameters())
    for name, param in torch.load(out).items():
        error = relative_error(param, theirs[name].detach())
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def test_masters_on_disk_are_refused_with_several_devices(tmp_path):
    strategy = lightning_slide.SlideFormerStrategy(offload_dir=str(tmp_path), offload="masters", start_method="spawn")
    with pytest.raises(Exception, match="offload='optimizer'"):
        train(strategy, devices=2)


def test_optimizer_state_on_disk_with_two_ranks(plain, tmp_path):
    """Each rank keeps its shards' Adam moments in its own files (offload_dir/rank{r})."""
    strategy = lightning_slide.SlideFormerStrategy(window=2, offload_dir=str(tmp_path), start_method="spawn")
    ours = train(strategy, devices=2)
    assert_same_weights(ours, plain)
    layer = sum(p.numel() for p in ours.model.model.layers[0].parameters())
    sizes = [(tmp_path / f"rank{rank}" / "layer00000.exp_avg.bin").stat().st_size for rank in (0, 1)]
    assert sizes[0] == 4 * -(-layer // 2) and sum(sizes) == 4 * layer  # each rank's shard of the layer


class FailsOnRank1(TinyLM):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3 and self.trainer.global_rank == 1:
            raise RuntimeError("boom on rank 1")
        return super().training_step(batch, batch_idx)


def test_a_failure_on_one_rank_stops_every_rank():
    """Rank 0 is waiting in a collective when rank 1 fails: it must not hang; the run ends with rank 1's error."""
    strategy = lightning_slide.SlideFormerStrategy(window=2, start_method="spawn", timeout=HANG)
    start = time.monotonic()
    with pytest.raises(Exception, match="boom on rank 1"):
        train(strategy, devices=2, module=FailsOnRank1("llama", initial_state("llama")))
    assert time.monotonic() - start < HANG.total_seconds()  # not ended by a collective timing out


class SaveInto(L.Callback):
    """Every rank asks for a checkpoint at ``path`` after the first epoch (as ModelCheckpoint does)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, module) -> None:
        trainer.save_checkpoint(self.path)


def test_a_failing_save_on_rank_0_does_not_leave_the_others_waiting(tmp_path):
    """Rank 0 cannot write (the checkpoint's parent is a file) while rank 1 waits in the optimizer-state reads: the
    run stops with the save's error in seconds, not after the collective timeout (rank 1 sees rank 0 go)."""
    (tmp_path / "a_file").write_text("")
    strategy = lightning_slide.SlideFormerStrategy(window=2, start_method="spawn", timeout=HANG)
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)not a directory|file exists"):
        train(strategy, devices=2, max_epochs=2, max_steps=-1, callbacks=[SaveInto(str(tmp_path / "a_file" / "ckpt"))])
    assert time.monotonic() - start < HANG.total_seconds()  # not ended by a collective timing out


def test_a_hook_that_changes_the_learning_rate_with_two_ranks():
    """A hook between backward and step makes every rank's step wait for its backward; the ranks see no gradients
    (each holds a shard) but the learning rate set in the hook is the one each rank's updates use."""
    from tests.core.test_user_code import _LrZeroOnOddSteps

    options = dict(gradient_clip_val=None, accumulate_grad_batches=1, max_steps=STEPS * ACCUMULATE)
    torch.manual_seed(123)
    reference = train("auto", devices=1, module=_LrZeroOnOddSteps("llama", initial_state("llama")), **options)
    strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=HOST, start_method="spawn")
    torch.manual_seed(123)
    ours = train(strategy, devices=2, module=_LrZeroOnOddSteps("llama", initial_state("llama")), **options)
    assert_same_weights(ours, reference)
