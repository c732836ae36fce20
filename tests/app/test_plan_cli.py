"""``slide-plan``: the planner from the app's config and overrides, without weights."""

import json

from transformers import LlamaConfig

from lightning_slide.app.plan import main


def test_slide_plan_default_demo_fits(capsys):
    assert main(["plan.gpu_memory=1GiB"]) == 0
    out = capsys.readouterr().out
    for text in ("-- GPU (peak)", "window slots", "-- host (peak)", "fp32 masters", "<- binds", "largest batch at window 2"):
        assert text in out, out


def test_slide_plan_with_overrides_and_json(tmp_path, capsys):
    # A model directory with only config.json: the plan never reads weights.
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072).save_pretrained(tmp_path)
    target = tmp_path / "plan.json"
    status = main(["model=llama3_8b", f"model.path={tmp_path}", "strategy.window=3", "strategy.gpu_memory_limit=24GiB",
                   "data.batch_size=2", "data.max_length=4096", "kernels=all", "plan.host_memory=512GiB",
                   "plan.adamw=4e9", f"plan.json={target}"])
    out = capsys.readouterr().out
    assert status == 0, out
    plan = json.loads(target.read_text())
    assert plan["settings"]["window"] == 3 and plan["settings"]["batch"] == 2 and plan["settings"]["seq"] == 4096
    assert plan["machine"]["gpu_memory"] == 24 * 2**30 and plan["machine"]["host_adamw_params_per_s"] == 4e9
    assert plan["gpu_total"] <= 24 * 2**30 and plan["binding"] in plan["time"] and plan["suggested_batch"] >= 2
    assert "fused" in out and "8.03B parameters" in out

    # The same run on a 12 GiB card and 64 GiB of host memory does not fit: exit status 1 and what to change.
    status = main(["model=llama3_8b", f"model.path={tmp_path}", "plan.gpu_memory=12GiB", "plan.host_memory=64GiB",
                   "data.batch_size=8", "data.max_length=4096"])
    out = capsys.readouterr().out
    assert status == 1
    assert "does not fit: GPU: needs" in out and "host: needs" in out
    assert "lower the batch size (now 8" in out and "set offload_dir" in out


def test_clipping_by_value_is_planned_as_streaming(tmp_path, capsys):
    """Clipping by value lets updates stream out of the backward: no layer keeps its gradients until the step."""
    assert main(["plan.gpu_memory=1GiB", f"plan.json={tmp_path / 'norm.json'}"]) == 0
    assert "clipping by norm" in capsys.readouterr().out
    assert main(["plan.gpu_memory=1GiB", "trainer.gradient_clip_algorithm=value", f"plan.json={tmp_path / 'value.json'}"]) == 0
    assert "clipping by value" in capsys.readouterr().out
    planned = [json.loads((tmp_path / f"{how}.json").read_text())["settings"]["clipping"] for how in ("norm", "value")]
    assert planned == [True, False]


def test_slide_plan_errors(tmp_path, capsys):
    assert main(["strategy.windw=3"]) == 2
    assert "Could not override 'strategy.windw'" in capsys.readouterr().err
    assert main(["model=llama3_8b", f"model.path={tmp_path}"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "plan.gpu_memory" in capsys.readouterr().out


def test_slide_plan_per_rank_with_several_devices(tmp_path, capsys):
    """With trainer.devices=2 the host items are one rank's: half the Adam moments and gradient buffers, and its
    share of the masters."""
    host, out = {}, {}
    for devices in (1, 2):
        target = tmp_path / f"plan{devices}.json"
        assert main(["plan.gpu_memory=1GiB", f"trainer.devices={devices}", f"plan.json={target}"]) == 0
        out[devices] = capsys.readouterr().out
        plan = json.loads(target.read_text())
        assert plan["settings"]["ranks"] == devices
        host[devices] = plan["host"]
    assert "2 ranks (memory per rank" in out[2] and "ranks" not in out[1].splitlines()[0]
    moments = next(k for k in host[1] if k.startswith("Adam moments"))
    assert abs(host[2][moments] - host[1][moments] / 2) <= 8
    masters = next(k for k in host[1] if k.startswith("fp32 masters"))
    # The two ranks of one host share one copy of the masters (the resident parts, updated on the device, are
    # replicated: a copy each).
    assert plan["settings"]["masters_shared_by"] == 2
    assert host[1][masters] / 2 <= host[2][masters] < host[1][masters]
