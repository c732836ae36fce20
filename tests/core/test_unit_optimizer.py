"""UnitOptimizer against torch.optim on the same parameters, and UpdateWorker beyond tests/core/test_worker.py."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from torch import nn

from lightning_slide import optim
from lightning_slide.engine.host import HostUnit
from lightning_slide.engine.optimizer import UnitOptimizer, check_optimizer, hyperparameters
from lightning_slide.engine.update_worker import UpdateWorker

STEPS = 5


def block() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 4))
    module[1].bias.requires_grad_(False)  # a frozen parameter in the middle of the unit
    return module


def groups(module: nn.Module) -> list[dict]:
    """Weight decay on matrices only, as users configure it."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if p.ndim == 2], "weight_decay": 0.1},
        {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def gradients(step: int, module: nn.Module) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=generator) * (step + 1) for p in module.parameters() if p.requires_grad]


class Pair:
    """The same block twice: ``plain`` stepped by torch's optimizer, ``ours`` held by a HostUnit and stepped by a
    UnitOptimizer built from a user optimizer over it."""

    def __init__(self, cls=torch.optim.AdamW, chunk=None, state_in_memory=True, **options) -> None:
        self.plain, ours = block(), block()
        self.reference = cls(groups(self.plain), lr=1e-2, betas=(0.9, 0.95), **options)
        self.user = cls(groups(ours), lr=1e-2, betas=(0.9, 0.95), **options)
        group_of = {id(p): g for g, group in enumerate(self.user.param_groups) for p in group["params"]}
        self.unit = HostUnit("layer 0", list(ours.named_parameters()))
        self.ours = ours
        self.optimizer = UnitOptimizer(self.unit, self.user, group_of, chunk=chunk, state_in_memory=state_in_memory)

    def set_grads(self, step: int) -> list[torch.Tensor]:
        grads = gradients(step, self.plain)
        trainable = [p for p in self.plain.parameters() if p.requires_grad]
        for param, grad in zip(trainable, grads):
            param.grad = grad.clone()
        for entry, grad in zip(self.unit.trainable, grads):  # the unit's flat accumulator, same layout
            entry.view(self.unit.grad).copy_(grad)
        return grads

    def lr_schedule(self, step: int) -> None:  # a scheduler changes the user's groups between steps
        for optimizer in (self.reference, self.user):
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 / (step + 1)

    def assert_close(self, tolerance: float = 1e-6) -> None:
        for (name, a), b in zip(self.ours.named_parameters(), self.plain.parameters()):
            error = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_several_steps_equal_torch_with_weight_decay_groups_and_a_frozen_parameter(cls):
    pair = Pair(cls, weight_decay=0.1)
    frozen = pair.ours[1].bias.detach().clone()
    for step in range(STEPS):
        pair.lr_schedule(step)
        pair.set_grads(step)
        pair.reference.step()
        pair.optimizer.step(hyperparameters(pair.user.param_groups), None, None)
        pair.assert_close()
    assert torch.equal(pair.ours[1].bias.detach(), frozen)
    assert not torch.equal(pair.ours[0].weight.detach(), block()[0].weight.detach())  # it trained


def test_a_parameter_in_no_group_is_not_updated():
    # torch does not update a parameter its optimizer was not given; neither does the host.
    plain = block()
    user = torch.optim.AdamW([plain[0].weight], lr=0.1)
    unit = HostUnit("layer 0", list(plain.named_parameters()))
    optimizer = UnitOptimizer(unit, user, {id(plain[0].weight): 0})
    before = plain[2].weight.detach().clone()
    unit.grad.fill_(1.0)
    optimizer.step(hyperparameters(user.param_groups), None, None)
    assert torch.equal(plain[2].weight.detach(), before)
    assert not optimizer.steps_whole_gradient


def test_state_of_matches_torchs_per_parameter_state():
    pair = Pair(weight_decay=0.1)
    for step in range(2):
        pair.set_grads(step)
        pair.reference.step()
        pair.optimizer.step(hyperparameters(pair.user.param_groups), None, None)
    for ours, plain in zip(pair.ours.parameters(), pair.plain.parameters()):
        state = pair.optimizer.state_of(ours)
        if not plain.requires_grad:
            assert state is None
            continue
        reference = pair.reference.state[plain]
        assert state["step"].item() == reference["step"].item() == 2
        for name in ("exp_avg", "exp_avg_sq"):
            assert state[name].shape == plain.shape
            torch.testing.assert_close(state[name], reference[name], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_updates_equal_whole_updates(chunk):
    whole, chunked = Pair(weight_decay=0.1), Pair(weight_decay=0.1, chunk=chunk)
    numel = whole.unit.grad_numel
    for step in range(STEPS):
        hyper = hyperparameters(whole.user.param_groups)
        whole.set_grads(step)
        whole.optimizer.step(hyper, None, None)
        grads = chunked.set_grads(step)
        flat = chunked.unit.grad.clone()
        chunked.unit.grad.fill_(float("nan"))  # a chunked step reads only the chunk buffer it is given
        for lo in range(0, numel, chunk):
            hi = min(lo + chunk, numel)
            chunked.optimizer.step(hyper, None, None, only=(lo, hi, flat[lo:hi].clone()))
        # The same elementwise kernel on shorter tensors: equal up to its vectorised/scalar paths' rounding.
        for a, b in zip(chunked.ours.parameters(), whole.ours.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert grads  # (the gradients were set)


def test_moments_handed_in_from_the_disk_tier_equal_moments_in_memory():
    memory, disk = Pair(weight_decay=0.1), Pair(weight_decay=0.1, state_in_memory=False)
    state = disk.optimizer.empty_state()
    hyper = hyperparameters(memory.user.param_groups)
    with pytest.raises(RuntimeError, match="not read from the disk tier"):
        disk.set_grads(0)
        disk.optimizer.step(hyper, None, None)
    for step in range(STEPS):
        memory.set_grads(step)
        memory.optimizer.step(hyper, None, None)
        disk.set_grads(step)
        disk.optimizer.step(hyper, None, None, state=state)
    for a, b in zip(disk.ours.parameters(), memory.ours.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(state["exp_avg"], memory.optimizer.state["exp_avg"])


@pytest.mark.parametrize("coefficient", [0.25, 1.0])
def test_a_clip_coefficient_scales_the_gradients_as_clip_grad_norm_does(coefficient):
    pair = Pair(weight_decay=0.1)
    for step in range(STEPS):
        grads = pair.set_grads(step)
        for param in pair.plain.parameters():
            if param.grad is not None:
                param.grad.mul_(coefficient)
        pair.reference.step()
        pair.optimizer.step(hyperparameters(pair.user.param_groups), torch.tensor(coefficient), None)
        pair.assert_close()
    assert grads


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, optim.AdamW])  # torch's kernel; AdamW's own
def test_clipping_by_norm_is_folded_into_the_fused_kernel_pass(cls):
    """The clip coefficient reaches the fused kernel as its ``grad_scale`` (the kernel divides by it as it reads
    each gradient) instead of a pass of its own over the gradients: the host's update is memory-bound."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            numel = args[0].numel() if args and isinstance(args[0], torch.Tensor) else 0
            self.seen.append((func.overloadpacket.__name__, kwargs or {}, numel))
            return func(*args, **(kwargs or {}))

    pair = Pair(cls, weight_decay=0.1)
    for step in range(STEPS):
        pair.set_grads(step)
        coefficient = 0.5 ** (step % 3)  # (a steady one would not show: Adam's update is blind to the gradients' scale)
        for param in pair.plain.parameters():
            if param.grad is not None:
                param.grad.mul_(coefficient)
        pair.reference.step()
        with Ops() as ops:
            pair.optimizer.step(hyperparameters(pair.user.param_groups), torch.tensor(coefficient), None)
        pair.assert_close()
        passes = [name for name, _, numel in ops.seen if name == "mul_" and numel > 9]  # (9: the kernel's scalars)
        assert not passes and pair.optimizer.inner.grad_scale is None
    if cls is torch.optim.Adam:
        fused = next(kwargs for name, kwargs, _ in ops.seen if name == "_fused_adam_")
        assert fused["grad_scale"].item() == 1 / coefficient


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, optim.AdamW])  # Adam: a pass; AdamW: its kernel
def test_a_clip_value_clamps_every_gradient_element(cls):
    pair = Pair(cls, weight_decay=0.1)
    for step in range(STEPS):
        grads = pair.set_grads(step)
        torch.nn.utils.clip_grad_value_(pair.plain.parameters(), 0.5)
        pair.reference.step()
        pair.optimizer.step(hyperparameters(pair.user.param_groups), None, 0.5)
        pair.assert_close()
        # AdamW's own kernel clamps them as it reads them: the host's gradients are left as they came
        clamped = torch.equal(pair.unit.grad, pair.unit.grad.clamp(-0.5, 0.5))
        assert clamped == (cls is torch.optim.Adam) and max(g.abs().max() for g in grads) > 0.5


def test_only_adam_and_adamw_without_differentiable_or_capturable_are_accepted():
    param = nn.Parameter(torch.zeros(2))
    check_optimizer(torch.optim.AdamW([param]))
    with pytest.raises(ValueError, match="supports torch.optim.AdamW"):
        check_optimizer(torch.optim.SGD([param], lr=0.1))
    with pytest.raises(ValueError, match="differentiable=True"):
        check_optimizer(torch.optim.Adam([param], differentiable=True))


# ---------------------------------------------------------------- UpdateWorker (beyond tests/core/test_worker.py)
def test_tasks_run_in_submission_order_one_at_a_time():
    worker = UpdateWorker()
    ran, running = [], []

    def task(key):
        running.append(key)
        assert len(running) == 1  # one thread: never two at once
        ran.append(key)
        running.remove(key)

    for key in range(20):
        worker.submit(key, lambda key=key: task(key))
    worker.wait_all()
    assert ran == list(range(20))
    worker.close()


def test_submitting_a_key_again_waits_for_its_previous_task():
    # A unit's next update must never overtake (or run beside) its previous one.
    worker = UpdateWorker()
    gate, ran = threading.Event(), []
    worker.submit("layer", lambda: (gate.wait(10), ran.append("first")))
    threading.Timer(0.2, gate.set).start()
    worker.submit("layer", lambda: ran.append("second"))
    assert ran[:1] == ["first"]
    worker.wait("layer")
    assert ran == ["first", "second"]
    worker.close()


def test_a_failed_task_is_not_done_and_close_with_drain_re_raises_it():
    worker = UpdateWorker()

    def fail():
        raise ValueError("boom")

    worker.submit("bad", fail)
    worker.submit("good", lambda: None)
    with pytest.raises(ValueError, match="boom"):
        worker.close()  # the normal end of training: the failure surfaces
    assert worker.failed


def test_after_close_nothing_can_be_submitted():
    worker = UpdateWorker()
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit("late", lambda: None)


def test_busy_seconds_count_the_time_tasks_ran():
    worker = UpdateWorker()
    worker.submit("slow", lambda: threading.Event().wait(0.1))
    worker.wait("slow")
    assert worker.busy_seconds >= 0.09 and worker.done("slow")
    worker.close()


def test_consecutive_parameters_of_a_group_are_stepped_as_one_tensor():
    """torch's optimizer gets one flat tensor per run of consecutive parameters of one group (fewer kernel calls,
    and fewer returns of the update thread to the interpreter), while each parameter's state stays its own."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    named = list(LlamaDecoderLayer(config, 0).named_parameters())
    plain = {n: p.detach().clone().requires_grad_() for n, p in named}
    matrices, norms = [n for n, p in named if p.ndim == 2], [n for n, p in named if p.ndim < 2]
    reference = torch.optim.AdamW(
        [{"params": [plain[n] for n in matrices], "weight_decay": 0.1}, {"params": [plain[n] for n in norms]}]
    )
    groups = [
        {"params": [p for n, p in named if n in matrices], "weight_decay": 0.1},
        {"params": [p for n, p in named if n in norms]},
    ]
    user = torch.optim.AdamW(groups)
    unit = HostUnit("layer 0", named)
    optimizer = UnitOptimizer(unit, user, {id(p): g for g, group in enumerate(groups) for p in group["params"]})
    assert [len(group["params"]) for group in optimizer.inner.param_groups] == [1, 1]  # the matrices, the norms
    for step in range(3):
        for entry, (name, _) in zip(unit.trainable, named):
            plain[name].grad = torch.randn(entry.shape, generator=torch.Generator().manual_seed(step))
            entry.view(unit.grad).copy_(plain[name].grad)
        reference.step()
        optimizer.step(hyperparameters(user.param_groups), None, None)
    for name, param in named:
        torch.testing.assert_close(param.detach(), plain[name].detach(), rtol=1e-6, atol=1e-7)
        state = optimizer.state_of(param)
        assert state["step"].item() == 3 and state["exp_avg"].shape == param.shape
        torch.testing.assert_close(state["exp_avg_sq"], reference.state[plain[name]]["exp_avg_sq"])


def test_without_the_host_loop_fp32_adamw_steps_with_torchs_fused_kernel(monkeypatch):
    """Where the C++ host loop cannot be built (no compiler), fp32 moments keep torch's fused kernel, fed fp32
    gradients, rather than the eager ops' several passes."""
    monkeypatch.setattr(optim._kernel, "host", RuntimeError("no C++ compiler"))
    for cls in (torch.optim.AdamW, functools.partial(optim.AdamW, state_dtype=torch.float32)):
        pair = Pair(cls, weight_decay=0.1)
        assert type(pair.optimizer.inner) is torch.optim.AdamW and not pair.optimizer.takes(torch.bfloat16)
        for step in range(STEPS):
            pair.set_grads(step)
            pair.reference.step()
            pair.optimizer.step(hyperparameters(pair.user.param_groups), None, None)
            pair.assert_close()
