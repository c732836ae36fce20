"""GradNormMonitor logs the gradient norm plain Lightning has at each step; under slideformer it holds no update
back."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

import lightning_slide
from lightning_slide import GradNormMonitor
from tests.core.test_parking import slow_host  # noqa: F401 - a fixture
from tests.core.tiny import TinyLM, batches, initial_state, trainer


class Recorder(Logger):
    """A logger that keeps what it is given: {metric: {step: value}}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = float(value)


class _LogsLoss(TinyLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


class _Streamed(L.Callback):
    """Whether each step's updates streamed out of its backward (read after the step, observing nothing)."""

    def __init__(self) -> None:
        self.streamed = 0

    def on_train_end(self, trainer, module):
        self.streamed = trainer.strategy.engine.stats()["streamed_steps"]


def fit(strategy, *, steps=6, accumulate=1, clip=None, algorithm="norm", every=1, callbacks=()):
    torch.manual_seed(123)
    module = _LogsLoss("llama", initial_state("llama"))
    recorder = Recorder()
    run = trainer(
        strategy,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        logger=recorder,
        log_every_n_steps=every,
        callbacks=[GradNormMonitor(), *callbacks],
    )
    run.fit(module, batches(steps * accumulate))
    return recorder.metrics, module


CASES = {
    "streamed": (dict(), dict()),
    "accumulated, clipped by norm": (dict(), dict(accumulate=2, clip=0.5)),
    "accumulated": (dict(), dict(accumulate=2)),
    "clipped by norm": (dict(), dict(clip=0.05)),
    "clipped by value": (dict(), dict(clip=0.002, algorithm="value")),
    "a layer kept on the device": (dict(tuning=dict(device_layers=1)), dict()),
    "resident updated on the device": (dict(tuning=dict(resident_optimizer="device")), dict(accumulate=2)),
    "every other step logged": (dict(), dict(every=2, steps=7)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_logged_norm_is_plain_lightnings(case):
    options, run = CASES[case]
    plain, _ = fit("auto", **run)
    ours, module = fit(lightning_slide.SlideFormerStrategy(window=1, **options), **run)
    assert plain["grad_norm"].keys() == plain["train_loss"].keys()  # logged at the steps Lightning logs at
    assert ours["grad_norm"].keys() == plain["grad_norm"].keys() and len(plain["grad_norm"]) >= 3
    for step, norm in plain["grad_norm"].items():
        assert ours["grad_norm"][step] == pytest.approx(norm, rel=1e-5), step
    assert len(set(plain["grad_norm"].values())) == len(plain["grad_norm"])  # a norm of each step, not one


def test_updates_still_stream():
    """The monitor reads no gradient between backward and step: every step's updates stream out of its backward."""
    watch = _Streamed()
    fit(lightning_slide.SlideFormerStrategy(window=1), callbacks=[watch])
    assert watch.streamed == 6


def test_parked_layers_and_masters_on_disk(tmp_path, slow_host):  # noqa: F811 - the fixture
    """Layers whose gradients waited on the device, and fp32 masters read from files, are counted too."""
    plain, _ = fit("auto")
    parked, _ = fit(lightning_slide.SlideFormerStrategy(window=2, tuning=dict(grad_buffers=1, parked_grads=2)))
    on_disk, _ = fit(lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path), offload="both"))
    for ours in (parked, on_disk):
        assert ours["grad_norm"].keys() == plain["grad_norm"].keys()
        for step, norm in plain["grad_norm"].items():
            assert ours["grad_norm"][step] == pytest.approx(norm, rel=1e-5), step


@pytest.mark.parametrize("clip", [None, 0.05], ids=["streamed", "clipped by norm"])
def test_the_norm_leaves_out_parameters_the_optimizer_does_not_step(clip):
    """Like clipping, over the optimizer's parameters: trainable ones outside it (a layer's, the head) count under
    neither."""

    class _SomeOutsideTheOptimizer(_LogsLoss):
        def configure_optimizers(self):
            outside = ("lm_head", "layers.1.mlp.down_proj")
            return torch.optim.AdamW([p for n, p in self.named_parameters() if not any(o in n for o in outside)])

    norms = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1)):
        torch.manual_seed(123)
        module = _SomeOutsideTheOptimizer("llama", initial_state("llama"))
        recorder = Recorder()
        options = dict(max_steps=3, accumulate_grad_batches=1, gradient_clip_val=clip, log_every_n_steps=1)
        trainer(strategy, logger=recorder, callbacks=[GradNormMonitor()], **options).fit(module, batches(3))
        norms.append(recorder.metrics["grad_norm"])
    assert norms[1].keys() == norms[0].keys()
    for step, norm in norms[0].items():
        assert norms[1][step] == pytest.approx(norm, rel=1e-5), step


def test_strategies_that_shard_the_gradients_are_refused():
    """FSDP (which needs a GPU to build a Trainer: its strategy object stands in here) shards each .grad."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="GradNormMonitor reads each parameter's whole .grad, which FSDPStrategy"):
        GradNormMonitor().setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")
