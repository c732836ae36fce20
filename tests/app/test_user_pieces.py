"""Your own pieces from the command line: any LightningModule, DataModule, callback and Lightning logger."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_slide.app.errors import SlideAppError
from lightning_slide.app.train import setup, train

from .conftest import FAST, compose_cfg
from .user_pieces import VOCAB

ROOT = Path(__file__).parents[2]
OWN = [
    "model._target_=tests.app.user_pieces.CountingLM",
    "data._target_=tests.app.user_pieces.CountingData",
    "monitor=val_loss",
]


def test_own_module_data_and_callback(tmp_path):
    early = "+callbacks.early_stop={_target_:lightning.pytorch.callbacks.EarlyStopping,monitor:val_loss,patience:9}"
    result = train(
        compose_cfg(
            *FAST,
            *OWN,
            "model.lr=3e-3",
            "+model.hidden=48",
            "data.batch_size=4",
            "+data.seq=12",
            early,
            "trainer.val_check_interval=2",
            output_dir=tmp_path,
        )
    )
    module, trainer = result["module"], result["trainer"]
    # the app's options that your pieces share (lr, batch_size) reach them, their own (hidden, seq) come with +
    assert module.hparams.lr == 3e-3 and module.model.config.hidden_size == 48
    assert trainer.global_step == 4 and any(type(c).__name__ == "EarlyStopping" for c in trainer.callbacks)
    assert result["metric"] < result["metric_before"]  # val_loss, as monitor says
    assert result["summary"].tokens == 4 * 4 * 12  # the batches' attention masks
    # a Hugging Face model at .model is exported (without a tokenizer: the module has none)
    exported = AutoModelForCausalLM.from_pretrained(result["hf_dir"]).state_dict()
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, exported[name]), name


def test_export_only_when_the_module_has_a_hugging_face_model(tmp_path):
    # The network at .net: nothing to export; the monitored metric may be a training one.
    result = train(
        compose_cfg(
            *FAST,
            *OWN,
            "+model.hf_attribute=net",
            "monitor=train_loss",
            "trainer.limit_val_batches=0",
            output_dir=tmp_path,
        )
    )
    assert result["hf_dir"] is None and not (tmp_path / "hf_model").exists()
    assert result["metric_before"] is None and result["metric"] == pytest.approx(
        float(result["trainer"].callback_metrics["train_loss"])
    )


def test_the_app_module_with_your_data(tmp_path):
    """The app's module takes a data module of yours: it is given no tokenizer it does not ask for."""
    result = train(
        compose_cfg(
            *FAST,
            "data._target_=tests.app.user_pieces.CountingData",
            "sample_tokens=0",
            "model.config.hidden_size=32",
            output_dir=tmp_path,
        )
    )
    assert result["trainer"].global_step == 4 and result["metric"] is not None  # the app's val/loss
    assert result["module"].model.config.vocab_size >= VOCAB


def test_mistakes_with_own_pieces_are_named(tmp_path):
    with pytest.raises(SlideAppError, match=r"model._target_=nopkg.Module: cannot import it"):
        train(compose_cfg(*OWN, "model._target_=nopkg.Module", output_dir=tmp_path))
    with pytest.raises(SlideAppError, match=r"kernels=all: tests.app.user_pieces.CountingLM takes no kernels"):
        train(compose_cfg(*OWN, "kernels=all", output_dir=tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_several_loggers(tmp_path):
    _, _, trainer, _ = setup(compose_cfg(*OWN, "logger=[csv,tensorboard]", output_dir=tmp_path))
    assert [type(logger).__name__ for logger in trainer.loggers] == ["CSVLogger", "TensorBoardLogger"]


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_logger_without_its_package_names_the_extra(name, tmp_path):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    with pytest.raises(
        SlideAppError,
        match=rf"logger={name} needs a package that is not installed .*"
        rf'pip install "lightning-slide\[{name}\]"',
    ):
        setup(compose_cfg(*OWN, f"logger={name}", output_dir=tmp_path))


def test_a_sweep_gets_the_monitored_metric(tmp_path):
    """``slide-train --multirun``: each run returns its monitored metric to Hydra (here to a Hydra callback that
    records what a sweeper would compare)."""
    record = tmp_path / "returns.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_slide",
            "--multirun",
            *FAST,
            *OWN,
            "model.lr=1e-2,1e-3",
            "export.enabled=false",
            f"+hydra.callbacks.record={{_target_:tests.app.user_pieces.RecordReturns,path:{record}}}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    values = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(values) == 2 and all(isinstance(v, float) for v in values), values
    assert (tmp_path / "sweep" / "0" / "checkpoints").is_dir() and (tmp_path / "sweep" / "1" / "csv").is_dir()
