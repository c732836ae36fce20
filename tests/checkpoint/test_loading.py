"""Slideformer checkpoint directories where Lightning users load them: ``lightning_slide.load_from_checkpoint``
(the module Lightning's ``load_from_checkpoint`` gives from an equivalent single-file checkpoint),
``trainer.validate/test/predict(ckpt_path=...)`` with the strategy, a plain Lightning strategy reading them through
``SlideCheckpointIO``, and the converter to a single-file Lightning checkpoint."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

import lightning_slide
from lightning_slide import checkpoint as slide_checkpoint
from tests.core.tiny import CONFIGS, TinyLM, batches, initial_state, trainer


class HParamLM(TinyLM):
    """A user's module with saved hyperparameters and an ``on_load_checkpoint`` hook."""

    def __init__(self, family: str = "qwen3", lr: float = 3e-3, note: str = "first") -> None:
        super().__init__(family, initial_state(family), lr=lr)
        self.save_hyperparameters()
        self.hook_saw = None

    def on_load_checkpoint(self, checkpoint):
        self.hook_saw = (checkpoint["global_step"], len(checkpoint["state_dict"]))

    def test_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("test_loss", loss)

    def predict_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids).logits


def slide(**options) -> lightning_slide.SlideFormerStrategy:
    return lightning_slide.SlideFormerStrategy(window=1, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A slideformer run's checkpoint directory, the trained module and a plain single-file checkpoint of the same
    weights saved by Lightning itself (no lightning-slide code involved)."""
    tmp = tmp_path_factory.mktemp("trained")
    module = HParamLM(lr=2e-3, note="trained")
    run = trainer(slide(), max_steps=3)
    run.fit(module, batches(6))
    run.save_checkpoint(tmp / "slide.ckpt")
    assert (tmp / "slide.ckpt").is_dir()
    plain = trainer("auto")
    plain.validate(module, batches(1), verbose=False)  # attaches the module to a plain Trainer, to save it
    plain.save_checkpoint(tmp / "plain.ckpt")
    assert (tmp / "plain.ckpt").is_file()
    return tmp, module


def assert_same_weights(ours: nn.Module, theirs: nn.Module) -> None:
    theirs_state = theirs.state_dict()
    assert ours.state_dict().keys() == theirs_state.keys()
    for name, value in ours.state_dict().items():
        assert value.dtype == theirs_state[name].dtype and torch.equal(value, theirs_state[name]), name


def test_load_from_checkpoint_gives_what_lightning_gives_from_a_plain_checkpoint(trained):
    tmp, fitted = trained
    ours = lightning_slide.load_from_checkpoint(HParamLM, tmp / "slide.ckpt", note="override")
    theirs = HParamLM.load_from_checkpoint(tmp / "plain.ckpt", note="override")
    assert type(ours) is HParamLM
    assert dict(ours.hparams) == dict(theirs.hparams) == {"family": "qwen3", "lr": 2e-3, "note": "override"}
    assert ours.lr == 2e-3 and ours.hook_saw == (3, len(fitted.state_dict()))  # saved after 3 steps
    assert theirs.hook_saw == (0, len(fitted.state_dict()))  # saved by a Trainer that only validated
    assert ours.training == theirs.training and ours.device == theirs.device
    assert_same_weights(ours, theirs)
    assert_same_weights(ours, fitted)  # the trained fp32 masters themselves
    untrained = HParamLM()
    assert not torch.equal(ours.model.lm_head.weight, untrained.model.lm_head.weight)
    # A file goes to Lightning's own loading; map_location and hparams_file as in Lightning
    assert_same_weights(lightning_slide.load_from_checkpoint(HParamLM, tmp / "plain.ckpt"), theirs)
    on_host = lightning_slide.load_from_checkpoint(HParamLM, tmp / "slide.ckpt", map_location=lambda s, loc: s)
    assert on_host.device == torch.device("cpu")
    (tmp / "hparams.yaml").write_text(yaml.safe_dump({"family": "qwen3", "lr": 0.5}))
    from_file = lightning_slide.load_from_checkpoint(HParamLM, tmp / "slide.ckpt", hparams_file=tmp / "hparams.yaml")
    assert from_file.lr == 0.5 and from_file.hparams.note == "first"  # the file replaces the saved hyperparameters
    assert_same_weights(from_file, theirs)


class Extra(HParamLM):
    """Its ``on_load_checkpoint`` changes the checkpoint's state dict (it must be an ordinary, mutable dict)."""

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint["state_dict"]
        state["model.lm_head.weight"] = state["model.lm_head.weight"] * 2  # e.g. a user's migration of old names
        state["unexpected"] = torch.zeros(1)


def test_strict_and_hooks_that_edit_the_state_dict_behave_as_in_lightning(trained):
    tmp, fitted = trained
    errors = []
    for load in (
        lambda **kw: lightning_slide.load_from_checkpoint(Extra, tmp / "slide.ckpt", **kw),
        lambda **kw: Extra.load_from_checkpoint(tmp / "plain.ckpt", **kw),
    ):
        with pytest.raises(RuntimeError, match="Unexpected key.*unexpected") as caught:
            load()
        errors.append(str(caught.value))
        with pytest.warns(UserWarning, match="not in the model state dict.*unexpected"):
            module = load(strict=False)
        assert torch.equal(module.model.lm_head.weight, 2 * fitted.model.lm_head.weight)
    assert errors[0] == errors[1]


class Configured(TinyLM):
    """Builds its model in ``configure_model``, as Lightning recommends for large models."""

    def __init__(self, family: str = "qwen3") -> None:
        super(TinyLM, self).__init__()
        self.save_hyperparameters()
        self.model, self.losses, self.optimizer_name, self.lr, self.warmup = None, [], "adamw", 3e-3, 4

    def configure_model(self):
        if self.model is None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_config(CONFIGS[self.hparams.family]())
            self.model.load_state_dict(initial_state(self.hparams.family))


def test_configure_model_runs_before_the_weights_are_loaded(tmp_path):
    module = Configured()
    run = trainer(slide(), max_steps=2)
    run.fit(module, batches(4))
    run.save_checkpoint(tmp_path / "slide.ckpt")
    loaded = lightning_slide.load_from_checkpoint(Configured, tmp_path / "slide.ckpt")
    assert_same_weights(loaded, module)


def test_validate_test_predict_with_ckpt_path_equal_plain_lightning(trained):
    tmp, _ = trained
    data = batches(3, seed=7)
    reference = HParamLM.load_from_checkpoint(tmp / "plain.ckpt")
    plain = trainer("auto")
    expected = (
        plain.validate(reference, data, verbose=False)[0]["val_loss"],
        plain.test(reference, data, verbose=False)[0]["test_loss"],
        torch.cat(plain.predict(reference, data)),
    )
    untrained = trainer("auto").validate(HParamLM(), data, verbose=False)[0]["val_loss"]
    assert untrained != pytest.approx(expected[0])  # so that equal losses show the trained weights were loaded

    ckpt = tmp / "slide.ckpt"
    run = trainer(slide())
    module = HParamLM()
    ours = (
        run.validate(module, data, ckpt_path=ckpt, verbose=False)[0]["val_loss"],
        run.test(module, data, ckpt_path=ckpt, verbose=False)[0]["test_loss"],
        torch.cat(run.predict(module, data, ckpt_path=ckpt)),
    )
    assert ours[0] == pytest.approx(expected[0], rel=1e-6) and ours[1] == pytest.approx(expected[1], rel=1e-6)
    torch.testing.assert_close(ours[2], expected[2], rtol=1e-5, atol=1e-6)
    assert module.hook_saw == (3, len(reference.state_dict()))  # on_load_checkpoint ran under slideformer too

    # A plain Lightning strategy cannot open a directory; with SlideCheckpointIO it reads it like a file.
    with pytest.raises(IsADirectoryError):
        trainer("auto").validate(HParamLM(), data, ckpt_path=ckpt, verbose=False)
    plain = trainer("auto", plugins=[lightning_slide.SlideCheckpointIO()])
    assert plain.validate(HParamLM(), data, ckpt_path=ckpt, verbose=False)[0]["val_loss"] == expected[0]
    assert plain.test(HParamLM(), data, ckpt_path=ckpt, verbose=False)[0]["test_loss"] == expected[1]
    assert torch.equal(torch.cat(plain.predict(HParamLM(), data, ckpt_path=ckpt)), expected[2])


def test_converter_writes_a_single_file_lightning_checkpoint(trained):
    tmp, fitted = trained
    slide_checkpoint._main([str(tmp / "slide.ckpt"), str(tmp / "converted.ckpt"), "--lightning"])
    theirs = HParamLM.load_from_checkpoint(tmp / "converted.ckpt")
    assert_same_weights(theirs, fitted)
    assert theirs.hparams.note == "trained"
    data = torch.load(tmp / "converted.ckpt", weights_only=False)
    assert data["global_step"] == 3 and len(data["optimizer_states"][0]["state"]) == len(list(fitted.parameters()))
    weights = slide_checkpoint.checkpoint_to_lightning(tmp / "slide.ckpt", tmp / "weights.ckpt", weights_only=True)
    assert "optimizer_states" not in torch.load(weights, weights_only=False)


def test_plain_lightning_resumes_training_from_a_slideformer_checkpoint(tmp_path):
    """The optimizer state comes back in torch's layout: plain Lightning continues as slideformer does."""
    first = trainer(slide(), max_steps=2, max_epochs=-1)  # one optimizer step per epoch: exact resume
    first.fit(HParamLM(), batches(2))
    first.save_checkpoint(tmp_path / "step2.ckpt")
    resumed, runs = {}, {}
    for name, strategy, plugins in (("plain", "auto", [lightning_slide.SlideCheckpointIO()]), ("slide", slide(), [])):
        module = HParamLM()
        run = trainer(strategy, max_steps=4, max_epochs=-1, plugins=plugins)
        run.fit(module, batches(2), ckpt_path=tmp_path / "step2.ckpt")
        resumed[name], runs[name] = module, run
    plain, ours = resumed["plain"], resumed["slide"]
    steps = {float(state["step"]) for state in runs["plain"].optimizers[0].state_dict()["state"].values()}
    assert steps == {
        runs["plain"].global_step
    }  # the restored step counts went on: Adam's moments were restored, not restarted
    assert len(plain.losses) == len(ours.losses) > 0
    for a, b in zip(plain.losses, ours.losses):
        assert a == pytest.approx(b, rel=1e-5)
    theirs = dict(ours.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param, theirs[name], rtol=1e-5, atol=1e-7)


def test_state_dicts_are_mapped_from_the_files_not_copied(trained):
    tmp, fitted = trained
    state = slide_checkpoint.CheckpointReader(tmp / "slide.ckpt").state_dict()
    layer = tmp / "slide.ckpt" / "model" / "layer-00001.safetensors"
    tensor = state["model.model.layers.1.mlp.up_proj.weight"]
    assert tensor.untyped_storage().nbytes() == layer.stat().st_size  # a view of the file mapped into memory
    assert torch.equal(tensor, fitted.model.model.layers[1].mlp.up_proj.weight)
    before = layer.read_bytes()
    tensor.add_(1)  # copy-on-write: a hook changing the state dict never changes the checkpoint
    assert layer.read_bytes() == before
