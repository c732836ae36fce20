"""AdamW with its moments kept in bfloat16: half the optimizer state's memory and less of the host's memory traffic.

``AdamW(params, ..., state_dtype=torch.bfloat16)`` is torch's AdamW (decoupled weight decay, the same
hyperparameters and ``state_dict`` layout) whose ``exp_avg`` and ``exp_avg_sq`` are stored in bf16: each update
reads them into fp32, updates the parameter in fp32 and rounds them back to the nearest bf16. It trains anywhere —
plain Lightning, any device — and under slideformer the host runs the same kernel over the fp32 masters. One pass
over memory per parameter: on the CPU a C++ loop (``csrc/adamw.cpp``, built on first use), on a GPU a Triton
kernel from ``torch.compile``; 20 bytes moved per parameter instead of fp32 AdamW's 28, and 4 bytes of state instead
of 8. Its speed and quality cost: BENCHMARKS.md (``benchmarks/bench_host_adamw.py``, ``benchmarks/convergence.py``).
The same loop serves fp32 moments where torch's fused kernel cannot: gradients narrower than the parameters, a bf16
copy of the updated weights written in the same pass (:meth:`AdamW.update`, which slideformer's host calls).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

STATE_DTYPES = (torch.bfloat16, torch.float32)
_GIVE_UP = 3  # failed calls of the fused kernel after which only the eager ops run
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hyper: torch.Tensor,
    copy: torch.Tensor | None = None,
) -> None:
    """One AdamW update of flat ``param`` in fp32, the moments read from and rounded back to their own dtype, in the
    order of operations of torch's fused CPU AdamW (up to where it fuses a multiply-add). ``hyper``: fp32
    ``[1 - lr * weight_decay, -lr / bias_correction1, 1 - beta1, beta2, 1 - beta2, eps, sqrt(bias_correction2),
    factor, clip]``, computed in double (as torch's): each gradient element is clamped to ``[-clip, clip]``
    (clipping by value; ``inf``: none) and multiplied by ``factor`` as it is read (its sign maximizes; GradScaler's
    ``1 / scale``). Tensors, not Python numbers: a changed learning rate does not recompile. ``copy``: receives the
    updated parameter in its own dtype."""
    keep, neg_step, weight, beta2, new_share, eps, bias2_sqrt, factor, clip = hyper.unbind()
    grad = grad.float().clamp(-clip, clip) * factor
    exp_avg32 = exp_avg.float().lerp(grad, weight)
    exp_avg_sq32 = torch.addcmul(exp_avg_sq.float() * beta2, new_share * grad, grad)
    denom = exp_avg_sq32.sqrt() / bias2_sqrt + eps
    param.copy_(param.float() * keep + neg_step * exp_avg32 / denom)
    exp_avg.copy_(exp_avg32)
    exp_avg_sq.copy_(exp_avg_sq32)
    if copy is not None:
        copy.copy_(param)


class _Kernel:
    """``_adamw_update`` fused: on the CPU the C++ loop of ``csrc/adamw.cpp`` (built once per machine into
    torch's extension cache), elsewhere ``torch.compile``'s kernel (shapes dynamic). A call neither can run (no C++
    compiler, an unsupported backend, a context that forbids compiling) runs torch's eager ops instead, with a warning
    the first time; after :data:`_GIVE_UP` such calls it stops trying."""

    def __init__(self) -> None:
        self.compiled = None
        self.host = None  # the built C++ extension
        self.failures = 0
        self._lock = threading.Lock()  # updates may run on the training thread and on slideformer's host thread

    def __call__(self, *tensors: torch.Tensor) -> None:
        if self.failures < _GIVE_UP:
            try:
                if tensors[0].device.type == "cpu":
                    return self._host().adamw_(*tensors[:5], tensors[5] if len(tensors) > 5 else None)
                with self._lock:  # (dynamo serializes compiling itself; the kernels then run concurrently)
                    if self.compiled is None:
                        self.compiled = torch.compile(_adamw_update, dynamic=True, fullgraph=True)
                return self.compiled(*tensors)
            except Exception as error:  # noqa: BLE001 - the eager ops compute the same update
                self.failures += 1
                if self.failures == 1:
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    warnings.warn(
                        f"lightning_slide.optim.AdamW could not run its fused update ({reason}); torch's eager ops "
                        "run instead (the same result, several passes over memory: slower)",
                        stacklevel=3,
                    )
        _adamw_update(*tensors)

    def _host(self):
        """The C++ extension, built on the first call; a failed build is not tried again (its error is raised)."""
        if self.host is None:
            with self._lock:  # one build, though updates may start on two threads
                if self.host is None:
                    self.host = _build_host_kernel()
        if isinstance(self.host, Exception):
            raise self.host
        return self.host


def add_with_norm(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``total += part`` (flat fp32 CPU tensors) and the fp32 2-norm of the new ``total``: in one pass over memory
    with the C++ host loop, else in two."""
    try:
        host = _kernel._host()
    except Exception:  # noqa: BLE001 - no host loop here: torch's ops give the same sum and norm
        total.add_(part)
        return torch.linalg.vector_norm(total)
    return torch.tensor(math.sqrt(host.add_square_sum_(total, part)), dtype=torch.float32)


def host_loop_ready() -> bool:
    """Whether the C++ host loop is built (building it on the first call): where it cannot be, slideformer's host
    steps fp32 moments with torch's fused kernel instead, with fp32 gradients."""
    try:
        _kernel._host()
    except Exception:  # noqa: BLE001 - the build's error is kept; bf16 moments warn with it on their first update
        return False
    return True


def _build_host_kernel():
    """Build (or load from torch's extension cache) ``csrc/adamw.cpp``; the exception when it cannot."""
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    # -ffp-contract=off: no fused multiply-adds but the loop's own std::fma, so every build rounds alike.
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    name = f"lightning_slide_adamw_{_cpu_tag()}"  # -march=native: one build per CPU kind
    try:
        _clear_stale_lock(name)
        return load(
            name=name,
            sources=[str(Path(__file__).parent / "csrc" / "adamw.cpp")],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # noqa: BLE001 - kept and raised for each call: the caller falls back to eager ops
        return error


_STALE_LOCK_SECONDS = 600  # a build takes ~25 s: a lock this old was left by one that was killed


def _clear_stale_lock(name: str) -> None:
    """Remove the build lock a killed build left behind: torch's ``load`` waits for it to go, without end, so every
    later run would hang at its first update. A fresh lock (a build under way in another process) is left alone."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_SECONDS:
        warnings.warn(
            f"removing {lock}, left {age / 60:.0f} minutes ago by a build of the host AdamW loop that did not finish",
            stacklevel=4,
        )
        lock.unlink(missing_ok=True)


def _put_ninja_on_path() -> None:
    """torch builds extensions with the ``ninja`` it finds on PATH: add the pip package's, which a Python run from
    an environment that was not activated does not see."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def _cpu_tag() -> str:
    """A short name for this CPU's instruction sets: a home directory shared by machines of several kinds keeps one
    build for each in torch's extension cache."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


_kernel = _Kernel()


class AdamW(torch.optim.AdamW):
    """torch's AdamW with ``exp_avg`` and ``exp_avg_sq`` stored in ``state_dtype``.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW``.
        state_dtype: ``torch.bfloat16`` (default): the moments in bf16, updated by one fused kernel;
            ``torch.float32``: exactly ``torch.optim.AdamW`` (its fused kernel where it has one).
        fused, foreach: ``torch.optim.AdamW``'s, used with ``state_dtype=torch.float32`` only.

    ``amsgrad``, ``capturable`` and ``differentiable`` are not offered with bf16 moments. As torch's fused kernels
    it takes ``grad_scale`` and ``found_inf`` from ``torch.amp.GradScaler`` (the gradients are unscaled as the kernel
    reads them; a step with inf/NaN gradients is skipped), which also clips by norm without a pass of its own; and
    ``clip_value`` (set by slideformer's engine) clamps each gradient element to ``[-clip_value, clip_value]`` as the
    kernel reads it: clipping by value without a pass of its own either.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_dtype: torch.dtype = torch.bfloat16,
        maximize: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> None:
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be torch.bfloat16 or torch.float32, got {state_dtype!r}")
        self.state_dtype = state_dtype
        low = state_dtype != torch.float32
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            fused=None if low else fused,
            foreach=None if low else foreach,
        )
        if low:
            self._step_supports_amp_scaling = True  # GradScaler hands grad_scale and found_inf to step

    @torch.no_grad()
    def step(self, closure=None):
        if self.state_dtype == torch.float32:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update({p: p.grad for group in self.param_groups for p in group["params"] if p.grad is not None})
        return loss

    @torch.no_grad()
    def update(self, grads: dict[torch.Tensor, torch.Tensor], copies: dict[torch.Tensor, torch.Tensor] | None = None):
        """One step of the fused kernel, whatever ``state_dtype``, with ``grads[param]`` as each parameter's gradient
        (``step`` hands it ``.grad``): a gradient may be bf16 for fp32 parameters, which ``.grad`` cannot hold (the
        kernel widens it). ``copies[param]`` (optional): receives the updated parameter in bf16, in the same pass."""
        copies = copies or {}
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        clip = getattr(self, "clip_value", None)
        if found_inf is not None and float(found_inf):
            return  # GradScaler found inf/NaN gradients: no update, no step counted (as torch's fused kernels)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            made: dict[tuple, torch.Tensor] = {}  # one hyperparameter tensor per step count and device (uploaded once)
            for param in group["params"]:
                grad = grads.get(param)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("lightning_slide.optim.AdamW does not support sparse gradients")
                state = self.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                for name in _MOMENTS:
                    if name not in state:
                        state[name] = torch.zeros_like(param, dtype=self.state_dtype)
                state["step"] += 1
                step = float(state["step"])
                hyper = made.get((step, param.device))
                if hyper is None:
                    lr = float(group["lr"])
                    hyper = made[step, param.device] = torch.tensor(
                        [
                            1 - lr * group["weight_decay"],
                            -lr / (1 - beta1**step),
                            1 - beta1,
                            beta2,
                            1 - beta2,
                            group["eps"],
                            math.sqrt(1 - beta2**step),
                            -1.0 if group["maximize"] else 1.0,
                            math.inf if clip is None else float(clip),
                        ],
                        dtype=torch.float32,
                        device=param.device,
                    )
                    if grad_scale is not None:  # the gradients' factor, divided on their device (no sync)
                        hyper[7:8] /= torch.as_tensor(grad_scale, dtype=torch.float32).to(param.device)
                _update_flat(param, grad, state["exp_avg"], state["exp_avg_sq"], hyper, copies.get(param))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, keeping the moments in ``state_dtype`` (torch casts them to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for name in _MOMENTS:
                if name in state and state[name].dtype != self.state_dtype and self.state_dtype != torch.float32:
                    state[name] = state[name].to(self.state_dtype)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("state_dtype", torch.float32)


def _update_flat(param, grad, exp_avg, exp_avg_sq, hyper, copy=None) -> None:
    """The kernel over flat views (one compiled shape family); tensors that have none go through copies."""
    tensors = (param, grad, exp_avg, exp_avg_sq) + (() if copy is None else (copy,))
    if all(t.is_contiguous() for t in tensors):
        _kernel(*(t.view(-1) for t in tensors[:4]), hyper, *(t.view(-1) for t in tensors[4:]))
        return
    flat = [t.reshape(-1).clone() if not t.is_contiguous() else t.view(-1) for t in tensors]
    _kernel(*flat[:4], hyper, *flat[4:])
    for original, copied in zip(tensors, flat):
        if not original.is_contiguous() and original is not grad:
            original.copy_(copied.view_as(original))
