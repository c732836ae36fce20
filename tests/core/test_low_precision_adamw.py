"""lightning_slide.optim.AdamW: torch's AdamW with bf16 moments, on its own and under slideformer."""

from __future__ import annotations

import copy
import functools
import math
import os
import threading
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import lightning_slide
from lightning_slide import optim
from tests.core.test_parity import assert_same_training, train
from tests.core.tiny import ACCELERATOR, TinyLM, batches, initial_state, relative_error, trainer


def _run(cls, steps=12, seed=0, **options):
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(64, 48))
    bias = torch.nn.Parameter(torch.randn(48))
    opt = cls([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}], lr=1e-2, **options)
    for step in range(steps):
        weight.grad = torch.randn_like(weight) * (1 + step)
        bias.grad = torch.randn_like(bias)
        opt.step()
    return opt, weight, bias


def test_float32_state_is_torch_adamw():
    _, ours, _ = _run(optim.AdamW, state_dtype=torch.float32)
    _, theirs, _ = _run(torch.optim.AdamW)
    assert torch.equal(ours, theirs)


def test_bf16_moments_follow_the_fp32_update():
    opt, ours, ours_bias = _run(optim.AdamW, maximize=False)
    _, theirs, theirs_bias = _run(torch.optim.AdamW)
    assert all(s[n].dtype == torch.bfloat16 for s in opt.state.values() for n in ("exp_avg", "exp_avg_sq"))
    start = _run(torch.optim.AdamW, steps=0)[1]
    # The rounding of the moments moves each step's update by well under 1% of its size.
    assert relative_error(ours - start, theirs - start) < 1e-2
    assert relative_error(ours_bias, theirs_bias) < 1e-2


def test_maximize_ascends():
    _, up, _ = _run(optim.AdamW, steps=1, maximize=True)
    _, down, _ = _run(optim.AdamW, steps=1)
    start = _run(optim.AdamW, steps=0)[1]
    assert torch.allclose((up - start * (1 - 1e-3)), -(down - start * (1 - 1e-3)), atol=1e-6)


def test_grad_scale_and_found_inf_as_torch_amp_gradscaler_hands_them():
    """As torch's fused kernels take them: the gradients are divided by ``grad_scale`` as they are read, and a step
    whose gradients had inf/NaN (``found_inf``) changes nothing, not even the step count."""
    scaled, plain = (torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(3))) for _ in "ab")
    opts = [optim.AdamW([p], lr=1e-2) for p in (scaled, plain)]
    assert opts[0]._step_supports_amp_scaling  # what GradScaler.step looks for
    for step in range(3):
        grad = torch.randn(300, generator=torch.Generator().manual_seed(step))
        scaled.grad, plain.grad = grad * 1024, grad.clone()  # a power of two: the unscaled gradients are exact
        opts[0].grad_scale, opts[0].found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        opts[0].step()
        opts[1].step()
        assert torch.equal(scaled, plain)
    before = (scaled.detach().clone(), {k: v.clone() for k, v in opts[0].state[scaled].items()})
    opts[0].found_inf = torch.tensor(1.0)
    opts[0].step()
    assert torch.equal(scaled, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opts[0].state[scaled].items())


@pytest.mark.parametrize("moments", [torch.bfloat16, torch.float32])  # fp32: slideformer's host, torch's can't
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp32 masters; bf16-true parameters
def test_the_fused_kernel_computes_what_the_eager_ops_do(dtype, moments):
    torch.manual_seed(1)
    n = 10_007  # not a multiple of any vector width
    param, grad = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    state = [torch.randn(n).abs().to(moments) for _ in range(2)]
    state[1][7] = float("nan")  # a NaN stays NaN, as torch's rounding keeps it
    hyper = torch.tensor([1 - 1e-3, -1e-2 / 0.3, 0.1, 0.95, 0.05, 1e-8, 0.2, 1.0, 0.5])
    eager = [t.clone() for t in (param, grad, *state)]
    fused = [t.clone() for t in (param, grad, *state)]
    optim._adamw_update(*eager, hyper)
    optim._kernel(*fused, hyper)
    if ACCELERATOR == "cpu":  # the host kernel was built and ran (CI has a C++ compiler), not the eager ops
        assert optim._kernel.failures == 0
        assert hasattr(optim._kernel.host, "adamw_")
    assert torch.equal(fused[0].isnan(), eager[0].isnan()) and torch.equal(fused[3].isnan(), eager[3].isnan())
    close = [(fused[0], eager[0])] if dtype == torch.float32 else []  # fp32 results: within fp32 rounding
    rounded = [] if dtype == torch.float32 else [(fused[0], eager[0])]  # bf16 results: one bf16 rounding
    (close if moments == torch.float32 else rounded).extend(zip(fused[2:], eager[2:]))
    for a, b in close:
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
    for a, b in rounded:
        a, b = a.float().nan_to_num(), b.float().nan_to_num()
        assert (a - b).abs().max() <= 2**-7 * b.abs().max()  # one bf16 rounding at most


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="the host kernel; a GPU run updates on the device")
def test_the_host_kernel_lets_the_training_thread_run_meanwhile():
    # slideformer's host thread runs it while the training thread launches the device's work: holding the GIL for
    # the update would stall that thread for the whole of it.
    n = 20_000_000
    tensors = [
        torch.zeros(n),
        torch.randn(n),
        torch.zeros(n, dtype=torch.bfloat16),
        torch.zeros(n, dtype=torch.bfloat16),
    ]
    hyper = torch.tensor([1 - 1e-6, -1e-3, 0.1, 0.999, 1e-3, 1e-8, 0.03, 1.0, math.inf])
    optim._kernel(*tensors, hyper)  # built (or loaded) before timing
    span, seen = [], []  # the update's start and end; when this thread ran meanwhile

    def update():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a core for the update, another for this test's thread (CI has two)
        try:
            span.append(time.perf_counter())
            optim._kernel(*tensors, hyper)
            span.append(time.perf_counter())
        finally:
            torch.set_num_threads(threads)

    worker = threading.Thread(target=update)
    worker.start()
    while worker.is_alive():
        seen.append(time.perf_counter())
    worker.join()
    assert optim._kernel.failures == 0
    start, end = span
    inside = [start] + [t for t in seen if start < t < end] + [end]
    longest = max(b - a for a, b in zip(inside, inside[1:]))
    assert longest < (end - start) / 3, (longest, end - start)


def test_state_dict_round_trip_keeps_bf16_and_resumes_exactly():
    opt, weight, bias = _run(optim.AdamW, steps=3)
    saved = copy.deepcopy(opt.state_dict())  # as from a checkpoint (state_dict() shares the step tensors)
    copy_w, copy_b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    again = optim.AdamW([{"params": [copy_w], "weight_decay": 0.1}, {"params": [copy_b], "weight_decay": 0.0}])
    again.load_state_dict(saved)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in again.state.values())
    for p, q in ((weight, copy_w), (bias, copy_b)):
        p.grad = q.grad = torch.ones_like(p)
    opt.step()
    again.step()
    assert torch.equal(weight, copy_w) and torch.equal(bias, copy_b)


def test_options_it_does_not_offer_are_refused():
    with pytest.raises(ValueError, match="state_dtype"):
        optim.AdamW([torch.nn.Parameter(torch.zeros(2))], state_dtype=torch.float16)


low_precision = functools.partial(optim.AdamW, lr=3e-3, betas=(0.9, 0.95))


@pytest.mark.parametrize(
    ("window", "accumulate", "options"),
    [(1, 2, {}), (2, 1, {}), ("all", 1, {"tuning": {"resident_optimizer": "device"}})],
)
def test_bf16_moments_train_as_under_plain_lightning(window, accumulate, options):
    plain = train("llama", "auto", accumulate=accumulate, optimizer=low_precision)
    strategy = lightning_slide.SlideFormerStrategy(window=99 if window == "all" else window, **options)
    dtypes = set()

    class Moments(L.Callback):
        def on_train_end(self, trainer, pl_module):
            optimizers = trainer.strategy.engine.updates.optimizers.values()
            dtypes.update(t.dtype for o in optimizers if o.state is not None for t in o.state.values())

    ours = train("llama", strategy, accumulate=accumulate, optimizer=low_precision, callbacks=[Moments()])
    # Rounding to bf16 turns the last-bit differences of fp32 sums (plain and slideformer add gradients in other
    # orders) into an occasional one-bf16-step difference of a moment: twenty times fp32 parity's tolerance.
    # On a GPU, plain training updates there and slideformer on the host: fp32 roundings differ a little more.
    assert_same_training(ours, plain, tolerance=2e-4 if ACCELERATOR == "cpu" else 3e-4)
    assert dtypes == {torch.bfloat16}  # the host kept the moments in bf16 (half the state)


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="the plan's host items, counted on the CPU")
def test_the_plan_counts_bf16_moments():
    from lightning_slide.engine.plan import ModelShape, Settings, host_bytes

    shape = ModelShape(
        layers=4, layer_params=2_250, layer_trainable=2_250, resident_params=1_000, resident_trainable=1_000
    )
    fp32 = host_bytes(shape, Settings(device="cpu", compute_dtype=torch.float32))
    bf16 = host_bytes(shape, Settings(device="cpu", compute_dtype=torch.float32, moments_dtype=torch.bfloat16))
    assert fp32["Adam moments (fp32)"] == 2 * bf16["Adam moments (bf16)"] == 8 * 10_000


def test_bf16_moments_checkpoint_and_resume_exactly(tmp_path):
    from tests.core.tiny import assert_resumes_exactly

    assert_resumes_exactly(tmp_path, lambda: lightning_slide.SlideFormerStrategy(window=1), optimizer=low_precision)
    files = sorted((tmp_path / "a" / "last.ckpt" / "optimizer").glob("*.safetensors"))
    moments = [load_file(f) for f in files]
    assert files and {t.dtype for m in moments for n, t in m.items() if "exp_avg" in n} == {torch.bfloat16}


class HostGradientDtypes(L.Callback):
    """The dtypes of the layer gradients the host optimizer read (spied on ``UnitOptimizer.step``)."""

    def __init__(self) -> None:
        self.seen: set[torch.dtype] = set()

    def on_train_start(self, trainer, pl_module):
        for key, optimizer in trainer.strategy.engine.updates.optimizers.items():
            if isinstance(key, int):
                step = optimizer.step

                def spied(*args, optimizer=optimizer, step=step, **kwargs):
                    self.seen.add(optimizer.unit.grad.dtype)
                    return step(*args, **kwargs)

                optimizer.step = spied

    def on_train_end(self, trainer, pl_module):
        self.parked = trainer.strategy.engine.stats()["parked_layers"]


class ReadsGradientsBeforeTheStep(L.Callback):
    """A user's hook between backward and step: the host shows it every gradient, in fp32."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in pl_module.parameters())


@pytest.mark.parametrize(
    ("accumulate", "clip", "parked", "narrow", "optimizer"),
    [
        (1, None, 0, True, low_precision),
        (1, None, 2, True, low_precision),
        (1, 0.05, 2, True, low_precision),
        (1, "value", 0, True, low_precision),
        (2, None, 0, False, low_precision),
        (1, None, 2, True, "adamw"),
        (1, "value", 0, True, "adamw"),
    ],
)  # bf16 moments; torch.optim.AdamW (fp32 moments: the same host loop)
def test_bf16_gradients_reach_the_host_kernel_as_they_are_and_train_the_same(
    accumulate, clip, parked, narrow, optimizer
):
    """With AdamW a step of one micro-batch sends its layers' gradients down in bf16, as the device computed
    them, and the kernel widens them as it reads: half the copy and half the gradient reads of the update, bit for bit
    what fp32 gradients give (those of a step that hooks observe, which see fp32; with clipping by norm that step
    takes the norm on the host, from other roundings), parked on the device on their way or not. Several
    micro-batches add up in fp32 and stay so."""
    runs, spies = {}, {}
    for observed in (False, True):
        spy = HostGradientDtypes()
        callbacks = [spy, *([ReadsGradientsBeforeTheStep()] if observed else [])]
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"), optimizer=optimizer)
        by_value = dict(gradient_clip_val=1e-3, gradient_clip_algorithm="value")  # the kernel clamps as it reads
        clipping = by_value if clip == "value" else dict(gradient_clip_val=clip)
        options = dict(accumulate_grad_batches=accumulate, callbacks=callbacks, **clipping)
        # The resident parts update on the host in both runs: "auto" puts them on a GPU only where no hook observes
        # the step, and a GPU's kernels round otherwise than the host's.
        tuning = dict(parked_grads=parked, grad_buffers=1, resident_optimizer="host")
        strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=tuning)
        run = trainer(strategy, precision="bf16-true", max_steps=4, **options)
        run.fit(module, batches(4 * accumulate))
        runs[observed], spies[observed] = (module, spy.seen), spy
    (narrowed, seen), (widened, seen_observed) = runs[False], runs[True]
    if clip is not None:  # a held step parks while buffers are free (a streamed one only when the host lags)
        assert (spies[False].parked > 0) == (parked > 0)
    assert seen == {torch.bfloat16 if narrow else torch.float32} and seen_observed == {torch.float32}
    theirs = dict(widened.named_parameters())
    for name, param in narrowed.named_parameters():
        if clip in (None, "value"):
            assert torch.equal(param, theirs[name]), name
        else:
            # (a GPU's layer norms, taken as the gradients leave it, round otherwise than the host's)
            tolerance = 1e-6 if ACCELERATOR == "cpu" else 1e-5
            assert relative_error(param.detach(), theirs[name].detach()) < tolerance, name


def test_the_kernel_widens_and_clamps_bf16_gradients_exactly():
    """bf16 gradients into the host loop (bf16 moments) update exactly as the same values in fp32, unscaling
    included; and its clamp (clipping by value) as clamping them first."""
    torch.manual_seed(0)
    grads = [torch.randn(4096).bfloat16() for _ in range(3)]
    start = torch.randn(4096)
    results = []
    for widen in (False, True):
        param = torch.nn.Parameter(start.clone())
        opt = optim.AdamW([param], lr=1e-2, weight_decay=0.1)
        for step, grad in enumerate(grads):
            opt.grad_scale = torch.tensor(2.0 + step)
            opt.clip_value = None if widen else 0.7
            opt.update({param: grad.float().clamp(-0.7, 0.7) if widen else grad})
        results.append((param.detach().clone(), *(opt.state[param][n] for n in ("exp_avg", "exp_avg_sq"))))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_a_build_lock_left_by_a_killed_build_is_removed_not_waited_for(tmp_path, monkeypatch):
    """torch's extension loader waits without end for a lock file a killed build left: every later run would hang
    at its first host update. An old lock goes (with a warning); a fresh one, a build under way, stays."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "killed" / "lock", tmp_path / "building" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    with pytest.warns(UserWarning, match="did not finish"):
        optim._clear_stale_lock("killed")
    optim._clear_stale_lock("building")
    assert not stale.exists() and fresh.exists()
