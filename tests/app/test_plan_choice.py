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
    # slide-train loads the model whole before the strategy splits it: a bf16 checkpoint of this shape fits there
    loading = json.loads(target.read_text())["host_at_setup"]
    assert 2 * (70.5e9 if model == "llama3_70b" else 32.7e9) <= loading <= 0.6 * 256 * 2**30
    assert "loading:" not in out and "a bf16 checkpoint assumed" in out


def test_loading_the_model_is_planned_from_its_files(tiny_model_dir, tmp_path, capsys):
    from lightning_slide.app.loading import stored_bytes, weight_files
    from lightning_slide.engine.plan import RUNTIME_HOST_BYTES

    plan = plan_from_config(
        compose_config(["model=causal_lm", f"model.path={tiny_model_dir}", "plan.host_memory=8GiB"])
    )
    stored = stored_bytes(weight_files(tiny_model_dir))  # bf16 shards: 2 bytes a parameter
    assert plan.host_at_setup == RUNTIME_HOST_BYTES[plan.settings.device] + stored
    assert 2 * plan.shape.params == stored
    # A host that holds the run but not the model as it loads: no option helps, and it says so
    assert main(["model=llama3_70b", "plan.gpu_memory=24GiB", "plan.host_memory=120GiB", "plan.disk_free=2TB"]) == 1
    out = capsys.readouterr().out
    assert "loading: the model as loaded needs 134.42 GiB of host memory, more than the 120.00 GiB" in out
    assert "loaded whole before the strategy splits it, whatever the options" in out


def test_the_options_that_fit_do_not_hide_a_model_too_large_to_load():
    plan, _ = chosen("plan.host_memory=96GiB", "plan.disk_free=1TB")
    assert plan.fitting is not None and not [p for p in plan.problems() if p.startswith("loading")]
    plan.host_at_setup = 97 * 2**30
    assert plan.problems()[-1].startswith("loading: the model as loaded needs 97.00 GiB")
    assert "but none of them changes what loading the model needs" in plan.table()
