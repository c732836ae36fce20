"""A checkpoint's index.json is checked: a malformed one is refused naming the file and what is wrong; one whose
optimizer records disagree with the metadata or the files is refused for resuming training (fresh Adam moments
without a word), while its weights still load for validation."""

from __future__ import annotations

import json
import shutil

import pytest

import lightning_slide
from lightning_slide.checkpoint import INDEX
from tests.core.tiny import TinyLM, batches, initial_state, trainer


def slide() -> lightning_slide.SlideFormerStrategy:
    return lightning_slide.SlideFormerStrategy(window=1)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A complete checkpoint after 2 steps, and the validation loss of its weights."""
    tmp = tmp_path_factory.mktemp("index")
    module = TinyLM("llama", initial_state("llama"))
    run = trainer(slide(), max_steps=2, max_epochs=-1)
    run.fit(module, batches(2))
    run.save_checkpoint(tmp / "good.ckpt")
    loss = run.validate(module, batches(2, seed=5), verbose=False)[0]["val_loss"]
    return tmp / "good.ckpt", loss


def edited(good, tmp_path, edit) -> tuple:
    """A copy of the good checkpoint whose parsed index went through ``edit`` (or whose text is ``edit``)."""
    path = tmp_path / "edited.ckpt"
    shutil.copytree(good, path)
    if isinstance(edit, str):
        (path / INDEX).write_text(edit)
    else:
        index = json.loads((path / INDEX).read_text())
        edit(index)
        (path / INDEX).write_text(json.dumps(index))
    return path


def validate(path):
    return trainer(slide()).validate(
        TinyLM("llama", initial_state("llama")), batches(2, seed=5), ckpt_path=path, verbose=False
    )[0]["val_loss"]


def resume(path, strategy=None, **kwargs):
    run = trainer(strategy or slide(), max_steps=4, max_epochs=-1, **kwargs)
    run.fit(TinyLM("llama", initial_state("llama")), batches(2), ckpt_path=path)


def _drop(key):
    return lambda index: index.pop(key)


def _set(key, value):
    return lambda index: index.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, problem",
    [
        ('{"format": "lightning-slide-checkpoint", "version": 1, "units": [', "not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (_drop("files"), "key 'files' is missing"),
        (_drop("units"), "key 'units' is missing"),
        (_set("units", "resident"), "'units' is a str, not a list"),
        (_set("units", ["resident", 3]), r"'units' holds \[3\]"),
        (_set("optimizer", "yes"), "'optimizer' is a str, not a bool"),
        (_set("files", []), "'files' is a list, not a dict"),
        (lambda index: index["files"].update({"model/resident.safetensors": "12"}), "size of '12'"),
        (lambda index: index["files"].update({"../elsewhere": 3}), "outside the checkpoint directory"),
        (lambda index: index["files"].pop("model/layer-00002.safetensors"), "does not list.*layer-00002"),
        (_set("aliases", ["a"]), "'aliases' must map"),
        (_set("version", "1"), "'version' is '1'"),
        (_set("format", "other"), "format is 'other'"),
    ],
)
def test_a_malformed_index_is_refused_naming_the_file_and_the_problem(good, tmp_path, edit, problem):
    path = edited(good[0], tmp_path, edit)
    with pytest.raises(ValueError, match=rf"(?s)index '{path / INDEX}' is malformed: .*{problem}"):
        validate(path)


def test_a_newer_format_asks_for_an_upgrade(good, tmp_path):
    path = edited(good[0], tmp_path, _set("version", 99))
    with pytest.raises(ValueError, match="newer lightning-slide .* upgrade lightning-slide"):
        validate(path)


def _forget_optimizer(index):
    index["optimizer"] = False


def _forget_one_layer(index):
    index["files"].pop("optimizer/layer-00001.safetensors")


def _forget_all_files(index):
    for rel in [r for r in index["files"] if r.startswith("optimizer/")]:
        index["files"].pop(rel)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (_forget_optimizer, "its metadata records an optimizer .* says no optimizer state was saved"),
        (_forget_all_files, "index.json says optimizer state was saved but lists no optimizer/ file"),
        (_forget_one_layer, r"its optimizer files hold no state for \['model.model.layers.1"),
    ],
)
def test_an_index_that_lost_the_optimizer_is_refused_for_resuming_but_its_weights_load(good, tmp_path, edit, problem):
    path = edited(good[0], tmp_path, edit)
    with pytest.raises(ValueError, match=rf"(?s)checkpoint '{path}' cannot resume training: {problem}.*fresh Adam"):
        resume(path)
    assert validate(path) == pytest.approx(good[1], rel=1e-6)  # weights only: allowed, as Lightning allows it


@pytest.mark.parametrize(
    "edit, problem",
    [
        (_forget_optimizer, "its metadata records an optimizer"),
        (_forget_one_layer, "its optimizer files hold no state for 9 parameters"),
    ],
)
def test_a_plain_strategy_leaves_contradicted_optimizer_state_out(good, tmp_path, edit, problem):
    path = edited(good[0], tmp_path, edit)
    with pytest.warns(UserWarning, match=f"optimizer state left out: {problem}"):
        with pytest.raises(KeyError, match="contains only the model"):  # Lightning's refusal to resume
            resume(path, "auto", plugins=[lightning_slide.SlideCheckpointIO()])


def test_the_intact_checkpoint_resumes_with_either_strategy(good):
    resume(good[0])
    resume(good[0], "auto", plugins=[lightning_slide.SlideCheckpointIO()])
