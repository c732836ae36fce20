"""``slide-plan`` picks the options that fit a machine the run as given does not fit: where state lives first (training
unchanged), then what changes training a little, the fewest changes first, the fastest among equals."""

import json

import pytest

from lightning_slide.app.plan import compose_config, main, plan_from_config
from lightning_slide.engine.plan import fitting_options

EIGHT_B = ["model=llama3_8b", "plan.gpu_memory=24GiB", "data.max_length=1024", "data.batch_size=4", "kernels=all"]


def chosen(*overrides):
    plan = plan_from_config(compose_config([*EIGHT_B, *overrides]))
    return plan, fitting_options(plan.shape, plan.settings, plan.machine)


def test_a_run_that_fits_needs_no_choice():
    plan, choice = chosen("plan.host_memory=512GiB")
    assert not plan.problems() and plan.fitting is None
    assert choice is not None and choice.exact and choice.changes == {}  # the run as given is the fastest


def test_state_goes_to_disk_before_training_changes():
    plan, choice = chosen("plan.host_memory=96GiB", "plan.disk_free=1TB")
    assert plan.problems() and plan.fitting is not None
    assert choice.exact and "strategy.offload_dir=DIR" in choice.changes
    assert any(o.startswith("strategy.offload=") for o in choice.changes)
    assert not choice.plan.problems() and choice.plan.host_total <= 0.95 * 96 * 2**30


def test_without_room_on_disk_bf16_moments_and_clipping_by_value_are_proposed():
    plan, choice = chosen("plan.host_memory=96GiB", "plan.disk_free=10GB")
    assert not choice.exact
    assert {"model.moments=bf16", "trainer.gradient_clip_algorithm=value"} & set(choice.changes)
    assert choice.plan.disk_total <= 10e9


def test_nothing_fits(capsys):
    assert main([*EIGHT_B, "plan.host_memory=8GiB", "plan.disk_free=1GB"]) == 1
    assert "options that fit: none found" in capsys.readouterr().out


@pytest.mark.parametrize(("model", "host", "disk"), [("qwen3_32b", "256GiB", "2TB"), ("llama3_70b", "256GiB", "2TB")])
def test_large_models_on_a_big_host_get_a_plan(tmp_path, capsys, model, host, disk):
    target = tmp_path / "plan.json"
    args = [f"model={model}", "plan.gpu_memory=24GiB", f"plan.host_memory={host}", f"plan.disk_free={disk}"]
    status = main([*args, "data.max_length=1024", "data.batch_size=4", "kernels=all", f"plan.json={target}"])
    out = capsys.readouterr().out
    assert status == 1 and "-- options that fit" in out, out  # as given it does not fit; the options that do follow
    options = json.loads(target.read_text())["fitting_options"]
    assert options["host_total"] <= 0.95 * 256 * 2**30 and options["disk_total"] <= 0.95 * 2e12
    assert "strategy.offload=both" in options["overrides"]
    # The app loads the model whole in fp32 before the strategy splits it: 70.6B needs 4 bytes a parameter at setup
    loading = json.loads(target.read_text())["host_at_setup"]
    assert loading >= 4 * (70.5e9 if model == "llama3_70b" else 32.7e9)
    too_large = model == "llama3_70b"
    assert (loading > 256 * 2**30) == too_large
    assert ("what loading the model needs" in out) == too_large and ("loading: the model as loaded" in out) == too_large
