"""``slide-plan``: the planner from the app's config and overrides, without weights."""

import json

import pytest
import torch
from transformers import LlamaConfig

from lightning_slide.app.plan import compose_config, main


def test_slide_plan_default_demo_fits(capsys):
    assert main(["plan.gpu_memory=1GiB"]) == 0
    out = capsys.readouterr().out
    for text in (
        "-- GPU (peak)",
        "window slots",
        "-- host (peak)",
        "fp32 masters",
        "<- binds",
        "largest batch at window 2",
    ):
        assert text in out, out


def test_slide_plan_with_overrides_and_json(tmp_path, capsys):
    # A model directory with only config.json: the plan never reads weights.
    LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
    ).save_pretrained(tmp_path)
    target = tmp_path / "plan.json"
    status = main(
        [
            "model=llama3_8b",
            f"model.path={tmp_path}",
            "strategy.window=3",
            "strategy.gpu_memory_limit=24GiB",
            "data.batch_size=2",
            "data.max_length=4096",
            "kernels=all",
            "plan.host_memory=512GiB",
            "plan.adamw=4e9",
            f"plan.json={target}",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    plan = json.loads(target.read_text())
    assert plan["settings"]["window"] == 3 and plan["settings"]["batch"] == 2 and plan["settings"]["seq"] == 4096
    assert plan["machine"]["gpu_memory"] == 24 * 2**30 and plan["machine"]["host_adamw_params_per_s"] == 4e9
    assert plan["gpu_total"] <= 24 * 2**30 and plan["binding"] in plan["time"] and plan["suggested_batch"] >= 2
    assert "fused" in out and "8.03B parameters" in out

    # The same run on a 12 GiB card and 64 GiB of host memory does not fit: exit status 1 and what to change.
    status = main(
        [
            "model=llama3_8b",
            f"model.path={tmp_path}",
            "plan.gpu_memory=12GiB",
            "plan.host_memory=64GiB",
            "data.batch_size=8",
            "data.max_length=4096",
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "does not fit: GPU: needs" in out and "host: needs" in out
    assert "lower the batch size (now 8" in out and "set offload_dir" in out


def test_clipping_by_value_is_planned_as_streaming(tmp_path, capsys):
    """Clipping by value lets updates stream out of the backward: no layer keeps its gradients until the step."""
    assert main(["plan.gpu_memory=1GiB", f"plan.json={tmp_path / 'norm.json'}"]) == 0
    assert "clipping by norm" in capsys.readouterr().out
    assert (
        main(["plan.gpu_memory=1GiB", "trainer.gradient_clip_algorithm=value", f"plan.json={tmp_path / 'value.json'}"])
        == 0
    )
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
        overrides = ["plan.gpu_memory=1GiB", f"trainer.devices={devices}", f"plan.json={target}"]
        # no layer kept on the GPU with one rank either (devices=2 keeps none): the host items compare alike
        assert main([*overrides, "strategy.tuning.device_layers=0"]) == 0
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


# Parameter counts of the model cards (Qwen3's are rounded there to 0.1B; 0.6B is 596M).
CARD_PARAMS = {
    "llama3_1b": "1.24B",
    "llama3_3b": "3.21B",
    "llama3_8b": "8.03B",
    "llama3_70b": "70.6B",
    "qwen3_0_6b": "596M",
    "qwen3_1_7b": "1.72B",
    "qwen3_4b": "4.02B",
    "qwen3_8b": "8.19B",
    "qwen3_14b": "14.8B",
    "qwen3_32b": "32.8B",
    "mistral_7b": "7.24B",
}


@pytest.mark.parametrize("name", sorted(CARD_PARAMS))
def test_plan_from_the_shape_config_alone(name, tmp_path, capsys):
    """``slide-plan model=llama3_8b``: the shape the config records is the model's, no directory needed."""
    target = tmp_path / "plan.json"
    status = main([f"model={name}", "plan.gpu_memory=80GiB", "plan.host_memory=4TiB", f"plan.json={target}"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"slide-plan: {CARD_PARAMS[name]} parameters" in out and "no model directory was read" in out
    cfg = compose_config([f"model={name}"])
    assert json.loads(target.read_text())["shape"]["layers"] == cfg.model.expect.num_hidden_layers


def test_a_model_directory_must_match_the_whole_shape(tmp_path, capsys):
    # Llama-3.1-8B in every field but the vocabulary: another model (or a resized one), not llama3_8b.
    LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ).save_pretrained(tmp_path)
    assert main(["model=llama3_8b", f"model.path={tmp_path}", "plan.gpu_memory=24GiB"]) == 2
    assert "'vocab_size': 128256" in capsys.readouterr().err
    assert (
        main(
            [
                "model=llama3_8b",
                f"model.path={tmp_path}",
                "model.expect.vocab_size=32000",
                "plan.gpu_memory=24GiB",
                "plan.host_memory=1TiB",
            ]
        )
        == 0
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans the CPU run of a machine without a GPU")
def test_without_a_gpu_the_cpu_run_is_planned(tmp_path, capsys):
    """As ``slide-train`` trains on the CPU here, ``slide-plan`` plans that run; a GPU size plans a GPU run."""
    here, gpu = tmp_path / "here.json", tmp_path / "gpu.json"
    assert main(["model=qwen3_0_6b", "plan.host_memory=1TiB", f"plan.json={here}"]) == 0
    out = capsys.readouterr().out
    assert "on the CPU" in out.splitlines()[0] and "no GPU here: this is the CPU run" in out
    plan = json.loads(here.read_text())
    assert plan["settings"]["device"] == "cpu" and plan["problems"] == []
    assert any(k.startswith("compute-device buffers (the device is the CPU)") for k in plan["host"])

    assert main(["model=qwen3_0_6b", "plan.host_memory=1TiB", "plan.gpu_memory=24GiB", f"plan.json={gpu}"]) == 0
    plan = json.loads(gpu.read_text())
    assert "on the CPU" not in capsys.readouterr().out.splitlines()[0]
    # the default precision is the GPU's (bf16), whatever this CPU would compute in
    assert plan["settings"]["device"] == "cuda" and plan["settings"]["compute_dtype"] == "torch.bfloat16"

    assert main(["model=qwen3_0_6b", "trainer=cpu", "plan.gpu_memory=24GiB", f"plan.json={gpu}"]) == 0
    plan = json.loads(gpu.read_text())
    assert plan["settings"]["device"] == "cpu" and plan["settings"]["compute_dtype"] == "torch.float32"


def test_plan_of_your_own_module(tmp_path, capsys):
    """``model._target_=...``: your module is built as slide-train builds it, on the meta device, and planned."""
    from .user_pieces import CountingLM

    target = tmp_path / "plan.json"
    own = ["model._target_=tests.app.user_pieces.CountingLM", "+model.hidden=64"]
    assert main([*own, "plan.gpu_memory=1GiB", f"plan.json={target}"]) == 0
    shape = json.loads(target.read_text())["shape"]
    n = sum(p.numel() for p in CountingLM(hidden=64).parameters())
    assert shape["layers"] == 2 and shape["hidden"] == 64 and shape["vocab"] == 64
    assert shape["layers"] * shape["layer_params"] + shape["resident_params"] == n
    capsys.readouterr()
    assert main(["model._target_=nopkg.Module"]) == 2
    assert "model._target_=nopkg.Module: cannot import it (No module named 'nopkg')" in capsys.readouterr().err


def test_slide_plan_counts_bf16_moments(capsys):
    assert main(["plan.gpu_memory=1GiB", "model.moments=bf16"]) == 0
    out = capsys.readouterr().out
    assert "Adam moments (bf16)" in out and "Adam moments (fp32)" not in out, out
